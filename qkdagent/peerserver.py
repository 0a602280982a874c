"""The peer API server: trio TLS listener + HTTP/1.1 (`h1request`: llhttp), mutual TLS, the
client certificate's names handed to the handler, and hard limits on what an unauthenticated
network can hold.

Why not hypercorn: it does not expose the client certificate to the application (so the
responder could not check `peer_identity`), has no handshake timeout or connection caps, and
at EMFILE it logged a traceback per accept while rotations stalled. This server is small:

- `POST /v1/links/<link>/<rotate|commit|resync|announce>` only (404 other paths, 405 other
  methods, 413 bodies over `protocol.MAX_BODY` refused from content-length or while streaming,
  411 a transfer-encoding (bodies come with a content-length, in at most `h1client.MAX_PIECES`
  reads, heads in at most `HEAD_READS`), 400 malformed HTTP or a protocol switch, 431 a head
  over `max_head`, 505 a version
  other than 1.0 and 1.1); JSON replies with content-length; HTTP/1.1 keep-alive (pipelined
  requests are answered in turn; HTTP/1.0 gets one answer and a close). A handler may
  reply before it returns (`peering.ReplyNow`: the responder acknowledges a durable commit,
  then installs): for the actions that may (`EARLY_REPLY`) it runs as a task of its own, so
  what it does after replying holds up neither the reply nor the connection's next request
  (another link's, say); the others run in the connection's task and get no `reply_now`
  (a task per request cost two more passes of the event loop on a rotation's path, issue 18).
- Which connections to keep is decided by `admission.py` (handshaking connections capped
  separately, the oldest evicted first; per-address and total caps; idle ones shed under
  pressure; a per-address budget for evictions, beyond which newcomers are refused at accept).
  The descriptor limit is raised to the hard limit at start and the caps stay `fd_reserve`
  below it, so rotations, the state database, sinks and erases keep descriptors.
- Sockets that never send a byte stay in the kernel (Linux `TCP_DEFER_ACCEPT`, for about the
  handshake timeout): no descriptor, task or CPU here, and no evict-and-reopen loop with an
  attacker who reopens every socket we close. Unauthenticated connections that we drop
  (evicted, refused, silent past the deadline) are reset (RST), leaving no TIME_WAIT behind.
- Every phase of a connection has a deadline: the TLS handshake, the idle wait between
  requests, the request head and body (slow senders are closed) and the reply.
- A certificate naming no peer costs its address a stranger token; an address out of them is
  refused at accept, so strangers reopening at once cannot make us handshake in a loop.
- Refused requests cost a budget per source address and client certificate
  (`refusal_rate`), charged as each is refused (a batch's items one by one, whatever becomes
  of the connection): beyond it, every connection with that address and certificate, old or
  new, waits for the tokens they reserved before it handles its next request, so a holder of
  a CA certificate flooding forged requests gets a bounded share of the CPU however many
  connections it opens, at once or one after another; other connections never wait. A
  handler's 409 for one of the client's own links first spends that link's allowance (two,
  one back every 10 minutes, per link): an honest peer recovering every link at once (a
  restored backup: its announce and rotate refused, epoch) is not paced.
- Refused requests and dropped connections are counted (Prometheus) and summarised in one log
  line per minute; only the first few of each minute get a line of their own. A failing
  connection is logged by exception type at debug, never with a traceback.
"""

from __future__ import annotations

import collections
import errno
import logging
import math
import resource
import socket
import ssl
import struct
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import trio

from . import batchwire
from .admission import Admission, Tally, TokenBuckets, address_key, connection_caps
from .config import Address, TlsFiles
from .errors import ProtocolError
from .h1client import MAX_PIECES
from .h1request import (
    CONTINUE,
    END,
    LAST_CHUNK,
    BadRequest,
    Event,
    Request,
    RequestReader,
    chunk,
    reply_head,
)
from .identity import PeerIdentity
from .protocol import MAX_BODY, error_body
from .tlsclient import load_tls_identity
from .tlsstream import TlsStream

if TYPE_CHECKING:
    from .observability import Metrics
    from .peering import Handler, ReplyNow

log = logging.getLogger(__name__)

ACTIONS = tuple(action.encode() for action in batchwire.ACTIONS)
EARLY_REPLY = frozenset({"commit"})
"""The actions whose handler may answer before it returns (`peering.ReplyNow`)."""
BATCH_PATH = b"/v1/batch"
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_READ_SIZE = 16 * 1024
HEAD_READS = 64
"""Reads a request head may come in, line ends before it included: our clients send it in
one. Each read is a TLS record to decrypt and a parser call: in one-byte records, the 32 KiB
a head may take cost 0.27 s of CPU for one refusal token (review finding)."""
LINK_ALLOWANCES = 1 << 17
"""Links' refusal allowances remembered (only configured links get one; past this many, the
least recently used is forgotten and starts full again)."""
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, no TIME_WAIT


@dataclass(frozen=True)
class ServerLimits:
    """Limits of the peer listener; the defaults suit a gateway with up to a few hundred peers.

    A peer agent keeps up to its `max_parallel_rotations` (default 64) connections to us, so
    `max_per_address` stays above that.
    """

    max_connections: int = 512
    """Connections held at once (lowered to fit the descriptor limit minus `fd_reserve`)."""
    max_per_address: int = 128
    """Connections from one IPv4 address or IPv6 /64."""
    max_per_identity: int = 128
    """Established connections per client certificate identity: one agent (even a
    compromised peer) cannot hold the slots the other peers' connections need."""
    max_handshaking: int = 128
    """Connections before mutual TLS is done; beyond it the oldest of them is closed."""
    handshake_timeout: float = 5.0
    """Seconds from accept to a finished TLS handshake."""
    request_timeout: float = 10.0
    """Seconds from a request's first byte to its last, and for writing the reply."""
    idle_timeout: float = 120.0
    """Seconds an established connection may wait for its next request (the agent's own
    client keeps connections for 100 s); idle connections are closed earlier under pressure."""
    fd_reserve: int = 256
    """Descriptors kept free of connections, for rotations, state, sinks and erases."""
    max_head: int = 16 * 1024
    """Request line plus headers."""
    discard_limit: int = 1 << 20
    """A refused body up to this size is read and dropped so the client sees the answer."""
    summary_interval: float = 60.0
    """Seconds between summary lines of refused requests and dropped connections."""
    defer_accept: bool = True
    """Leave connections that have sent nothing in the kernel for about `handshake_timeout`
    (Linux; elsewhere ignored). Peers speak first (TLS ClientHello), so they never wait."""
    churn_rate: float = 16.0
    """Unauthenticated connections one address may push out per second when crowded."""
    churn_burst: float = 64.0
    """... and at once (a peer opens up to its `max_parallel_rotations` together)."""
    refusal_rate: float = 10.0
    """Refused requests per second one address gets answered before its refused connections
    wait (a peer agent backs off after a refusal, so it stays far below)."""
    refusal_burst: float = 20.0
    """... and at once."""
    link_refusal_burst: float = 2.0
    """409 refusals of a handler's answers for a link the client's certificate serves
    (`serves`) that go on the link's allowance instead of the client's budget. A responder
    restored from an old backup refuses each link's next announce and rotate (409, epoch)
    and the link resynchronises: on the client's budget alone, 10,000 links recovered at 10
    a second, past `reject_after` for most of them (review finding). 409 is what an honest
    peer's stale state gets; forged requests (403) and malformed ones (400) never spend it.
    Keyed by link, not by address or certificate: however many addresses and certificates
    name a link's peer, they share its two."""
    link_refusal_rate: float = 1 / 600
    """... and each link's allowance comes back at this rate (one per 10 minutes)."""
    stranger_rate: float = 1.0
    """Handshakes per second by certificates naming no peer that one address gets before its
    new connections are refused at accept (before any TLS work)."""
    stranger_burst: float = 8.0
    """... and at once."""
    max_batches_per_identity: int = 8
    """Batch requests (of up to 64 items and 512 KiB each) under way per client identity,
    from the moment their head is read: past it a batch is answered 503 unread. The agent's
    own client keeps at most 8 under way to a peer (`peerbatch.MAX_OUTSTANDING`)."""


def server_ssl_context(tls: TlsFiles) -> ssl.SSLContext:
    """TLS ≥ 1.2, a client certificate from the deployment CA required."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    load_tls_identity(ctx, tls.cert, tls.key, what="agent.tls")
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def raise_nofile_limit() -> int:
    """Raise the soft descriptor limit to the hard one (systemd's default soft limit is
    1,024); returns the soft limit in force. Refused (e.g. a seccomp filter) is not an error."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:
            log.debug("cannot raise the descriptor limit: %s", type(exc).__name__)
    return soft


async def serve_peers(
    handler: Handler,
    *,
    listen: Address,
    tls: TlsFiles,
    limits: ServerLimits,
    metrics: Metrics | None = None,
    is_peer: Callable[[PeerIdentity], bool] | None = None,
    serves: Callable[[PeerIdentity, str], bool] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the peer API on `listen` until cancelled; `task_status` gets its URLs.

    `is_peer` says whether a client certificate names a peer of one of the agent's links: a
    connection whose certificate names none is reset right after the handshake, so holders
    of other deployment-CA certificates never take an established slot. `serves` says
    whether it names the peer of a given link: a handler's 409s for that link go first on
    the link's own allowance (`ServerLimits.link_refusal_burst`)."""
    context = server_ssl_context(tls)
    soft = raise_nofile_limit()
    connections, handshaking = connection_caps(
        limits.max_connections, limits.max_handshaking, soft, limits.fd_reserve
    )
    churn = TokenBuckets(limits.churn_rate, limits.churn_burst)
    strangers = TokenBuckets(limits.stranger_rate, limits.stranger_burst)
    admission = Admission(
        connections, min(limits.max_per_address, connections), handshaking, churn, strangers
    )
    listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
    if limits.defer_accept:
        for listener in listeners:
            defer_accept(listener.socket, limits.handshake_timeout)
    urls = [_url(listener) for listener in listeners]
    log.debug(
        "peer API %s: up to %d connections (%d handshaking, %d per address), nofile %d",
        ", ".join(urls), connections, handshaking, admission.max_per_address, soft,
    )  # fmt: skip
    try:
        async with trio.open_nursery() as nursery:
            server = _Server(handler, context, limits, admission, metrics, nursery, is_peer, serves)
            for listener in listeners:
                nursery.start_soon(server.accept_loop, listener, nursery)
            nursery.start_soon(server.summaries)
            task_status.started(urls)
    finally:
        for listener in listeners:
            listener.socket.close()


def defer_accept(sock: trio.socket.SocketType, seconds: float) -> bool:
    """Have the kernel hand us a connection only once it has data (or after about `seconds`);
    False where the platform has no such option."""
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if option is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, max(1, math.ceil(seconds)))
    except OSError:
        return False
    return True


def reset(sock: trio.socket.SocketType) -> None:
    """Close with RST: for connections that never authenticated, nothing is owed to them."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    except OSError:
        pass
    sock.close()


def _url(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


class _Conn:
    """One accepted connection; admission keys on the object itself."""

    __slots__ = ("evicted", "host", "phase", "scope", "tcp")

    def __init__(self, tcp: trio.SocketStream, host: str) -> None:
        self.tcp = tcp
        self.host = host
        self.scope = trio.CancelScope()
        self.evicted = False
        self.phase = "handshake"

    def evict(self) -> None:
        """Close now (the descriptor is free at once; reset if it never authenticated) and
        stop its task."""
        self.evicted = True
        if self.phase == "handshake":
            reset(self.tcp.socket)
        else:
            self.tcp.socket.close()
        self.scope.cancel()


class _Close(Exception):
    """Stop serving this connection (already answered, or nothing worth answering)."""


class _Server:
    def __init__(
        self,
        handler: Handler,
        context: ssl.SSLContext,
        limits: ServerLimits,
        admission: Admission,
        metrics: Metrics | None,
        nursery: trio.Nursery,
        is_peer: Callable[[PeerIdentity], bool] | None = None,
        serves: Callable[[PeerIdentity, str], bool] | None = None,
    ) -> None:
        self.handler = handler
        self.nursery = nursery
        """Where each request's handler runs (and goes on after replying early)."""
        self.going_on: collections.Counter[PeerIdentity] = collections.Counter()
        """Handlers still running after their early reply, per client identity."""
        self.batches: collections.Counter[PeerIdentity] = collections.Counter()
        """Batch requests being read or answered, per client identity."""
        self.context = context
        self.limits = limits
        self.admission = admission
        self.metrics = metrics
        self.is_peer = is_peer
        self.per_identity: collections.Counter[PeerIdentity] = collections.Counter()
        self.tally = Tally()
        self.refusals = TokenBuckets(limits.refusal_rate, limits.refusal_burst)
        self.serves = serves
        self.link_refusals = TokenBuckets(
            limits.link_refusal_rate, limits.link_refusal_burst, max_keys=LINK_ALLOWANCES
        )
        """link -> its refusal allowance (`ServerLimits.link_refusal_burst`)."""

    # -- counting and logging ------------------------------------------------------------

    def admit_identity(self, conn: _Conn, identity: PeerIdentity) -> bool:
        """Only configured peers get an established slot, each at most `max_per_identity`."""
        if self.is_peer is not None and not self.is_peer(identity):
            reason = "not-a-peer"
            self.admission.stranger(conn.host, trio.current_time())
        elif self.per_identity[identity] >= self.limits.max_per_identity:
            reason = "identity-full"
        else:
            return True
        reset(conn.tcp.socket)
        self.dropped(conn, reason)
        log.debug("peer connection from %s (%s) refused: %s", conn.host,
                  identity.describe(), reason)  # fmt: skip
        return False

    def dropped(self, conn: _Conn | None, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.peer_connections_refused.labels(reason).inc()
        if self.tally.drop(reason):
            log.info("peer connection from %s closed: %s", conn.host if conn else "?", reason)

    def debt_paid(self, key: Hashable) -> float:
        """When the refusal tokens `key` (address and certificate) has reserved ahead are there
        (-inf when it has some left): none of its connections handles a request before."""
        now = trio.current_time()
        tokens = self.refusals.peek(key, now)
        return now - tokens / self.limits.refusal_rate if tokens < 0 else -math.inf

    def refused(self, status: int, what: str) -> None:
        if self.metrics is not None:
            self.metrics.peer_requests_refused.labels(str(status)).inc()
        if self.tally.refuse(status):
            log.info("refused %s (%d)", what, status)

    async def summaries(self) -> None:
        interval = self.limits.summary_interval
        while True:
            await trio.sleep(interval)
            line = self.tally.summary()
            if line:
                log.warning("peer API: %s in the last %g s", line, interval)

    # -- accepting -----------------------------------------------------------------------

    async def accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                tcp = await listener.accept()
            except OSError as exc:
                if exc.errno not in _OUT_OF_DESCRIPTORS:
                    raise
                self.dropped(None, "no-descriptors")
                victim = self.admission.shed()
                if isinstance(victim, _Conn):
                    victim.evict()
                await trio.sleep(0.05)  # back off: the pending connection stays queued
                continue
            try:
                host = str(tcp.socket.getpeername()[0])
            except OSError:  # reset before we looked
                tcp.socket.close()
                continue
            conn = _Conn(tcp, host)
            verdict = self.admission.admit(conn, host, trio.current_time())
            for victim, reason in verdict.evict:
                assert isinstance(victim, _Conn)
                victim.evict()
                self.dropped(victim, reason)
            if not verdict.admit:
                reset(tcp.socket)
                self.dropped(conn, verdict.reason or "refused")
                continue
            conn.scope.deadline = trio.current_time() + self.limits.handshake_timeout
            nursery.start_soon(self.serve_connection, conn)

    async def serve_connection(self, conn: _Conn) -> None:
        try:
            with conn.scope:
                # No TLS state until the client speaks: idle sockets cost a descriptor only.
                await trio.lowlevel.wait_readable(conn.tcp.socket)
                if not self.admission.hello(conn):
                    return
                stream = TlsStream(conn.tcp, self.context, server_side=True)
                try:
                    await stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    cause = getattr(exc.__cause__, "reason", None) or "handshake-failed"
                    self.dropped(conn, "handshake-failed")
                    log.debug("TLS handshake from %s failed: %s", conn.host, cause)
                    return
                identity = PeerIdentity.from_peercert(stream.getpeercert())
                if not self.admit_identity(conn, identity):
                    return
                self.per_identity[identity] += 1
                try:
                    if self.admission.established(conn):
                        await _Http(self, conn, stream, identity).serve()
                        with trio.move_on_after(1):  # a clean close (close_notify) if we can
                            await stream.aclose()
                finally:
                    self.per_identity[identity] -= 1
                    if not self.per_identity[identity]:
                        del self.per_identity[identity]
            if conn.scope.cancelled_caught and not conn.evicted:
                if conn.phase == "handshake":
                    reset(conn.tcp.socket)
                    self.dropped(conn, "handshake-timeout")
                elif conn.phase == "request":
                    self.dropped(conn, "request-timeout")
        except (_Close, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception as exc:  # one connection's failure never reaches the agent
            log.debug("peer connection from %s closed by %s", conn.host, type(exc).__name__)
        finally:
            self.admission.closed(conn)
            conn.tcp.socket.close()


class _Http:
    """HTTP/1.1 requests on one established connection, until it closes or a limit hits."""

    def __init__(
        self, server: _Server, conn: _Conn, stream: TlsStream, identity: PeerIdentity
    ) -> None:
        self.server = server
        self.limits = server.limits
        self.conn = conn
        self.stream = stream
        self.identity = identity
        self.reader = RequestReader(max_head=self.limits.max_head)
        self.request: Request | None = None
        """The request being answered."""
        self.answered = False
        """Whether the request being read or answered has had its answer (one per request)."""
        self.closing = False
        """Whether the connection closes after this answer (`connection: close` sent)."""
        self.continued = False
        """Whether `100 Continue` was sent for this request."""
        self.refusal_key = (address_key(conn.host), identity)
        """Whose refusal budget this connection's refused requests spend: its address's, for
        the certificate it presented."""
        self.penalty_until = -math.inf
        """When the refusal tokens this connection's refused requests reserved are there:
        it reads no request before (`_budget`, which also waits for its client's debt: a
        client opening a connection per refused request would otherwise never wait)."""

    def _phase(self, phase: str, timeout: float) -> None:
        self.conn.phase = phase
        self.conn.scope.deadline = trio.current_time() + timeout

    async def serve(self) -> None:
        try:
            while True:
                await self._budget()
                self._phase("idle", self.limits.idle_timeout)
                self.request, self.answered, self.continued = None, False, False
                if self.reader.in_message:  # part of the next request came with the last
                    self._started()
                request = await self._next_event(HEAD_READS, pass_if_buffered=True)
                if not isinstance(request, Request):
                    return  # the client closed
                await self._budget()  # (run up meanwhile on another of its connections)
                self.request, self.closing = request, not request.keep_alive
                await self._exchange(request)
                if self.closing or not await self._drain():
                    return
                if not self.server.admission.idle(self.conn):
                    return
        except BadRequest as exc:
            if not self.answered:
                self.server.refused(exc.status, f"malformed HTTP request ({exc})")
                await self._send(
                    exc.status, error_body("http", "malformed HTTP request"), close=True
                )

    def _started(self) -> None:
        """A request started: the connection is busy, and the slow-sender bound applies."""
        if not self.server.admission.busy(self.conn):
            raise _Close
        self._phase("request", self.limits.request_timeout)

    async def _budget(self) -> None:
        """Before a request is read, and again before it is handled: wait (idle, evictable)
        for the refusal tokens this connection's refused requests reserved, and for those its
        client (address and certificate) reserved on any connection, old or new."""
        self.penalty_until = max(self.penalty_until, self.server.debt_paid(self.refusal_key))
        if self.penalty_until > trio.current_time():
            if not self.server.admission.idle(self.conn):  # (a head read: it was busy)
                raise _Close
            self._phase("idle", self.limits.idle_timeout)
            await trio.sleep_until(self.penalty_until)

    def _refused(self, cost: int = 1, *, link: str | None = None, status: int = 0) -> None:
        """Reserve the client's refusal tokens for refused requests, when they are refused
        (a batch's item as it answers): charged even if the connection then breaks or the
        client resets it, before its other answers are sent. A handler's 409 for `link`, one
        of the client's own, goes on the link's allowance while it has one."""
        now = trio.current_time()
        server = self.server
        if (
            status == 409
            and link is not None
            and server.serves is not None
            and server.serves(self.identity, link)
            and server.link_refusals.take(link, now)
        ):
            return
        delay = server.refusals.delay(self.refusal_key, now, cost)
        self.penalty_until = max(self.penalty_until, now + delay)

    async def _next_event(
        self, max_reads: float = math.inf, *, pass_if_buffered: bool = False
    ) -> Event:
        """The reader's next event, reading for it at most `max_reads` times (past that the
        connection is closed and its client charged a refusal). With `pass_if_buffered`, an
        event that came with earlier bytes (a pipelined request) is a checkpoint, as a read
        would have been: a send the socket takes at once is none, so a client that sends many
        small requests at once would otherwise have them all answered in one step of the
        loop, every other connection and link waiting."""
        reader = self.reader
        reads = 0
        while True:
            event = reader.next_event()
            if event is not None:
                if pass_if_buffered and not reads:
                    await trio.lowlevel.checkpoint()
                return event
            data = await self.stream.receive_some(_READ_SIZE)
            if not data:
                reader.eof()
                continue
            reads += 1
            if reads > max_reads:
                self.server.dropped(self.conn, "request-pieces")
                self._refused()
                raise _Close
            if self.conn.phase == "idle":
                self._started()
            reader.feed(bytes(data))  # a no-op for bytes; Stream may return a bytearray

    async def _exchange(self, request: Request) -> None:
        if self.conn.phase == "idle":  # the whole request came with the previous one
            self._started()
        if request.framing == "transfer-encoding":
            # Our clients always send a content-length. A chunked body of one-byte chunks
            # costs far more to parse than its size says (seconds of CPU for 512 KiB).
            self.server.refused(411, "request with a transfer-encoding")
            await self._send(411, error_body("length", "content-length required"), close=True)
            return
        if request.framing == "upgrade":  # (llhttp reads no body past such a head)
            self.server.refused(400, "request to switch protocols")
            await self._send(400, error_body("http", "no protocol switch here"), close=True)
            return
        path = request.target.partition(b"?")[0]
        if path == BATCH_PATH:
            await self._batch(request)
            return
        parts = path.split(b"/")
        if len(parts) != 5 or parts[:3] != [b"", b"v1", b"links"] or parts[4] not in ACTIONS:
            self.server.refused(404, "request for an unknown path")
            await self._send(404, error_body("not-found", "unknown path"))
            return
        if request.method != b"POST":
            self.server.refused(405, f"{request.method[:16]!r} request")
            await self._send(405, error_body("method", "use POST"))
            return
        link, action = parts[3].decode("ascii", "replace"), parts[4].decode("ascii")
        body = await self._read_body(MAX_BODY)
        if body is None:
            self.server.refused(413, f"{action} with a body over {MAX_BODY} bytes")
            await self._send(413, error_body("too-large", f"body larger than {MAX_BODY} bytes"))
            return
        self.conn.phase = "handler"
        self.conn.scope.deadline = math.inf  # bounded by the link's own timeouts
        if action not in EARLY_REPLY:
            status, reply = await self._call(link, action, body)
            await self._send(status, reply, link=link)
            return
        sent = trio.Event()
        status, reply = await self.server.nursery.start(
            partial(self._handle, link, action, body, sent)
        )
        try:
            await self._send(status, reply, link=link)
        finally:
            sent.set()

    async def _batch(self, request: Request) -> None:
        """Several links' requests in one (`batchwire`): each item goes to the handler as if it
        had come alone on this connection, all of them side by side, and each one's answer is
        streamed as soon as it is given (early or at the handler's return), so one slow item
        holds up no other. An item that answered early goes on once its answer is sent."""
        server, identity = self.server, self.identity
        if request.method != b"POST":
            server.refused(405, f"{request.method[:16]!r} batch request")
            await self._send(405, error_body("method", "use POST"))
            return
        if not any(name == b"content-length" for name, _ in request.headers):
            # (a transfer-encoding was refused in `_exchange`): no body framing at all
            server.refused(411, "batch without a content-length")
            await self._send(411, error_body("batch", "content-length required"), close=True)
            return
        # Refused before the body is read: a client with its batches' share under way, or one
        # whose refusal budget is spent (a batch would run up to 64 refused handlers).
        if server.batches[identity] >= self.limits.max_batches_per_identity or (
            server.refusals.peek(self.refusal_key, trio.current_time()) < 1
        ):
            server.refused(503, "batch from a client with many under way or many refused")
            await self._send(503, error_body("busy", "too many batches under way"))
            return
        server.batches[identity] += 1
        try:
            await self._batch_items()
        finally:
            server.batches[identity] -= 1
            if not server.batches[identity]:
                del server.batches[identity]

    async def _batch_items(self) -> None:
        server = self.server
        data = await self._read_body(batchwire.MAX_BATCH)
        if data is None:
            server.refused(413, f"batch over {batchwire.MAX_BATCH} bytes")
            await self._send(413, error_body("too-large", "batch too large"))
            return
        try:
            items = batchwire.decode_request(data)
            if len({item.link for item in items}) != len(items):
                raise ProtocolError("batch names a link twice")
        except ProtocolError as exc:
            server.refused(exc.status, f"malformed batch: {exc}")
            await self._send(exc.status, error_body("batch", str(exc)))
            return
        del data
        if server.metrics is not None:
            server.metrics.peer_batches.inc()
            server.metrics.peer_batched_requests.inc(len(items))
        await self._stream_answers(items)

    async def _stream_answers(self, items: list[batchwire.Item]) -> None:
        """Every item's handler runs to its end, as a lone request's does, whatever becomes
        of the connection: a client that goes away or stops reading loses its answers (the
        connection is closed once every item has answered), never a handler's work."""
        stream, server = self.stream, self.server
        self.conn.phase = "handler"
        self.conn.scope.deadline = math.inf  # bounded by the links' own timeouts
        ready: list[bytes] = [batchwire.reply_head(len(items))]
        """Answers given and not yet sent: the writer sends them all in one chunk (a group
        commit answers many items at once)."""
        sent_with: list[trio.Event] = []
        """The `sent` events of the answers in `ready`, set once their chunk is written."""
        writing = broken = False
        # no content-length: the answers go chunked, each as it comes (to HTTP/1.0, which
        # has no chunks, unframed until the connection closes)
        chunked = self.request is not None and self.request.version == "1.1"
        headers = [(b"content-type", b"application/octet-stream")]
        if chunked:
            headers.append((b"transfer-encoding", b"chunked"))
        if self.closing:  # (always for HTTP/1.0: `Request.keep_alive`)
            headers.append((b"connection", b"close"))

        async def send(head: bytes = b"", last: bytes = b"") -> None:
            """Write what is ready, unless a writer is at it: that one takes it too (it writes
            until nothing is left), so answers given together wait for one write, not in turn
            for a lock (one wake-up each)."""
            nonlocal writing, broken
            if writing:
                return
            writing = True
            try:
                while not broken and (head or last or ready):
                    # let the other items' tasks run first: answers given meanwhile go in
                    # this write
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    body = b"".join(ready)
                    data = head + (chunk(body) + last if chunked else body)
                    done = sent_with[:]
                    ready.clear()
                    sent_with.clear()
                    head = last = b""
                    try:
                        with trio.move_on_after(self.limits.request_timeout) as slow:
                            await stream.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        broken = True
                    except BaseException:  # cancelled midway: nothing more goes on this stream
                        broken = True
                        raise
                    else:
                        broken = slow.cancelled_caught  # the client does not read
                    finally:
                        for event in done:
                            event.set()
            finally:
                writing = False
                for event in sent_with:  # (nothing is sent after a break)
                    event.set()
                if broken:
                    ready.clear()
                    sent_with.clear()

        async def answer(index: int, item: batchwire.Item) -> None:
            sent = trio.Event()
            try:
                if item.action in EARLY_REPLY:
                    start = partial(self._handle, item.link, item.action, item.body, sent)
                    status, body = await server.nursery.start(start)
                else:  # as a lone request's: no task of its own (one less per item)
                    status, body = await self._call(item.link, item.action, item.body)
                if status >= 400:
                    self._refused(link=item.link, status=status)
                ready.append(batchwire.encode_answer(index, batchwire.Answer(status, body)))
                sent_with.append(sent)
                await send()
            except BaseException:
                sent.set()  # an item that answered early goes on, whatever became of its answer
                raise

        self.answered = True
        await send(reply_head(200, headers))
        async with trio.open_nursery() as nursery:
            for index, item in enumerate(items):
                nursery.start_soon(answer, index, item)
        await send(last=LAST_CHUNK)
        if broken:
            raise _Close

    async def _handle(
        self,
        link: str,
        action: str,
        body: bytes,
        sent: trio.Event,
        task_status: trio.TaskStatus[tuple[int, bytes]],
    ) -> None:
        """The handler, as a task started from the connection's: `task_status` gets its answer
        early (`peering.ReplyNow`, which returns once the connection has sent it; the task
        then goes on in the server's nursery while the connection reads its next request) or
        when it returns. Until it answers it is cancelled with the connection, as before;
        after, only with the server. Handlers going on after an early reply are capped per
        client identity (`max_per_identity`): past it, a handler answers when it returns."""
        server, identity = self.server, self.identity
        replied = early = False

        async def reply_now(reply: bytes) -> bool:
            nonlocal replied, early
            if replied or server.going_on[identity] >= self.limits.max_per_identity:
                return False
            replied = early = True
            server.going_on[identity] += 1
            task_status.started((200, reply))
            await sent.wait()
            return True

        early_ok = action in EARLY_REPLY
        try:
            status, reply, message = await self._answer(
                link, action, body, reply_now if early_ok else None
            )
        finally:
            if early:
                server.going_on[identity] -= 1
                if not server.going_on[identity]:
                    del server.going_on[identity]
        if not replied:
            if status != 200:
                server.refused(status, message)
            task_status.started((status, reply))
        elif status != 200:  # answered already: the peer has its 200; only we learn of it
            log.error("peer API: %s failed after its reply was sent", message)

    async def _call(self, link: str, action: str, body: bytes) -> tuple[int, bytes]:
        """The handler in the connection's task, for an action that never answers early: it
        is cancelled with the connection, as `_handle`'s task is until it answers."""
        status, reply, message = await self._answer(link, action, body, None)
        if status != 200:
            self.server.refused(status, message)
        return status, reply

    async def _answer(
        self, link: str, action: str, body: bytes, reply_now: ReplyNow | None
    ) -> tuple[int, bytes, str]:
        """The handler's status and reply body, and what to log if it refused or failed."""
        try:
            reply = await self.server.handler(link, action, body, self.identity, reply_now)
            return 200, reply, ""
        except ProtocolError as exc:
            what = f"{action} for link {link[:64]!r}"
            return exc.status, exc.body or error_body("refused", str(exc)), f"{what}: {exc}"
        except Exception as exc:  # a bug behind the handler: one 500, no traceback
            what = f"{action} for link {link[:64]!r}"
            return 500, error_body("internal", "internal error"), f"{what}: {type(exc).__name__}"

    async def _read_body(self, limit: int) -> bytes | None:
        """The body, or None if it is over `limit` (by content-length, before reading any of
        it, or while streaming); nothing over the bound is ever buffered."""
        request = self.request
        assert request is not None
        if request.content_length > limit:
            return None
        if request.expects_continue and not self.continued:
            self.continued = True
            await self.stream.send_all(CONTINUE)
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event()
            if isinstance(event, bytes):
                size += len(event)
                if size > limit:
                    return None
                chunks.append(event)
                if len(chunks) > MAX_PIECES:  # past it the connection is closed
                    self.server.dropped(self.conn, "request-pieces")
                    self._refused()  # charged to the address, as a refused request is
                    raise _Close
            elif event is END:
                return b"".join(chunks)
            else:
                raise _Close  # the client went away mid-body

    async def _drain(self) -> bool:
        """Discard an unread request body (up to `discard_limit`) so the connection can be
        kept; False if it must close instead."""
        reader = self.reader
        if not reader.body_pending:
            return True
        if self._too_much_left():  # (answered with `connection: close` already)
            return False
        self._phase("request", self.limits.request_timeout)
        budget, pieces = self.limits.discard_limit, 0
        while reader.body_pending:
            event = await self._next_event()
            if isinstance(event, bytes):
                budget -= len(event)
                pieces += 1
                if pieces > MAX_PIECES:
                    self._refused()
                    return False
                if budget < 0:
                    return False
            elif event is not END:
                return False
        return True

    async def _send(
        self, status: int, body: bytes, *, close: bool = False, link: str | None = None
    ) -> None:
        """Answer the request (`link`: the handler's answer for that link)."""
        if self.answered:  # (one answer per request)
            raise _Close
        self.answered = True
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        if close or self._too_much_left():
            self.closing = True
        if self.closing:
            headers.append((b"connection", b"close"))
        if status >= 400:
            self._refused(link=link, status=status)
        self._phase("reply", self.limits.request_timeout)
        if self.request is not None and self.request.method == b"HEAD":
            body = b""  # (the head a GET would have, and no body: RFC 9110 §9.3.2)
        await self.stream.send_all(reply_head(status, headers) + body)

    def _too_much_left(self) -> bool:
        """Whether the unread rest of the request body cannot be discarded: declared too large,
        or the client may be waiting for a `100 Continue` before it sends it."""
        request = self.request
        return (
            self.reader.body_pending
            and request is not None
            and (
                request.content_length > self.limits.discard_limit
                or (request.expects_continue and not self.continued)
            )
        )
