"""A lean HTTP/1.1 server loop: h11 on one trio stream, one task per connection.

Why not hypercorn for HTTP/1.1: profiling the simulator under keep-alive load showed ~85 % of the
server's CPU per request in hypercorn's per-request machinery (a task, memory channels, locks and
cancel scopes per request, and one TLS record plus one send() per h11 event, i.e. two to three
sends per answer) and under 10 % in the KME app. This loop parses with h11 (strict RFC 9112
parsing, header size limit), calls the same ASGI-style app, and writes each answer with a single
send. HTTP/2 connections still go to hypercorn (see `server.py`).

Limits: the idle keep-alive wait and each request (head, body, answer) are bounded in time; a
body the app did not read (it answered early, e.g. "too large") is discarded up to `drain_limit`
bytes, beyond that (or if the client still waits for "100 Continue") the connection is closed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote
from wsgiref.handlers import format_date_time

import h11
import trio

log = logging.getLogger(__name__)

Message = dict[str, Any]
Handler = Callable[
    [dict[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Any]], Any
]

SERVER_HEADER = (b"server", b"qkdagent-kme-sim")
_INTERNAL_ERROR = b'{"message":"internal error in the KME simulator"}'


@dataclass(frozen=True)
class Http1Limits:
    keep_alive_timeout: float = 30.0
    """Seconds an idle connection may wait for its next request."""
    request_timeout: float = 30.0
    """Seconds for one exchange: the rest of the request head and body, the app, the answer."""
    max_head: int = 16 * 1024
    """Largest request line plus headers (h11 answers 431 beyond)."""
    drain_limit: int = 1 << 20
    """Request body bytes discarded after an early answer before the connection is closed."""
    max_body_pieces: int = 4096
    """Reads (h11 `Data` events) a request body may come in, taken or discarded: one of
    one-byte chunks costs about 5 us a piece to parse (an honest one comes in a few)."""
    read_size: int = 64 * 1024


class _Date:
    """The Date header value, formatted once per second."""

    second = -1
    value = b""

    @classmethod
    def header(cls) -> tuple[bytes, bytes]:
        now = int(time.time())
        if now != cls.second:
            cls.value = format_date_time(now).encode("ascii")
            cls.second = now
        return (b"date", cls.value)


def _head_size(request: h11.Request) -> int:
    size = len(request.method) + len(request.target) + 12
    for name, value in request.headers:
        size += len(name) + len(value) + 4
    return size


class _Abort(Exception):
    """Stop serving this connection (peer gone, protocol error already answered, app bug)."""


class Http1Connection:
    """Serves HTTP/1.1 requests on `stream` until the peer closes, a limit hits or an error."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        app: Handler,
        *,
        limits: Http1Limits,
        scheme: str = "https",
        server: tuple[str, int] | None = None,
        client: tuple[str, int] | None = None,
    ) -> None:
        self.stream = stream
        self.app = app
        self.limits = limits
        self.scheme = scheme
        self.server = server
        self.client = client
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head)
        self._pieces = 0
        """Body reads of the current request, taken and discarded alike."""

    async def serve(self) -> None:
        try:
            with trio.CancelScope() as self._deadline:
                await self._loop()
        finally:
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await self.stream.aclose()
            if cleanup.cancelled_caught:
                await trio.aclose_forcefully(self.stream)

    async def _loop(self) -> None:
        conn, limits = self.conn, self.limits
        try:
            while True:
                self._deadline.deadline = trio.current_time() + limits.keep_alive_timeout
                event = await self._next_event()
                if not isinstance(event, h11.Request):
                    return  # ConnectionClosed (or PAUSED, which cannot happen at IDLE)
                if _head_size(event) > limits.max_head:  # h11 only bounds incomplete heads
                    await self._send_error(431)
                    return
                self._deadline.deadline = trio.current_time() + limits.request_timeout
                await self._exchange(event)
                if conn.our_state is not h11.DONE or not await self._drain():
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await self._send_error(exc.error_status_hint)
        except (_Abort, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _next_event(self) -> Any:
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.stream.receive_some(self.limits.read_size)
            conn.receive_data(bytes(data))  # a no-op for bytes; Stream may return a bytearray

    async def _exchange(self, request: h11.Request) -> None:
        target: bytes = request.target
        raw_path, _, query = target.partition(b"?")
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.http_version.decode("ascii"),
            "method": request.method.decode("ascii"),
            "scheme": self.scheme,
            "path": unquote(raw_path.decode("ascii")),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": list(request.headers),
            "client": self.client,
            "server": self.server,
        }
        head_only = request.method == b"HEAD"
        started: list[Any] = []
        body: list[bytes] = []
        sent = False
        self._pieces = 0

        async def receive() -> Message:
            if self.conn.their_state is not h11.SEND_BODY:
                return {"type": "http.disconnect"}
            if self._pieces > self.limits.max_body_pieces:
                return {"type": "http.disconnect"}
            if self.conn.they_are_waiting_for_100_continue:
                await self.stream.send_all(
                    self.conn.send(h11.InformationalResponse(status_code=100, headers=[]))
                )
            event = await self._next_event()
            if isinstance(event, h11.Data):
                self._pieces += 1
                if self._pieces > self.limits.max_body_pieces:
                    return {"type": "http.disconnect"}  # the app refuses it; `_drain` closes
                return {"type": "http.request", "body": bytes(event.data), "more_body": True}
            if isinstance(event, h11.EndOfMessage):
                return {"type": "http.request", "body": b"", "more_body": False}
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal sent
            kind = message["type"]
            if kind == "http.response.start" and not started:
                started.append(message)
                return
            if kind != "http.response.body" or not started or sent:
                raise RuntimeError(f"unexpected ASGI message {kind!r}")
            body.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            sent = True
            start = started[0]
            headers = [*start.get("headers", ()), _Date.header(), SERVER_HEADER]
            conn = self.conn
            data = conn.send(h11.Response(status_code=start["status"], headers=headers))
            payload = b"".join(body)
            if payload and not head_only:
                data += conn.send(h11.Data(data=payload))
            data += conn.send(h11.EndOfMessage())
            await self.stream.send_all(data)

        try:
            await self.app(scope, receive, send)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            raise
        except Exception:
            log.exception("KME app failed on %s %s", scope["method"], scope["raw_path"][:100])
            if not sent:
                await self._send_error(500, _INTERNAL_ERROR)
            raise _Abort from None
        if not sent:
            log.error("KME app returned without answering %s", scope["raw_path"][:100])
            await self._send_error(500, _INTERNAL_ERROR)
            raise _Abort

    async def _drain(self) -> bool:
        """Discard what is left of the request body; False if the connection must close."""
        conn = self.conn
        if conn.their_state is h11.DONE:
            return True
        if conn.client_is_waiting_for_100_continue or conn.their_state is not h11.SEND_BODY:
            return False  # the client may never send the body we did not ask for
        budget = self.limits.drain_limit
        try:
            while conn.their_state is h11.SEND_BODY:
                if self._pieces > self.limits.max_body_pieces:
                    return False  # (the app was cut off, or the rest is as many pieces)
                event = await self._next_event()
                if isinstance(event, h11.Data):
                    budget -= len(event.data)
                    self._pieces += 1
                    if budget < 0:
                        return False
                elif not isinstance(event, h11.EndOfMessage):
                    return False
        except h11.RemoteProtocolError:
            return False
        return conn.their_state is h11.DONE

    async def _send_error(self, status: int, body: bytes = b"") -> None:
        """A final answer that closes the connection (protocol error or app failure)."""
        if not body:
            body = b'{"message":"malformed HTTP request"}'
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"connection", b"close"),
            _Date.header(),
            SERVER_HEADER,
        ]
        try:
            data = self.conn.send(h11.Response(status_code=status, headers=headers))
            data += self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage())
            await self.stream.send_all(data)
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
