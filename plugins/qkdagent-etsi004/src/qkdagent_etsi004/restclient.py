"""One plain-HTTP POST to a qkd-module (h11 over trio): bounded answer, typed errors.

One request per connection (`Connection: close`), as the module's Flask server expects. No
`Content-Type` is sent: Flask hands a form-typed body to `request.form`, and the module reads
`request.data`. The status line and headers are bounded by h11, the body by `limit` (and
`rest.MAX_BODY_PIECES` reads).
"""

from __future__ import annotations

import h11
import trio

from .rest import MAX_BODY_PIECES
from .transport import TransportError

MAX_INFORMATIONAL = 8
"""1xx answers skipped before the final one, at most (the module sends none): a module
sending them without end held the agent's CPU until the call's deadline (review finding)."""


class HttpError(ValueError):
    """The module's answer is not well-formed HTTP/1.x, or too long."""


async def post(host: str, port: int, path: str, body: bytes, *, limit: int) -> tuple[int, bytes]:
    """(HTTP status, body). TransportError if the connection fails, HttpError if malformed."""
    try:
        tcp = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise TransportError(f"cannot connect: {exc.strerror or exc}") from None
    try:
        return await _exchange(tcp, host, port, path, body, limit)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise TransportError(f"connection failed: {type(exc).__name__}") from None
    except h11.ProtocolError as exc:
        raise HttpError(f"malformed HTTP answer: {type(exc).__name__}") from None
    finally:
        await trio.aclose_forcefully(tcp)


async def _exchange(
    tcp: trio.SocketStream, host: str, port: int, path: str, body: bytes, limit: int
) -> tuple[int, bytes]:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=16 * 1024)
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    request = h11.Request(
        method="POST",
        target=path,
        headers=[
            ("Host", authority),
            ("User-Agent", "qkdagent-etsi004"),
            ("Accept", "*/*"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ],
    )
    await tcp.send_all(
        conn.send(request) + conn.send(h11.Data(body)) + conn.send(h11.EndOfMessage())
    )
    status: int | None = None
    received = bytearray()
    pieces = informational = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await tcp.receive_some(65536))
        elif isinstance(event, h11.InformationalResponse):
            informational += 1
            if informational > MAX_INFORMATIONAL:
                raise HttpError(f"more than {MAX_INFORMATIONAL} informational (1xx) answers")
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            received += event.data
            pieces += 1
            if len(received) > limit:
                raise HttpError(f"answer longer than {limit} bytes")
            if pieces > MAX_BODY_PIECES:
                raise HttpError(f"answer in more than {MAX_BODY_PIECES} pieces")
        elif isinstance(event, h11.EndOfMessage):
            if status is None:
                raise HttpError("no status line")
            return status, bytes(received)
        elif isinstance(event, h11.ConnectionClosed):
            raise TransportError("the module closed the connection without answering")
