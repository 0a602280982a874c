"""The hub's HTTP/1.1 server: h11 on trio, HTTPS with mutual TLS (or plain HTTP by opt-in).

One task per connection, keep-alive, every wait bounded in time and every read in size: the
request head by h11 (`MAX_HEAD`), the body by `wire.MAX_BODY` (413 beyond, connection closed)
and `wire.MAX_BODY_PIECES` reads. TLS handshakes are capped on their own, the oldest dropped
for a newcomer, before a connection takes one of `max_connections`.
The client certificate's common name is handed to the hub as the caller's identity.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import h11
import trio

from qkdagent import load_tls_identity

from . import wire
from .hubapp import Hub, Request, Response

log = logging.getLogger("qkdagent.dske.hub")

MAX_HEAD = 16 * 1024


@dataclass(frozen=True)
class ServerLimits:
    keep_alive: float = 60.0
    request: float = 30.0
    handshake: float = 10.0
    max_connections: int = 512
    """Connections served at once, once their TLS handshake is done (more wait their turn)."""
    max_handshaking: int = 128
    """TLS handshakes under way at once, outside `max_connections`: past it the oldest is
    dropped, so connections that never finish one (no certificate needed) cannot hold the
    places of clients that did."""


def server_ssl_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """TLS 1.2+ server context that requires a client certificate signed by `ca`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    load_tls_identity(context, cert, key, what="dske-hub")
    return context


def _peer_name(stream: trio.abc.Stream) -> str | None:
    if not isinstance(stream, trio.SSLStream):
        return None
    cert = stream.getpeercert()
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


class _Close(Exception):
    pass


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await stream.receive_some(64 * 1024)
        conn.receive_data(bytes(data))


async def _send(conn: h11.Connection, stream: trio.abc.Stream, response: Response) -> None:
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(response.body))),
        *response.headers,
    ]
    data = conn.send(h11.Response(status_code=response.status, headers=headers))
    data = (data or b"") + (conn.send(h11.Data(data=response.body)) or b"")
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


async def _exchange(
    hub: Hub, conn: h11.Connection, stream: trio.abc.Stream, peer: str | None
) -> None:
    event = await _next_event(conn, stream)
    if not isinstance(event, h11.Request):
        raise _Close
    target = bytes(event.target)
    raw_path, _, query = target.partition(b"?")
    signature = None
    length = 0
    for name, value in event.headers:
        if name == b"dske-signature":
            signature = value.decode("latin-1")
        elif name == b"content-length":
            length = int(value)  # h11 has checked it is a number
    if length > wire.MAX_BODY:
        await _send(conn, stream, Response(413, b'{"detail":"body too large"}'))
        raise _Close
    chunks: list[bytes] = []
    size = 0  # a running total: re-summing every chunk would be quadratic in tiny chunks
    while True:
        part = await _next_event(conn, stream)
        if isinstance(part, h11.Data):
            chunks.append(bytes(part.data))
            size += len(part.data)
            if size > wire.MAX_BODY:  # chunked bodies have no length up front
                await _send(conn, stream, Response(413, b'{"detail":"body too large"}'))
                raise _Close
            if len(chunks) > wire.MAX_BODY_PIECES:
                await _send(conn, stream, Response(413, b'{"detail":"body in too many pieces"}'))
                raise _Close
        elif isinstance(part, h11.EndOfMessage):
            break
        else:
            raise _Close
    try:
        path = unquote(raw_path.decode("ascii"), errors="strict")
    except UnicodeDecodeError:
        path = ""
    request = Request(event.method.decode("ascii"), path, query, b"".join(chunks), signature, peer)
    try:
        response = await hub.handle(request)
    except Exception:
        log.exception("hub %s: internal error", hub.settings.name)
        response = Response(500, b'{"detail":"internal error"}')
    await _send(conn, stream, response)


async def serve_connection(hub: Hub, stream: trio.abc.Stream, limits: ServerLimits) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    try:
        if isinstance(stream, trio.SSLStream):
            with trio.fail_after(limits.handshake):
                await stream.do_handshake()
        peer = _peer_name(stream)
        while True:
            # one bound covers the idle wait and the exchange (head, body, answer)
            with trio.fail_after(limits.keep_alive + limits.request):
                await _exchange(hub, conn, stream, peer)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = b'{"detail":"malformed HTTP request"}'
            try:
                await _send(conn, stream, Response(exc.error_status_hint, body))
            except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
    except (_Close, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except ssl.SSLError:
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _handshake(
    stream: trio.SSLStream[trio.abc.Stream],
    limits: ServerLimits,
    handshaking: dict[trio.CancelScope, None],
) -> bool:
    """The TLS handshake, before the connection takes one of `max_connections`: at most
    `max_handshaking` at once, the oldest dropped for a newcomer (an honest handshake takes
    milliseconds, so what is dropped is what stalls). False: the connection is closed."""
    with trio.CancelScope() as scope:
        if len(handshaking) >= limits.max_handshaking:
            oldest = next(iter(handshaking))
            del handshaking[oldest]
            oldest.cancel()
        handshaking[scope] = None
        try:
            with trio.fail_after(limits.handshake):
                await stream.do_handshake()
            return True
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                ssl.SSLError):  # fmt: skip
            pass
        finally:
            handshaking.pop(scope, None)
    await trio.aclose_forcefully(stream)
    return False


async def serve_hub(
    hub: Hub,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
    limits: ServerLimits | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `hub` until cancelled; `task_status.started(port)` once listening."""
    limits = limits or ServerLimits()
    tcp = await trio.open_tcp_listeners(port, host=host)
    listeners: list[trio.SocketListener] | list[trio.SSLListener[trio.SocketStream]] = tcp
    if ssl_context is not None:
        listeners = [trio.SSLListener(lst, ssl_context, https_compatible=True) for lst in tcp]
    sock = tcp[0].socket  # the TCP listener under any TLS wrapping: its bound port
    limiter = trio.CapacityLimiter(limits.max_connections)
    handshaking: dict[trio.CancelScope, None] = {}  # oldest first

    async def handler(stream: trio.abc.Stream) -> None:
        if isinstance(stream, trio.SSLStream) and not await _handshake(stream, limits, handshaking):
            return
        async with limiter:
            await serve_connection(hub, stream, limits)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(sock.getsockname()[1])
