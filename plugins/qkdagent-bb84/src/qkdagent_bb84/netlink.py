"""The two ends of a `bb84` source as two processes: Alice connects, Bob listens.

The classical channel is its own mutual-TLS connection (`tls.py`), frames with a length prefix
(`frames.py`, `stream.py`), every message HMAC-tagged under the block's key (`netend.py`).
Alice's process simulates the quantum phase for both ends and sends Bob his detection record in
the block's first message: the quantum channel is **not** a real channel here, it is carried
beside the classical one as data (a simulation shortcut; see README).

A block is committed the way the in-process link commits it, the responder first: Bob publishes
his key, then says `block.stored`; Alice publishes hers only on that message, so Alice never
names a piece Bob lacks (a connection lost between the two leaves pieces only Bob holds). A
dropped connection, a timeout, a malformed or unauthenticated frame abort the block (no key
anywhere), close the connection, and Alice reconnects with exponential backoff.
"""

from __future__ import annotations

import hmac
import secrets
import ssl
from collections.abc import Callable
from dataclasses import dataclass, replace

import trio

from .channel import ALICE, BOB, AuthError, ChannelError, block_key, mac
from .engine import ABORT_AUTH, ABORT_CHANNEL, BlockResult, Settings, run_alice, run_bob
from .frames import BlockStart, FrameError, encode_frame, parse_block_start, parse_body
from .netend import NetEnd
from .store import KeyStore
from .stream import FramedStream, ThreadTransport
from .tls import TlsFiles, client_context, names_peer, server_context

BROKEN = (ABORT_AUTH, ABORT_CHANNEL)
"""Block outcomes after which the connection is closed (the two ends may be out of step)."""


MAX_CONNECTIONS = 16
"""Connections Bob holds at once (handshaking or serving); more are closed at once. Alice
needs one; a few more cover reconnects racing a stale connection."""


@dataclass(frozen=True)
class NetConfig:
    host: str
    port: int
    tls: TlsFiles
    peer_name: str
    timeout: float = 30.0
    """Deadline of every read and write during a block, and of the TLS handshake."""
    idle_timeout: float = 60.0
    """Bob's deadline for Alice's next message between blocks; Alice pings at a third of it."""
    backoff_max: float = 30.0


def ping_tag(secret: bytes) -> bytes:
    """The tag of a keep-alive (replaying one only keeps a connection open)."""
    return mac(block_key(secret, "ping"), ALICE, 0, "ping", b"")


def _clean(result: BlockResult) -> BlockResult:
    return replace(result, alice_key=b"", bob_key=b"")


Report = Callable[[str, str], None]


class Initiator:
    """Alice's end: connects to Bob, runs blocks on demand, keeps the connection alive."""

    def __init__(
        self,
        config: NetConfig,
        settings: Settings,
        print_: bytes,
        key_size: int,
        seed: int,
        secret: bytes,
        store: KeyStore,
        report: Report,
        on_block: Callable[[BlockResult], None],
    ) -> None:
        self.config, self.settings, self.print_ = config, settings, print_
        self.key_size, self._seed, self._secret, self.store = key_size, seed, secret, store
        self.report, self.on_block = report, on_block
        self._context = client_context(config.tls)  # unreadable files: refused at prepare
        self.run_id = secrets.token_hex(4)
        self.stream: FramedStream | None = None
        self._lock = trio.Lock()

    def __repr__(self) -> str:
        return f"<Initiator {self.config.host}:{self.config.port} run={self.run_id}>"

    async def connect(self) -> FramedStream:
        c = self.config
        with trio.fail_after(c.timeout):
            tcp = await trio.open_tcp_stream(c.host, c.port)
            tls = trio.SSLStream(tcp, self._context, server_hostname=c.peer_name)
            try:
                await tls.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(tls)
                raise
        return FramedStream(tls, c.timeout)

    async def run(self, need: Callable[[], bool], every: float) -> None:
        """Forever: connect (backing off after failures), then run blocks while `need()`."""
        delay = 0.25
        while True:
            try:
                stream = await self.connect()
            except (OSError, ssl.SSLError, trio.BrokenResourceError, trio.TooSlowError) as exc:
                self.report("connect_failed", f"{type(exc).__name__}: {exc}"[:200])
                await trio.sleep(delay)
                delay = min(delay * 2, self.config.backoff_max)
                continue
            self.stream = stream
            try:
                if await self._serve(stream, need, every):
                    delay = 0.25
            finally:
                self.stream = None
                await stream.aclose()
            await trio.sleep(delay)
            delay = min(delay * 2, self.config.backoff_max)

    async def _serve(self, stream: FramedStream, need: Callable[[], bool], every: float) -> bool:
        """Blocks and keep-alives until the connection breaks; whether a block got through."""
        good = False
        idle = trio.current_time()
        ping = self.config.idle_timeout / 3
        try:
            while True:
                if need():
                    result = await self.block()
                    if result.status in BROKEN:
                        return good
                    good = good or result.ok
                    idle = trio.current_time()
                    continue
                await trio.sleep(min(every, ping))
                if trio.current_time() - idle >= ping and self.stream is stream:
                    async with self._lock:
                        await stream.send_frame(encode_frame("ping", b"", ping_tag(self._secret)))
                    idle = trio.current_time()
        except ChannelError as exc:
            self.report("connection_lost", str(exc))
            return good
        except OSError as exc:  # the pool's disk: the block is lost, the link starts over
            self.report("block_aborted", f"bb84 pool: {exc.strerror or exc}")
            return good

    async def block(self) -> BlockResult:
        """One block over the current connection (serialised: one block at a time)."""
        async with self._lock:
            stream = self.stream
            if stream is None:
                raise ChannelError("not connected to the other end")
            number = self.store.next_block
            await trio.to_thread.run_sync(self.store.reserve, number)
            block_id = f"{self.run_id}-{number}"
            end = NetEnd(
                ALICE,
                block_key(self._secret, block_id),
                ThreadTransport(stream),
                local=frozenset((ALICE, BOB)),
            )
            result = await trio.to_thread.run_sync(self._alice_block, number, block_id, end)
        self.on_block(result)
        return result

    def _alice_block(self, number: int, block_id: str, end: NetEnd) -> BlockResult:
        result = run_alice(self.settings, (self._seed, number), end, block_id, self.print_)
        if not result.ok:
            return _clean(result)
        self.store.stage(block_id, result.alice_key, self.key_size)
        try:
            if end.receive("block.stored") != b"":
                raise AuthError("malformed block.stored")
        except AuthError as exc:
            self.store.discard(block_id)
            return _clean(replace(result, status=ABORT_AUTH, detail=str(exc), key_bits=0))
        except ChannelError as exc:
            self.store.discard(block_id)
            return _clean(replace(result, status=ABORT_CHANNEL, detail=str(exc), key_bits=0))
        except BaseException:
            self.store.discard(block_id)
            raise
        self.store.publish(block_id)
        return _clean(result)


class Responder:
    """Bob's end: listens, checks the initiator's certificate name, runs Bob's half of blocks."""

    def __init__(
        self,
        config: NetConfig,
        settings: Settings,
        print_: bytes,
        key_size: int,
        secret: bytes,
        store: KeyStore,
        report: Report,
        on_block: Callable[[BlockResult], None],
    ) -> None:
        self.config, self.settings, self.print_ = config, settings, print_
        self.key_size, self._secret, self.store = key_size, secret, store
        self.report, self.on_block = report, on_block
        self._context = server_context(config.tls)  # unreadable files: refused at prepare
        self._lock = trio.Lock()
        self._current: trio.CancelScope | None = None
        self._slots = trio.Semaphore(MAX_CONNECTIONS)

    def __repr__(self) -> str:
        return f"<Responder {self.config.host}:{self.config.port}>"

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        c = self.config
        tcp = await trio.open_tcp_listeners(c.port, host=c.host or None)
        port = int(tcp[0].socket.getsockname()[1])
        listeners = [trio.SSLListener(listener, self._context) for listener in tcp]
        async with trio.open_nursery() as nursery:
            task_status.started(port)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, tls: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:  # a flood of connections: the peer needs one, at most a few
            await trio.aclose_forcefully(tls)
            return
        try:
            await self._handle_admitted(tls)
        finally:
            self._slots.release()

    async def _handle_admitted(self, tls: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            try:
                with trio.fail_after(self.config.timeout):
                    await tls.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError) as exc:
                self.report("peer_refused", f"TLS handshake failed ({type(exc).__name__})")
                return
            if not names_peer(tls.getpeercert(), self.config.peer_name):
                self.report("peer_refused", "client certificate does not name the peer")
                return
            if self._current is not None:  # the peer reconnected: the old connection is stale
                self._current.cancel()
            with trio.CancelScope() as scope:
                self._current = scope
                async with self._lock:
                    await self._serve(FramedStream(tls, self.config.timeout))
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await trio.aclose_forcefully(tls)

    async def _serve(self, stream: FramedStream) -> None:
        while True:
            try:
                start, end = await self._next_block(stream)
            except (ChannelError, AuthError) as exc:
                self.report("connection_closed", str(exc)[:200])
                return
            if start is None or end is None:
                continue  # a keep-alive
            try:
                result = await trio.to_thread.run_sync(self._bob_block, start, end)
            except (AuthError, OSError) as exc:  # the pool's disk; a record that cannot be read
                self.report("block_aborted", f"{type(exc).__name__}: {exc}"[:200])
                return
            self.on_block(result)
            if result.status in BROKEN:
                return

    async def _next_block(self, stream: FramedStream) -> tuple[BlockStart | None, NetEnd | None]:
        """The next `block.start`, authenticated, or (None, None) for a keep-alive."""
        frame = parse_body(await stream.receive_body(self.config.idle_timeout))
        if frame.kind == "ping":
            if frame.payload or not hmac.compare_digest(frame.tag, ping_tag(self._secret)):
                raise AuthError("bad keep-alive")
            return None, None
        if frame.kind != "block.start":
            raise FrameError(f"{frame.kind} outside a block")
        start = parse_block_start(frame.payload)
        key = block_key(self._secret, start.block_id)
        expected = mac(key, ALICE, 0, "block.start", frame.payload)
        if not hmac.compare_digest(frame.tag, expected):
            raise AuthError("block.start failed authentication")
        if start.fingerprint != self.print_:
            self.report("block_aborted", "the two ends run different settings")
            raise AuthError("the two ends run different settings")
        return start, NetEnd(BOB, key, ThreadTransport(stream), received=1)

    def _bob_block(self, start: BlockStart, end: NetEnd) -> BlockResult:
        result = run_bob(self.settings, start, end)
        if not result.ok:
            return _clean(result)
        if self.store.holds(start.block_id):
            return _clean(replace(result, status=ABORT_AUTH, detail="block already in the pool"))
        self.store.stage(start.block_id, result.bob_key, self.key_size)
        try:
            self.store.publish(start.block_id)
        except BaseException:
            self.store.discard(start.block_id)
            raise
        try:
            end.send(BOB, "block.stored", b"")
        except ChannelError as exc:  # published: pieces Alice will never name (see README)
            return _clean(replace(result, status=ABORT_CHANNEL, detail=str(exc)))
        return _clean(result)


def rate(result: BlockResult) -> float:
    """Secret key bits per second of the block's own computation (0 if it aborted)."""
    seconds = sum(result.seconds.values())
    return result.key_bits / seconds if seconds > 0 and result.ok else 0.0


def per_pulse(result: BlockResult) -> float:
    return result.key_bits / result.pulses if result.pulses else 0.0


__all__ = ["Initiator", "NetConfig", "Responder"]
