"""Plain HTTP/1.1 for quPSKd's peer channel (h11 on trio), one request per connection, bounded
in size and time on both sides. quPSKd speaks HTTP/1.0-style GETs without bodies, so a request
body is never read and every answer closes the connection."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import h11
import trio

from .net import Network

MAX_HEAD_BYTES = 8192
READ_CHUNK = 4096
MAX_BODY_PIECES = 4096
"""Reads (h11 `Data` events) an answer body may come in: one of one-byte chunks costs about
5 us a piece to parse, where an honest one arrives in a few."""
SERVER_NAME = b"qkdagent-qupskd"

Respond = Callable[[str, str], Awaitable[tuple[int, bytes]]]
"""(method, target) -> (status, JSON body)."""


class HttpError(Exception):
    """The peer could not be reached, broke the protocol, or answered too much or too late."""


async def serve_one(stream: trio.abc.Stream, respond: Respond, *, within: float) -> None:
    """Read one request head, answer it, close: all within `within` seconds."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    try:
        with trio.move_on_after(within):
            request = await _next_request(stream, conn)
            if request is None:
                return
            method = request.method.decode("ascii", "replace")
            target = request.target.decode("ascii", "replace")
            status, body = await respond(method, target)
            await _send_response(stream, conn, status, body)
    except h11.RemoteProtocolError:
        try:
            with trio.move_on_after(1):
                await _send_response(stream, conn, 400, b'{"status":"error"}')
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _next_request(stream: trio.abc.Stream, conn: h11.Connection) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(READ_CHUNK)
            conn.receive_data(
                bytes(data)
            )  # b"" = closed: h11 then yields ConnectionClosed or raises
            continue
        if isinstance(event, h11.Request):
            return event
        if isinstance(event, h11.ConnectionClosed):
            return None


async def _send_response(
    stream: trio.abc.Stream, conn: h11.Connection, status: int, body: bytes
) -> None:
    headers = [
        (b"Server", SERVER_NAME),
        (b"Content-Type", b"application/json"),
        (b"Content-Length", str(len(body)).encode()),
        (b"Connection", b"close"),
    ]
    data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
    data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


async def get(
    network: Network,
    host: str,
    port: int,
    path: str,
    *,
    within: float,
    max_body: int,
) -> tuple[int, bytes]:
    """GET `path`: (status, body). `HttpError` on anything else, including a body over
    `max_body` (refused while reading) and no complete answer within `within` seconds."""
    try:
        with trio.fail_after(within):
            stream = await network.connect(host, port)
            try:
                return await _exchange(stream, host, port, path, max_body)
            finally:
                await trio.aclose_forcefully(stream)
    except trio.TooSlowError:
        raise HttpError(f"no complete answer to {path} within {within:g} s") from None
    except OSError as exc:
        raise HttpError(f"cannot connect: {exc.strerror or type(exc).__name__}") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        raise HttpError(f"connection lost during {path}") from None
    except h11.ProtocolError as exc:
        raise HttpError(f"not an HTTP answer to {path}: {str(exc)[:80]}") from None


async def _exchange(
    stream: trio.abc.Stream, host: str, port: int, path: str, max_body: int
) -> tuple[int, bytes]:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    request = h11.Request(
        method="GET",
        target=path,
        headers=[
            (b"Host", authority.encode("ascii", "replace")),
            (b"Accept", b"application/json"),
            (b"Connection", b"close"),
        ],
    )
    await stream.send_all((conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b""))
    status: int | None = None
    body = bytearray()
    pieces = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(READ_CHUNK)))
        elif isinstance(event, h11.Response):
            status = event.status_code
            for name, value in event.headers:
                if name == b"content-length" and value.isdigit() and int(value) > max_body:
                    raise HttpError(f"answer to {path} is larger than {max_body} bytes")
        elif isinstance(event, h11.Data):
            body += event.data
            pieces += 1
            if len(body) > max_body:
                raise HttpError(f"answer to {path} is larger than {max_body} bytes")
            if pieces > MAX_BODY_PIECES:
                raise HttpError(f"answer to {path} came in more than {MAX_BODY_PIECES} pieces")
        elif isinstance(event, h11.EndOfMessage):
            if status is None:
                raise HttpError(f"no status line in the answer to {path}")
            return status, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            raise HttpError(f"connection closed before the answer to {path} was complete")
