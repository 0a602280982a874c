"""Source `bb84`: keys from a simulated BB84 link whose two ends are the two agents' sources.

The initiator's source is Alice (`new_key` hands out her oldest pool piece), the responder's is
Bob (`key_by_id` gives the piece with that ID, once). Two modes: both agents in one process name
the same `link` (the pair is a simulation, see `pool.py`; tests, virtual clock); or the two ends
are two processes, the responder listening (`listen`), the initiator connecting (`connect`) over
mutual TLS (`netlink.py`), Alice's process running blocks as her pool needs them. Each end's pool is
durable (`store.py`, in the agent's state directory): established key survives a restart and is
destroyed on disk as it is handed out. Each source's background task keeps the pool above
`low_water` pieces by running blocks (in a worker thread, or on the event loop with
`worker_thread = false`, for small blocks under a virtual clock); an aborted block (QBER above
threshold, failed verification, no finite-key length) is reported as a `ComponentEvent` and
yields no key. A dry pool is a retryable `SourceUnavailable`.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable
from typing import TypeVar

import trio
from qkdagent import (
    ComponentEvent,
    Key,
    KeyNotFound,
    Link,
    Misconfigured,
    Options,
    PluginContext,
    Secret,
    Source,
    SourceUnavailable,
    decimal,
)

from .cascade import ALGORITHMS
from .channel import ChannelError
from .engine import BlockResult, Settings, fingerprint
from .netlink import Initiator, NetConfig, Responder, per_pulse, rate
from .physics import Physics
from .pool import Bb84Link
from .store import KeyStore, StoreError
from .tls import TlsFiles

T = TypeVar("T")

KEY_ID = re.compile(r"^[0-9a-f]{8}-[0-9]{1,12}-[0-9]{1,9}$")
"""The IDs this source issues; anything else from the peer is not found, without a lookup."""

TRIES = 3
"""Blocks `new_key` runs itself on a dry pool before it gives up (each may abort)."""


def _settings(options: Options) -> Settings:
    physics = {
        "mu": options.number("mu", 0.5, min=0.001, max=10),
        "decoy_mu": options.number("decoy_mu", 0.1, min=0, max=10),
        "decoys": options.boolean("decoys", True),
        "p_signal": options.number("p_signal", 0.6, min=0.01, max=1),
        "p_decoy": options.number("p_decoy", 0.25, min=0, max=0.99),
        "p_key_basis": options.number("p_key_basis", 0.7, min=0.01, max=0.99),
        "fibre_loss_db_km": options.number("fibre_loss_db_km", 0.2, min=0, max=10),
        "distance_km": options.number("distance_km", 25.0, min=0, max=1000),
        "detector_efficiency": options.number("detector_efficiency", 0.2, min=0.001, max=1),
        "dark_count": options.number("dark_count", 1e-6, min=0, max=0.1),
        "misalignment": options.number("misalignment", 0.01, min=0, max=0.5),
        "eve_intercept": options.number("eve_intercept", 0.0, min=0, max=1),
        "eve_pns": options.boolean("eve_pns", False),
    }
    try:
        phys = Physics(**physics)
    except ValueError as exc:
        options.fail("mu", str(exc))
    return Settings(
        physics=phys,
        block_bits=options.integer("block_bits", 1_000_000, min=1_000, max=4_000_000),
        qber_threshold=options.number("qber_threshold", 0.11, min=0.001, max=0.25),
        cascade=options.string("cascade", "yanetal", choices=ALGORITHMS),
        eps_sec=options.number("eps_sec", 1e-10, min=1e-30, max=0.1),
        eps_cor=options.number("eps_cor", 1e-15, min=1e-30, max=0.1),
    )


def _address(options: Options, name: str, *, listen: bool) -> tuple[str, int]:
    """`HOST:PORT` (`[v6]:PORT`); port 0 (any free port) only to listen."""
    text = options.string(name, max_len=300)
    host, sep, port = text.rpartition(":")
    number = decimal(port, 5)
    if not sep or number is None or not 0 <= number <= 65535:
        options.fail(name, "must be HOST:PORT")
    if number == 0 and not listen:
        options.fail(name, "needs a port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or any(c.isspace() or c in "/[]@" for c in host):
        options.fail(name, "must be HOST:PORT")
    return host, int(port)


def _network(options: Options) -> tuple[NetConfig, bool] | None:
    """The two-process options, or None (both ends in one process); (config, listening)."""
    if options.has("listen") and options.has("connect"):
        options.fail("connect", "a source either listens (responder) or connects (initiator)")
    if not options.has("listen") and not options.has("connect"):
        for name in ("tls", "peer_name", "timeout", "idle_timeout", "backoff_max"):
            if options.has(name):
                options.fail(name, "is only for a source that listens or connects")
        return None
    listening = options.has("listen")
    host, port = _address(options, "listen" if listening else "connect", listen=listening)
    tls = options.sub("tls")
    files = TlsFiles(*(tls.path(n, must_exist=True) for n in ("cert", "key", "ca")))
    tls.finish()
    config = NetConfig(
        host,
        port,
        files,
        options.string("peer_name", max_len=253),
        timeout=options.number("timeout", 30.0, positive=True, max=3600),
        idle_timeout=options.number("idle_timeout", 60.0, positive=True, max=86400),
        backoff_max=options.number("backoff_max", 30.0, positive=True, max=3600),
    )
    if not options.has("auth_key"):
        options.fail("auth_key", "is required when the two ends are two processes")
    if not options.boolean("worker_thread", True):
        options.fail("worker_thread", "must be true when the two ends are two processes")
    return config, listening


class Bb84Source(Source):
    type_name = "bb84"

    def __init__(self, name: str, options: Options, context: PluginContext) -> None:
        super().__init__(name, options, context)
        self.link_name = options.string("link", "default", max_len=200)
        self.key_size = options.integer("key_size", 32, min=16, max=1024)
        self.low_water = options.integer("low_water", 8, min=0, max=1_000_000)
        self.check_every = options.number("check_every", 1.0, positive=True, max=3600)
        seed = options.integer("seed", -1, min=-1, max=2**63 - 1)
        self.seed = None if seed < 0 else seed
        self.worker_thread = options.boolean("worker_thread", True)
        # the classical channel's HMAC secret, the same at both ends (`{file = ...}`, base64);
        # without it each block gets a random key (both ends are in this process anyway)
        self.auth_key: Secret | None = options.secret("auth_key", None, encoding="base64")
        if self.auth_key is not None and len(self.auth_key.reveal()) < 16:
            options.fail("auth_key", "must hold at least 16 bytes")
        self.settings = _settings(options)
        self.network = _network(options)
        self.sim: Bb84Link | None = None
        self.store: KeyStore | None = None
        self.initiator: Initiator | None = None
        self.responder: Responder | None = None
        self.port = 0
        """The port a listening source bound (its `listen` port, or the one it got for 0)."""
        self._end = ""
        m = context.metrics
        labels = ["source"]
        self._m_pool = m.gauge("qkdagent_bb84_pool_bits", "Unused key bits in the pool", labels)
        self._m_blocks = m.counter("qkdagent_bb84_blocks", "BB84 blocks that gave key", labels)
        self._m_aborted = m.counter("qkdagent_bb84_blocks_aborted", "BB84 blocks aborted", labels)
        self._m_qber = m.gauge("qkdagent_bb84_qber", "QBER estimate of the last block", labels)
        self._m_rate = m.gauge(
            "qkdagent_bb84_key_rate_bits_per_second",
            "Secret key bits per second of the last block's computation",
            labels,
        )
        self._m_per_pulse = m.gauge(
            "qkdagent_bb84_key_bits_per_pulse", "Secret key bits per pulse, last block", labels
        )

    async def prepare(self) -> None:
        # one pool directory per (source, link name): a renamed link starts an empty pool
        digest = hashlib.sha256(self.link_name.encode()).hexdigest()[:16]
        directory = self.context.private_dir(f"bb84-{self.name}") / digest
        try:
            store = await self._call(KeyStore, directory)
        except StoreError as exc:
            raise Misconfigured(f"source {self.name!r}: {exc}") from None
        if self.network is not None:
            await self._prepare_network(*self.network, store)
            return
        try:
            sim = Bb84Link.named(self.link_name, self.settings, self.key_size, self.seed)
            self._end = str(directory)
            sim.attach(
                self._end,
                store,
                alice=any(link.initiator for link in self.links),
                auth_secret=self.auth_key.reveal() if self.auth_key is not None else None,
            )
        except ValueError as exc:
            raise Misconfigured(f"source {self.name!r}: {exc}") from None
        self.sim, self.store = sim, store
        self._level()

    async def _prepare_network(self, config: NetConfig, listening: bool, store: KeyStore) -> None:
        alice = any(link.initiator for link in self.links)
        if listening == alice:
            what = "listen is the responder's" if listening else "connect is the initiator's"
            raise Misconfigured(f"source {self.name!r}: {what} option")
        assert self.auth_key is not None  # required by `_network`
        secret = self.auth_key.reveal()
        print_ = fingerprint(self.settings, self.key_size)
        try:
            if listening:
                self.responder = Responder(
                    config, self.settings, print_, self.key_size, secret, store, self._event,
                    self._record,
                )  # fmt: skip
            else:
                seed = self.seed if self.seed is not None else secrets.randbits(63)
                self.initiator = Initiator(
                    config, self.settings, print_, self.key_size, seed, secret, store, self._event,
                    self._record,
                )  # fmt: skip
        except Misconfigured as exc:  # an encrypted or unusable key (never a prompt)
            raise Misconfigured(f"source {self.name!r}: {exc}") from None
        except (OSError, ValueError) as exc:  # unreadable TLS files
            raise Misconfigured(f"source {self.name!r}: TLS: {exc}") from None
        self.store = store
        self._level()

    def _event(self, kind: str, detail: str) -> None:
        self.context.report(ComponentEvent(self.name, kind, detail))

    def _level(self) -> None:
        if self.store is not None:
            self._m_pool.labels(self.name).set(self.store.bits())

    def _record(self, result: BlockResult) -> None:
        """A block's figures into the metrics; an aborted block is also an event."""
        if result.ok:
            self._m_blocks.labels(self.name).inc()
            self._m_rate.labels(self.name).set(rate(result))
            self._m_per_pulse.labels(self.name).set(per_pulse(result))
        else:
            self._m_aborted.labels(self.name).inc()
            detail = f"{result.status} (QBER estimate {result.qber_estimate:.4f})"
            self._event("block_aborted", detail)
        if result.sample:
            self._m_qber.labels(self.name).set(result.qber_estimate)
        self._level()

    async def aclose(self) -> None:
        if self.sim is not None and self.store is not None:
            self.sim.detach(self._end, self.store)
        self.sim = None
        self.initiator = self.responder = None

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        """Blocking work (a block, file I/O) in a worker thread, or inline without one."""
        if self.worker_thread:
            return await trio.to_thread.run_sync(fn, *args)
        await trio.lowlevel.checkpoint()
        return fn(*args)

    def _pool(self) -> KeyStore:
        if self.store is None:
            raise SourceUnavailable(f"source {self.name!r} is not prepared")
        return self.store

    def _prepared(self) -> tuple[Bb84Link, KeyStore]:
        if self.sim is None or self.store is None:
            raise SourceUnavailable(f"source {self.name!r} is not prepared")
        return self.sim, self.store

    async def _produce(self) -> BlockResult | None:
        if self.initiator is not None:
            try:
                result = await self.initiator.block()
            except ChannelError as exc:
                raise SourceUnavailable(f"source {self.name!r}: bb84 peer: {exc}") from None
            except (OSError, StoreError) as exc:
                raise SourceUnavailable(f"source {self.name!r}: bb84 pool: {exc}") from None
            return result
        if self.responder is not None:
            return None  # Bob's blocks are Alice's to start
        sim, _ = self._prepared()
        if not sim.complete():
            raise SourceUnavailable(
                f"source {self.name!r}: the other end of bb84 link {self.link_name!r} "
                "is not running"
            )
        try:
            result = await self._call(sim.produce)
        except OSError as exc:
            raise SourceUnavailable(f"source {self.name!r}: bb84 pool: {exc.strerror}") from None
        self._record(result)
        return result

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the pool above `low_water` pieces (while the other end is attached); over the
        network, Bob listens and Alice keeps a connection to him and runs the blocks."""
        if self.responder is not None:
            async with trio.open_nursery() as nursery:
                self.port = await nursery.start(self.responder.serve)
                task_status.started()
                while True:  # the level moves as Alice's blocks arrive and keys are taken
                    await trio.sleep(self.check_every)
                    self._level()
        task_status.started()
        if self.initiator is not None:
            pool = self.initiator.store
            await self.initiator.run(lambda: pool.level() < self.low_water, self.check_every)
        while True:
            sim, store = self.sim, self.store
            if sim and store and sim.complete() and store.level() < self.low_water:
                await self._produce()
            else:
                self._level()
                await trio.sleep(self.check_every)

    async def _take(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return await self._call(fn, *args)
        except OSError as exc:  # nothing was returned, so nothing is handed out twice
            raise SourceUnavailable(f"source {self.name!r}: bb84 pool: {exc.strerror}") from None

    async def new_key(self, link: Link) -> Key:
        store = self._pool()
        last: BlockResult | None = None
        for _ in range(TRIES + 1):
            piece = await self._take(store.take_oldest)
            if piece is not None:
                self._level()
                return Key(piece[0], Secret(piece[1]))
            last = await self._produce()
        if self.sim is not None:
            last = self.sim.stats.last
        reason = last.status if last is not None else "no block yet"
        raise SourceUnavailable(f"source {self.name!r}: bb84 pool is dry ({reason})")

    async def key_by_id(self, link: Link, key_id: str) -> Key:
        await trio.lowlevel.checkpoint()
        if not KEY_ID.match(key_id):
            raise KeyNotFound(f"source {self.name!r}: not a key ID this source issues")
        store = self._pool()
        value = await self._take(store.take, key_id)
        if value is None:
            raise KeyNotFound(f"source {self.name!r} holds no key {key_id!r}")
        self._level()
        return Key(key_id, Secret(value))
