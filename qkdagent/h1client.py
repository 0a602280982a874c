"""A lean HTTP/1.1 client over TLS (`tlsstream`): kept-alive connections, bounded replies.

Used for the peer API and offered to plugins (`qkdagent.HttpClient`) for their servers'
APIs (a KME's), where httpx's per-request cost showed the same way.

Why not httpx here: a rotation makes a few small requests to one peer, and httpx spent most of
the initiator's CPU per rotation on them (about 3 ms of Python for two posts: its async context
managers, URL parsing, a poll() of every idle connection in the pool, a `getpeercert()` per
reply). This client does only what the peer path needs, with llhttp parsing the replies and
writing only checked request heads (`h1wire`):

- one connection per request in flight, kept alive and reused (LIFO) per host; an idle
  connection the server has closed is noticed before reuse (it reads as readable), and a
  request on a reused connection that gets no reply byte at all (EOF or a reset, as when the
  server's close crossed the request) is sent once more on a new one
  (the peer protocol answers a repeated request idempotently);
- the server's certificate names are read once per connection;
- a reply is read at most `limit` bytes, undecoded (no content encoding is asked for or
  accepted), and the caller bounds the whole request in time (`trio.fail_after`).
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import urlsplit

import trio

from .h1wire import BadHttp, Header, ReplyParser, caller_header, check_header, request_head
from .identity import PeerIdentity
from .tlsstream import TlsStream

MAX_ERROR = 64 * 1024
"""Largest error reply read when a streamed one was asked for."""
MAX_PIECES = 4096
"""Body pieces one reply may come in (and one request to the peer server, `peerserver`, as
body events of `h1request`): a body of one-byte chunks or TLS records costs far more to parse
than its size says (an honest one arrives in records of up to 16 KiB, a few dozen)."""
MAX_HEAD = 16 * 1024
"""Largest reply head: bytes read while it is incomplete (`h1wire.ReplyParser`)."""


OnData = Callable[[bytes, PeerIdentity], None]
"""Takes a streamed reply's body piece by piece, with the names in the certificate of the
server sending it; what it raises ends the request."""


class TransportError(Exception):
    """The request could not be completed (connection, TLS or HTTP framing); its message
    names what, never the body."""


class ConnectFailed(TransportError):
    """No connection could be made (refused, unreachable, timed out, TLS handshake refused):
    nothing was sent."""


class ReplyTooLarge(TransportError):
    """The reply is over the caller's limit, or encoded: the rest is not read."""


class EncodedReply(ReplyTooLarge):
    """The reply has a content encoding, though none was asked for (it could expand without
    bound): it is not read."""


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    identity: PeerIdentity = field(default_factory=PeerIdentity)
    """The names in the certificate the answering server presented (none over plain HTTP)."""
    certificate: bytes | None = field(default=None, repr=False)
    """That certificate, DER (None over plain HTTP)."""


@dataclass
class _Connection:
    stream: TlsStream | trio.SocketStream
    identity: PeerIdentity
    certificate: bytes | None
    idle_since: float = field(default=0.0)

    def expired(self, now: float, expiry: float) -> bool:
        """Idle for longer than `expiry`."""
        return now - self.idle_since > expiry

    def stale(self, now: float, expiry: float) -> bool:
        """Too long idle, or the server closed it meanwhile (EOF or an alert is readable)."""
        if self.expired(now, expiry):
            return True
        stream = self.stream
        tcp = stream.transport_stream if isinstance(stream, TlsStream) else stream
        return bool(tcp.socket.is_readable())

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass


@dataclass(frozen=True)
class _Origin:
    host: str
    port: int
    authority: str
    prefix: str
    """The base URL's path (a KME under https://host/kme1), prepended to each target."""
    headers: tuple[Header, ...]
    """What every request to it starts with: host, and no content encoding accepted."""


class H1Client:
    """Kept-alive HTTP/1.1 connections to a few origins (peers, KMEs); not thread-safe.

    HTTPS with `context`; plain HTTP only with `context=None` and `plain_http=True` (an
    explicit, insecure opt-in of the caller's: nothing is authenticated or secret then).
    """

    def __init__(
        self,
        context: ssl.SSLContext | None,
        *,
        plain_http: bool = False,
        headers: Sequence[tuple[str, str]] = (),
        idle_expiry: float = 100.0,
        max_idle_per_origin: int = 64,
        max_per_origin: int | None = None,
        connect_timeout: float | None = None,
        timeout: float | None = 60.0,
        resend_unanswered: bool = True,
    ) -> None:
        if (context is None) != plain_http:
            raise ValueError("HTTPS needs an SSL context; plain HTTP needs plain_http=True")
        if max_per_origin is not None and (
            not isinstance(max_per_origin, int) or isinstance(max_per_origin, bool)
            or max_per_origin < 1
        ):  # fmt: skip
            raise ValueError("max_per_origin must be an integer of at least 1")
        self._context = context
        self._scheme = "http" if plain_http else "https"
        self._headers = [caller_header(k.encode(), v.encode()) for k, v in headers]
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._busy: dict[_Origin, int] = {}
        """Requests (and `warm`s) under way per origin: each gives a connection back."""
        self._origins: dict[str, _Origin] = {}
        self.idle_expiry = idle_expiry
        self.max_idle = max_idle_per_origin
        self.max_per_origin = max_per_origin
        """Most requests (each on its own connection) under way to one origin (a base URL:
        scheme, host, port and path) at once, and so most connections open to it (a request
        takes a kept one if there is one); a request past it waits, first come first served,
        for one to end (`request`'s `wait_timeout` bounds the wait). None: no bound (the peer
        client's batches bound its requests). A server that counts its clients' connections (a
        KME) sees no more, and a burst of requests does not open connections the idle pool
        then closes (each a TLS handshake: at 2,000 links through ETSI 014 KMEs, 2.62-3.45 ms
        of CPU a rotation with 4 kept and no bound, 2.03-2.32 ms with a bound of 8, all kept,
        issue 18)."""
        self._slots: dict[_Origin, trio.Semaphore] = {}
        self.connections_made = 0
        """Connections made so far (over HTTPS, each a completed TLS handshake)."""
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.resend_unanswered = resend_unanswered
        """Whether a request a kept connection took and never answered is sent once more on a
        new one. Right for requests the server answers idempotently (the peer API); wrong
        where each request consumes something (a KME's keys): False raises instead."""
        """Each request's total deadline (`trio.TooSlowError`), a backstop: callers bound their
        calls more tightly themselves (`trio.fail_after`)."""
        self._closed = False

    def _origin(self, base_url: str) -> _Origin:
        origin = self._origins.get(base_url)
        if origin is None:
            try:
                parts = urlsplit(base_url)
                port = parts.port or (443 if parts.scheme == "https" else 80)
            except ValueError:
                raise TransportError(f"not a usable URL: {base_url[:200]!r}") from None
            host = parts.hostname
            if parts.scheme != self._scheme or not host or parts.query or parts.fragment:
                raise TransportError(f"not a {self._scheme}://HOST[:PORT] URL: {base_url[:200]!r}")
            authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            try:
                headers = (
                    check_header(b"host", authority.encode()),
                    (b"accept-encoding", b"identity"),
                )
            except (ValueError, UnicodeError):
                raise TransportError(f"not a usable URL: {base_url[:200]!r}") from None
            origin = _Origin(host, port, authority, parts.path.rstrip("/"), headers)
            if len(self._origins) < 4096:
                self._origins[base_url] = origin
        return origin

    async def post(
        self, base_url: str, path: str, body: bytes, *, limit: int, on_data: OnData | None = None
    ) -> Reply:
        """POST `body` to `path` at `base_url`; the reply body is read up to `limit` bytes
        (given to `on_data` piece by piece as it arrives, if it is a 2xx and `on_data` given:
        the `Reply` then has an empty body)."""
        return await self.request("POST", base_url, path, body, limit=limit, on_data=on_data)

    async def request(
        self,
        method: str,
        base_url: str,
        target: str,
        body: bytes | None = None,
        *,
        headers: Sequence[tuple[str, str]] = (),
        limit: int,
        on_data: OnData | None = None,
        exchange_timeout: float | None = None,
        wait_timeout: float | None = None,
    ) -> Reply:
        """One request (`target`: path and query under `base_url`); the reply body is read up
        to `limit` bytes. `ConnectFailed` when no connection could be made; `trio.TooSlowError`
        past the client's `timeout`, or past `exchange_timeout` seconds for the exchange itself
        (connect, send, reply), counted from when the request may have its connection
        (`max_per_origin`), so that one which waited for it is not left less time after
        sending. `wait_timeout`: seconds it may wait for that, past which `ConnectFailed`
        (nothing was sent)."""
        request = partial(
            self._request, method, base_url, target, body, headers, limit, on_data,
            exchange_timeout=exchange_timeout, wait_timeout=wait_timeout,
        )  # fmt: skip
        if self.timeout is None:  # the caller's deadline only (the peer client's)
            return await request()
        with trio.fail_after(self.timeout):
            return await request()

    async def _request(
        self,
        method: str,
        base_url: str,
        target: str,
        body: bytes | None,
        headers: Sequence[tuple[str, str]],
        limit: int,
        on_data: OnData | None = None,
        *,
        exchange_timeout: float | None = None,
        wait_timeout: float | None = None,
    ) -> Reply:
        origin = self._origin(base_url)
        fields = [*origin.headers]
        if body is not None:
            fields.append((b"content-length", b"%d" % len(body)))
        try:
            fields += self._headers
            fields += (caller_header(k.encode(), v.encode()) for k, v in headers)
            head = request_head(method, origin.prefix + target, fields)
        except (ValueError, UnicodeError) as exc:
            raise TransportError(f"request cannot be sent: {exc}") from None
        args = (head, body, limit, on_data)
        self._busy[origin] = self._busy.get(origin, 0) + 1
        slots = self._slot(origin)
        try:
            if slots is not None:
                await self._wait_for_slot(origin, slots, wait_timeout)
            try:
                if exchange_timeout is None:
                    return await self._exchange_on(origin, args)
                with trio.fail_after(exchange_timeout):
                    return await self._exchange_on(origin, args)
            finally:
                if slots is not None:
                    self._release(origin, slots)
        finally:
            self._done(origin)

    def _slot(self, origin: _Origin) -> trio.Semaphore | None:
        """The origin's bound on requests under way (None: no bound); take it at once, with
        no await between (`_release` drops a semaphore none holds or waits for)."""
        if self.max_per_origin is None:
            return None
        slots = self._slots.get(origin)
        if slots is None:
            bound = self.max_per_origin
            slots = self._slots[origin] = trio.Semaphore(bound, max_value=bound)
        return slots

    async def _wait_for_slot(
        self, origin: _Origin, slots: trio.Semaphore, wait_timeout: float | None
    ) -> None:
        try:
            slots.acquire_nowait()  # (no pass of the loop while one is free)
            return
        except trio.WouldBlock:
            pass
        with trio.move_on_after(math.inf if wait_timeout is None else wait_timeout) as waited:
            await slots.acquire()
        if waited.cancelled_caught:
            raise ConnectFailed(
                f"no connection to {origin.authority} free within {wait_timeout:g} s: all "
                f"{slots.max_value} allowed at once were busy (a slow server, or too few "
                "allowed); nothing was sent"
            )

    def _release(self, origin: _Origin, slots: trio.Semaphore) -> None:
        """Give the slot back (to the first waiter, if any); forget the semaphore once nothing
        holds or waits for it, so that the client keeps one per origin in use only."""
        slots.release()
        # (its own bound, not `max_per_origin`, which a caller may have changed since)
        if slots.value == slots.max_value and self._slots.get(origin) is slots:
            del self._slots[origin]

    async def _exchange_on(
        self, origin: _Origin, args: tuple[bytes, bytes | None, int, OnData | None]
    ) -> Reply:
        """The request on a kept connection, else (or once more, if it was never answered and
        may be resent) on a new one."""
        connection = await self._take(origin)
        if connection is not None:
            try:
                return await self._exchange(origin, connection, *args)
            except _NoReply:
                if not self.resend_unanswered:
                    raise TransportError(
                        f"{origin.authority} closed a kept connection without answering: "
                        "the request may have been executed; it is not sent again"
                    ) from None
                # most likely closed by the server before it took the request: anew
        connection = await self._connect(origin)
        try:
            return await self._exchange(origin, connection, *args)
        except _NoReply as exc:
            raise TransportError(f"{origin.authority} closed the connection: {exc}") from None

    def _done(self, origin: _Origin) -> None:
        left = self._busy.pop(origin, 1) - 1
        if left:
            self._busy[origin] = left

    def needs_warm(self, base_url: str) -> bool:
        """Whether `warm(base_url)` would do anything now: no request (or other `warm`) to
        its origin is under way, and no connection is idle there, or one idle too long is
        (to close). `TransportError` for a URL `warm` would refuse."""
        return self._needs_warm(self._origin(base_url))

    def _needs_warm(self, origin: _Origin) -> bool:
        if self._busy.get(origin):
            return False  # a connection comes back when that request ends
        idle = self._idle.get(origin)
        return not idle or idle[0].expired(trio.current_time(), self.idle_expiry)

    async def warm(self, base_url: str) -> bool:
        """Have a kept-alive connection to `base_url`'s origin ready for the next request:
        open one now if none is idle and fresh (expired ones are closed) and no request (or
        other `warm`) to it is under way, so that the connection (a TLS handshake, a few ms)
        comes before that request rather than on its path. Whether one was opened and kept.
        `ConnectFailed` as for a request; `trio.TooSlowError` past the client's `timeout`."""
        origin = self._origin(base_url)
        if not self._needs_warm(origin):
            return False
        slots = self._slot(origin)
        if slots is not None:  # held until the connection is kept or closed: a request
            try:  # meanwhile waits for it
                slots.acquire_nowait()
            except trio.WouldBlock:  # (no request is under way, so one is free: defensive)
                return False
        self._busy[origin] = 1
        try:
            with trio.fail_after(self.timeout if self.timeout is not None else math.inf):
                await self._close_expired(origin)
                if self._idle.get(origin):
                    return False  # (whether its server closed it, the request's `_take` sees)
                connection = await self._connect(origin)
            if self._give_back(origin, connection):
                return True
            await connection.aclose()
            return False
        finally:
            self._done(origin)
            if slots is not None:
                self._release(origin, slots)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                await connection.aclose()

    # -- connections ---------------------------------------------------------------------------

    async def _close_expired(self, origin: _Origin) -> None:
        """Close every idle connection to `origin` idle too long (`_take` takes from the top:
        older ones would otherwise wait at the bottom for good, their server long gone)."""
        idle = self._idle.get(origin)
        now = trio.current_time()
        # given back in turn, on top: the one at the bottom has been idle longest
        if idle and idle[0].expired(now, self.idle_expiry):
            expired = [c for c in idle if c.expired(now, self.idle_expiry)]
            idle[:] = [c for c in idle if not c.expired(now, self.idle_expiry)]
            for connection in expired:
                await connection.aclose()

    async def _take(self, origin: _Origin) -> _Connection | None:
        """The most recently used idle connection that is still fresh (expired ones closed)."""
        await self._close_expired(origin)
        idle = self._idle.get(origin)
        now = trio.current_time()
        while idle:
            connection = idle.pop()
            if not connection.stale(now, self.idle_expiry):
                return connection
            await connection.aclose()
        return None

    def _give_back(self, origin: _Origin, connection: _Connection) -> bool:
        idle = self._idle.setdefault(origin, [])
        if self._closed or len(idle) >= self.max_idle:
            return False
        connection.idle_since = trio.current_time()
        idle.append(connection)
        return True

    async def _connect(self, origin: _Origin) -> _Connection:
        timeout = self.connect_timeout if self.connect_timeout is not None else float("inf")
        with trio.move_on_after(timeout) as scope:
            connection = await self._open(origin)
        if scope.cancelled_caught:
            raise ConnectFailed(f"cannot connect to {origin.authority}: timed out")
        return connection

    async def _open(self, origin: _Origin) -> _Connection:
        try:
            tcp = await trio.open_tcp_stream(origin.host, origin.port)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ConnectFailed(f"cannot connect to {origin.authority}: {reason}") from None
        if self._context is None:
            self.connections_made += 1
            return _Connection(tcp, PeerIdentity(), None)
        stream = TlsStream(tcp, self._context, server_hostname=origin.host)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            await tcp.aclose()
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            raise ConnectFailed(f"TLS with {origin.authority} failed: {cause}") from None
        except BaseException:
            await tcp.aclose()
            raise
        peercert = stream.getpeercert()
        identity = PeerIdentity.from_peercert(peercert) if peercert else PeerIdentity()
        der = stream.getpeercert(binary_form=True)
        self.connections_made += 1
        return _Connection(stream, identity, der if isinstance(der, bytes) else None)

    # -- one request ---------------------------------------------------------------------------

    async def _exchange(
        self,
        origin: _Origin,
        connection: _Connection,
        head: bytes,
        body: bytes | None,
        limit: int,
        on_data: OnData | None,
    ) -> Reply:
        keep = False
        try:
            try:
                await connection.stream.send_all(head + body if body else head)
            except trio.BrokenResourceError as exc:
                raise _NoReply(f"reset while sending ({exc})") from None
            status, payload, keep = await self._read(connection, limit, on_data)
            # bytes after the reply are no answer to anything we sent: never reuse
            keep = keep and not (
                isinstance(connection.stream, TlsStream) and connection.stream.buffered()
            )
            return Reply(status, payload, connection.identity, connection.certificate)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TransportError(f"connection to {origin.authority} broke: {exc}") from None
        except BadHttp as exc:
            raise TransportError(f"bad HTTP from {origin.authority}: {exc}") from None
        finally:
            if not (keep and self._give_back(origin, connection)):
                await connection.aclose()

    async def _read(
        self, connection: _Connection, limit: int, on_data: OnData | None = None
    ) -> tuple[int, bytes, bool]:
        """The reply's status and body, and whether the connection may be reused."""
        status = 0
        chunks: list[bytes] = []
        size = pieces = 0

        def head(code: int, headers: list[Header]) -> None:
            nonlocal status, on_data, limit
            status = code
            _check_head(headers, limit)
            if not 200 <= status < 300 and on_data is not None:
                on_data, limit = None, min(limit, MAX_ERROR)  # an error, read whole

        def piece(data: bytes) -> None:
            nonlocal size, pieces
            size += len(data)
            pieces += 1
            if size > limit:
                raise ReplyTooLarge(f"reply larger than {limit} bytes")
            if pieces > MAX_PIECES:
                raise ReplyTooLarge(f"reply in more than {MAX_PIECES} pieces")
            if on_data is not None:
                on_data(data, connection.identity)
            else:
                chunks.append(data)

        parser = ReplyParser(head, piece, max_head=MAX_HEAD)
        while not parser.done:
            try:
                data = await connection.stream.receive_some(65536)
            except trio.BrokenResourceError as exc:
                if parser.started:
                    raise
                raise _NoReply(f"reset before any reply byte ({exc})") from None
            if not data:
                if not parser.started:
                    raise _NoReply("no reply")
                parser.eof()
                break
            parser.feed(bytes(data))
        return status, b"".join(chunks), parser.reusable


class _NoReply(Exception):
    """The connection ended (closed or reset) before any byte of a reply: the server never
    took the request."""


def _check_head(headers: Iterable[tuple[bytes, bytes]], limit: int) -> None:
    for name, value in headers:
        if name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            encoding = value.strip()[:40].decode("ascii", "replace")
            raise EncodedReply(f"reply has a content encoding ({encoding!r}), not asked for")
        if name == b"content-length":
            digits = value.strip().lstrip(b"0")  # (int() refuses more than 4,300 digits)
            if digits.isdigit() and (len(digits) > 19 or int(digits) > limit):
                raise ReplyTooLarge(f"reply declares more than {limit} bytes")
