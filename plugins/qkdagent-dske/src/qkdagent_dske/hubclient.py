"""HTTP/1.1 calls to one security hub: h11 over kept-open trio streams, bounded reads.

Only transport: signing, checking and PSRD bookkeeping are the source's (`source.py`). A key
costs one request per hub on each side, so this is the hot path: a small h11 client (a few
hundred lines of httpx and httpcore per request less) with a pool of kept-open connections per
hub. Every wait is bounded by `timeout`, the answer's head by h11 (`MAX_HEAD`) and its body by
`limit`; no content decoding is asked for or done.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import h11
import trio

from qkdagent import load_tls_identity

from . import wire

MAX_HEAD = 16 * 1024
MAX_CONNECTIONS = 8


class HubDown(Exception):
    """The hub could not be reached, timed out or broke the HTTP exchange."""


@dataclass(frozen=True)
class HubReply:
    status: int
    body: bytes = field(repr=False)
    """Hidden from reprs: a PSRD refill answer carries the block's bytes."""
    signature: str | None


def client_ssl_context(
    ca: Path | None, cert: Path | None, key: Path | None, *, what: str
) -> ssl.SSLContext:
    """A hub's TLS client context: `ca` (None: the system's CAs), our certificate if the hub
    asks for one (`key` None: in `cert`). `Misconfigured` names `what` and the file; an
    encrypted key is refused, never prompted for (`load_tls_identity`)."""
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        load_tls_identity(context, cert, key, what=what)
    return context


class _Stale(Exception):
    """A kept-open connection the hub had closed before our request reached it."""


@dataclass
class _Conn:
    stream: trio.abc.Stream
    h11: h11.Connection


class HubClient:
    def __init__(
        self,
        name: str,
        url: str,
        *,
        ssl_context: ssl.SSLContext | None,
        timeout: float,
    ) -> None:
        self.name = name
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("a hub URL is http(s)://host[:port]/path")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._authority = parts.netloc.rsplit("@", 1)[-1]
        self._base = parts.path
        self._tls = ssl_context if parts.scheme == "https" else None
        if parts.scheme == "https" and self._tls is None:
            self._tls = ssl.create_default_context()
        self._timeout = timeout
        self._idle: list[_Conn] = []
        self._limit = trio.CapacityLimiter(MAX_CONNECTIONS)

    def __repr__(self) -> str:
        return f"<HubClient {self.name} {self.url}>"

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await trio.aclose_forcefully(conn.stream)

    async def _connect(self) -> _Conn:
        stream: trio.abc.Stream = await trio.open_tcp_stream(self._host, self._port)
        if self._tls is not None:
            tls = trio.SSLStream(
                stream, self._tls, server_hostname=self._host, https_compatible=True
            )
            await tls.do_handshake()
            stream = tls
        return _Conn(stream, h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD))

    async def call(
        self,
        method: str,
        path: str,
        *,
        query: bytes = b"",
        body: bytes | None = None,
        signature: str | None = None,
        limit: int = wire.MAX_BODY,
    ) -> HubReply:
        target = f"{self._base}/dske/{path}".encode("ascii") + (b"?" + query if query else b"")
        headers = [
            ("host", self._authority),
            ("accept-encoding", "identity"),
            ("content-length", str(len(body or b""))),
        ]
        if signature is not None:
            headers.append((wire.SIGNATURE_HEADER, signature))
        if body is not None:
            headers.append(("content-type", "application/json"))
        request = h11.Request(method=method, target=target, headers=headers)
        try:
            async with self._limit:
                with trio.fail_after(self._timeout):
                    while self._idle:  # kept-open connections first; a stale one is dropped
                        conn = self._idle.pop()
                        try:
                            return await self._exchange(conn, request, body, limit, reused=True)
                        except _Stale:
                            continue
                    conn = await self._connect()
                    return await self._exchange(conn, request, body, limit, reused=False)
        except trio.TooSlowError:
            raise HubDown(f"hub {self.name}: no answer within {self._timeout:g} s") from None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, _Stale) as exc:
            raise HubDown(f"hub {self.name}: {type(exc).__name__}") from None
        except h11.ProtocolError:
            raise HubDown(f"hub {self.name}: broke the HTTP exchange") from None
        except ssl.SSLError as exc:
            raise HubDown(f"hub {self.name}: TLS: {exc.reason}") from None

    async def _exchange(
        self, conn: _Conn, request: h11.Request, body: bytes | None, limit: int, *, reused: bool
    ) -> HubReply:
        keep = False
        try:
            data = conn.h11.send(request) or b""
            if body:
                data += conn.h11.send(h11.Data(data=body)) or b""
            data += conn.h11.send(h11.EndOfMessage()) or b""
            try:
                await conn.stream.send_all(data)
                response = await self._next(conn)
            except (
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                OSError,
                h11.RemoteProtocolError,
                _Stale,
            ):
                # nothing of an answer came: a kept-open connection the hub closed meanwhile
                if reused:
                    raise _Stale from None
                raise
            if not isinstance(response, h11.Response):
                raise HubDown(f"hub {self.name}: no HTTP response")
            chunks = bytearray()
            pieces, max_pieces = 0, wire.body_pieces(limit)
            while True:
                try:
                    event = await self._next(conn)
                except _Stale:
                    raise HubDown(f"hub {self.name}: the answer ended early") from None
                if isinstance(event, h11.Data):
                    chunks += event.data
                    pieces += 1
                    if len(chunks) > limit:
                        raise HubDown(f"hub {self.name}: the answer is larger than {limit} bytes")
                    if pieces > max_pieces:
                        raise HubDown(
                            f"hub {self.name}: the answer came in more than {max_pieces} pieces"
                        )
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    raise HubDown(f"hub {self.name}: the answer ended early")
            signature = None
            for name, value in response.headers:
                if name == b"dske-signature":
                    signature = value.decode("latin-1")
            if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
                conn.h11.start_next_cycle()
                keep = True
            return HubReply(response.status_code, bytes(chunks), signature)
        finally:
            if keep:
                self._idle.append(conn)
            else:
                await trio.aclose_forcefully(conn.stream)

    async def _next(self, conn: _Conn) -> object:
        while True:
            event = conn.h11.next_event()
            if event is not h11.NEED_DATA:
                if isinstance(event, h11.ConnectionClosed):
                    raise _Stale
                return event
            data = await conn.stream.receive_some(64 * 1024)
            conn.h11.receive_data(bytes(data))
