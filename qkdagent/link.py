"""One link at run time: its state, its timers, and what it tells status, metrics and hooks.

The initiator's rotation lives in `initiator.py`, the responder's answers in `responder.py`
(deciding by the pure rules of `responder_rules.py`), the sink fan-out in `sinkset.py`. Both
roles hold `self.lock` for a whole exchange, so a link is never in two rotations at once. State
is written through the store before any sink is touched, and every refusal of a peer message
happens before any state changes. What the link needs from the agent comes in one `LinkEnv`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from . import protocol, ratchet, scheduler
from . import responder_rules as rules
from .components import SinkHandle, SourceHandle
from .config import LinkConfig
from .errors import raised_at
from .events import RotationErrorEvent, RotationEvent
from .identity import PeerIdentity
from .initiator import Initiator
from .interfaces import Link
from .linkenv import LinkEnv
from .peering import ReplyNow
from .responder import Responder
from .secret import Secret
from .sinkset import LinkSinks
from .state import LinkRecord
from .stopwatch import parts_ms, parts_text

log = logging.getLogger(__name__)


LINK_RESTART_MIN = 1.0
LINK_RESTART_MAX = 60.0
"""Backoff before a link looks again after a bug in its timer work."""

PREFETCH_LEAD = 1.0
"""Seconds before a rotation is due that the initiator takes its source keys (at most 5 % of
the interval): long enough for a KME round trip, short enough for any key-retrieval window."""


def prefetch_lead(interval: float) -> float:
    return min(PREFETCH_LEAD, interval * 0.05)


def native_bootstrap(config: LinkConfig) -> Secret:
    """The bootstrap secret a native link always has (config.py requires it)."""
    if config.bootstrap is None:
        raise ValueError(f"link {config.name!r} of protocol {config.protocol!r} has no bootstrap")
    return config.bootstrap


@dataclass
class LinkStatus:
    """What `qkdagent status` shows for a link (no key material)."""

    last_error: str | None = None
    last_error_at: float | None = None
    last_rotation_seconds: float | None = None
    rotations: int = 0
    failures: int = 0
    erased_reason: str | None = None


class BaseLink:
    """What every link is, whatever its protocol: sinks, state record, fail-closed timer,
    status and bookkeeping. `LinkRuntime` (the native protocol) and `ForeignLinkRuntime` (a
    plugin's protocol) add how rotations happen."""

    protocol = "native"

    def __init__(
        self,
        env: LinkEnv,
        config: LinkConfig,
        sources: list[SourceHandle],
        sinks: list[SinkHandle],
        record: LinkRecord,
        clock: scheduler.Clock,
    ) -> None:
        self.env = env
        self.config = config
        self.name = config.name
        self.link = Link(config.name, env.agent_name, config.peer, config.initiator)
        self.sources = sources
        self.sinks = LinkSinks(env, self.link, sinks)
        self.record = record
        self.clock = clock
        self.lock = trio.Lock()
        self.status = LinkStatus()
        self.stopped = False
        self.retired = False
        """Set, under the lock, when the agent removes or replaces the link (a reload): it
        erases or hands over the sinks next, so a peer request that gets the lock after that
        must change nothing."""
        self.commit_lost = False
        """Set when the peer did not acknowledge a commit: the next rotation comes early."""
        self.rand: Callable[[], float] = random.random
        self._wake: trio.Event | None = None
        """Set to wake the link's own timer task (`timer_loop`; links the agent times have none)."""
        self._step: trio.CancelScope | None = None
        """The work under way for the agent's timer (`_run_step`), if any."""
        self._stepped: trio.Event | None = None
        """Set when that work ends, for `halt()` (made only when someone waits)."""
        self._poked = False
        self._queued = False
        """Waiting at `LinkTimers`' gate to start rotation work."""
        self._bug_delay = LINK_RESTART_MIN
        self._setup()

    def _setup(self) -> None:
        """What a kind of link adds to the common state (the native roles, say)."""

    @staticmethod
    async def load_record(
        env: LinkEnv, config: LinkConfig, peer: str, chain_key: Secret, auth_key: Secret
    ) -> tuple[LinkRecord, scheduler.Clock, bool]:
        """The link's stored state (a fresh epoch-0 one if none, or if it belongs to another
        peer or protocol: `peer` tells), its clock, and whether its key is still fresh."""
        store = env.store
        record = await store.run(store.load, config.name)
        if record is not None and rules.epoch_floor(record) >= protocol.RESYNC_CEILING:
            # Only a forged epoch hint of older versions could have put the link up here, from
            # where it could not rotate for long: start a fresh chain (the peer resyncs).
            log.warning(
                "link %s: stored epoch %d is above any reachable epoch; starting a fresh chain",
                config.name, record.epoch, extra={"link": config.name, "stage": "state"},
            )  # fmt: skip
            record = None
        if record is None or record.peer != peer:
            record = await store.run(store.create, config.name, peer, chain_key, auth_key)
        now = trio.current_time()
        age = None if record.committed_at is None else max(0.0, time.time() - record.committed_at)
        fresh = record.epoch > 0 and age is not None and age < config.timing.reject_after
        clock = scheduler.start(
            config.initiator and config.native,
            now,
            last_success=(now - age) if fresh and age is not None else None,
            erased=not fresh,
        )
        return record, clock, fresh

    async def start_sinks(self, fresh: bool) -> None:
        """Put the sinks in a defined state: the current key if it is fresh, else erased."""
        if fresh:
            await self.sinks.install(self.record)
        else:
            await self.erase("startup" if self.record.epoch == 0 else "reject_after")

    def stop(self) -> None:
        """No more timer work (an exchange or step under way finishes: see `halt`)."""
        self.stopped = True
        if self.timed_by_agent:
            self.env.timers.discard(self)
        self.poke()

    def poke(self) -> None:
        """Decide again now: a commit or a stop changed what is due."""
        if self._wake is not None:
            self._wake.set()
        if not self.timed_by_agent or self.stopped:
            return
        if self._step is not None:
            self._poked = True  # decided again when the work under way ends
        else:
            self.env.timers.wake_at(self, trio.current_time())

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The link's own task (for a link the agent does not time: `timed_by_agent`)."""
        raise NotImplementedError

    async def handle(
        self,
        action: str,
        body: bytes,
        identity: PeerIdentity,
        reply_now: ReplyNow | None = None,
    ) -> bytes:
        """A native peer API request for this link (`reply_now`: see `peering.ReplyNow`)."""
        raise NotImplementedError

    async def _rotate(self) -> None:
        """One initiator rotation (the native protocol's; a foreign one rotates by itself)."""

    # -- timer ---------------------------------------------------------------------------------

    async def tick(self) -> float:
        """Do what is due now until nothing is: rotate (native initiator), erase when stale,
        retry a failed erase, say once when nothing arrives (both roles and protocols).
        Returns when to look again."""
        while not self.stopped:
            self._poked = False  # deciding now: an earlier poke is answered
            now = trio.current_time()
            action = scheduler.decide(self.clock, self.config.timing, now)
            if isinstance(action, scheduler.Wait):
                wake = self._wake_time(action.until, now)
                if wake is not None:
                    return wake
                await self._early(action.until)
            elif isinstance(action, scheduler.Rotate):
                await self._rotate()
            else:
                async with self.lock:
                    # a commit may have landed while we waited for the lock: decide again
                    action = scheduler.decide(self.clock, self.config.timing, trio.current_time())
                    if isinstance(action, scheduler.Erase):
                        self.clock = scheduler.after_erase(self.clock)
                        await self.erase(action.reason)
                    elif isinstance(action, scheduler.RetryErase):
                        await self.retry_erase()
                    elif isinstance(action, scheduler.Starved):
                        self._starved()
                        self.clock = scheduler.after_starved(self.clock)
        return math.inf

    def _wake_time(self, until: float, now: float) -> float | None:
        """When to look again for a `Wait(until)`, or None when `_early` has work now."""
        return until

    async def _early(self, until: float) -> None:
        """Work ahead of a rotation due at `until` (the native initiator's prefetch)."""

    async def timer_loop(self) -> None:
        """The timer as the link's own task (a link of another protocol runs one)."""
        self._wake = trio.Event()
        while not self.stopped:
            until = await self.tick()
            with trio.move_on_at(until):
                await self._wake.wait()
            self._wake = trio.Event()

    # -- timer, for links the agent times (one task for all: `LinkTimers`) ----------------------

    timed_by_agent = False
    """True: the agent's `LinkTimers` wakes the link and runs its work; no task of its own."""

    def due(self) -> None:
        """The agent's timer says the link's time has come: look again, and start a task only
        when there is work. Rotation work (a rotation, a prefetch: both take a rotation slot)
        waits its turn at `LinkTimers`' gate instead of as a task parked on the slots, so a
        burst of due links costs no task each; an erase never waits there."""
        if self.stopped:
            return
        if self._step is not None:
            self._poked = True
            return
        now = trio.current_time()
        action: scheduler.Action | None = None
        wake: float | None = None
        try:
            action = scheduler.decide(self.clock, self.config.timing, now)
            if isinstance(action, scheduler.Wait):
                wake = self._wake_time(action.until, now)
        except Exception as exc:
            wake = self._bug(exc)
        if wake is not None:
            self._queued = False
            self.env.timers.wake_at(self, wake)
        elif isinstance(action, scheduler.Rotate | scheduler.Wait):
            self._arm_deadline()
            if not self._queued:
                self._queued = True
                self.env.timers.enqueue(self)
        else:
            self._queued = False
            self._start_step(gated=False)

    def _arm_deadline(self) -> None:
        """While its rotation waits at the gate, the link's erase deadline stays armed."""
        clock, timing = self.clock, self.config.timing
        wake = math.inf if clock.erased else clock.last_success + timing.reject_after
        if clock.erase_retry_at is not None:
            wake = min(wake, clock.erase_retry_at)
        self.env.timers.wake_at(self, wake)

    def begin_gated(self) -> bool:
        """The gate's turn for the link's queued rotation work; False if it no longer waits."""
        if not self._queued or self.stopped or self._step is not None:
            return False
        self._queued = False
        self.env.timers.discard(self)  # the step arms the timer again when it ends
        self._start_step(gated=True)
        return True

    def _start_step(self, *, gated: bool) -> None:
        self._step = trio.CancelScope()
        self.env.timers.spawn(self._run_step, self._step, gated)

    async def _run_step(self, scope: trio.CancelScope, gated: bool) -> None:
        """Do the link's due work (its own task, so it delays no other link's), then arm the
        timer again. An exception is a bug: logged by type and place (its message might quote
        a key), and the link looks again after a backoff."""
        wake: float | None = None
        try:
            with scope:
                try:
                    wake = await self.tick()
                    self._bug_delay = LINK_RESTART_MIN
                except Exception as exc:
                    wake = self._bug(exc)
        finally:
            self._step = None
            if self._stepped is not None:
                self._stepped.set()
                self._stepped = None
            if gated:
                self.env.timers.release()
        if wake is None or self.stopped:
            return  # halted
        if self._poked:
            self._poked = False
            wake = trio.current_time()
        self.env.timers.wake_at(self, wake)

    def _bug(self, exc: Exception) -> float:
        delay = self._bug_delay
        self._bug_delay = min(delay * 2, LINK_RESTART_MAX)
        log.error(
            "link %s: unexpected %s%s; the link restarts in %g s (a bug)",
            self.name, type(exc).__name__, raised_at(exc), delay,
            extra={"link": self.name, "stage": "internal"},
        )  # fmt: skip
        self.status.last_error = f"internal: unexpected {type(exc).__name__}"
        self.status.last_error_at = time.time()
        return trio.current_time() + delay

    async def halt(self, *, retire: bool = False) -> None:
        """Stop the agent-timed link: an exchange under way (it holds the lock) finishes, and
        so do peer requests queued for the lock ahead of this; work still waiting to start is
        cancelled; returns when none of its work runs. `retire`: the agent removes or replaces
        the link, so requests that get the lock after this are refused (`retired`)."""
        self.stop()
        async with self.lock:
            self.retired = self.retired or retire
            if self._step is not None:
                self._step.cancel()
        if self._step is not None:
            if self._stepped is None:
                self._stepped = trio.Event()
            await self._stepped.wait()

    def _starved(self) -> None:
        """Nothing committed within reject_after on a side that cannot rotate by itself."""

    # -- fail closed ---------------------------------------------------------------------------

    @property
    def erase_failed(self) -> dict[str, str]:
        return self.sinks.erase_failed

    async def erase(self, reason: str) -> None:
        """Fail closed: erase every sink; a failed erase is retried (scheduler.RetryErase)."""
        self.status.erased_reason = reason
        await self.sinks.erase(reason, self.record.epoch)
        self._erase_attempted()

    async def retry_erase(self) -> None:
        """Retry the sinks whose erase failed. While the link is live (it rotated since), a
        sink still listed failed its erase and then an install too: it gets the current key,
        not an erase that would leave it keyless until the next rotation."""
        if not self.clock.erased and self.record.epoch > 0:
            await self.sinks.install(self.record, only=frozenset(self.sinks.erase_failed))
        else:
            await self.sinks.retry_erase(self.record.epoch)
        self._erase_attempted()

    def _erase_attempted(self) -> None:
        self.clock = scheduler.after_erase_attempt(
            self.clock,
            self.config.timing,
            trio.current_time(),
            failed=bool(self.sinks.erase_failed),
        )

    # -- bookkeeping -------------------------------------------------------------------------

    def succeeded(
        self,
        started: float,
        key_ids: tuple[tuple[str, str], ...],
        failed: list[str],
        parts: dict[str, float] | None = None,
    ) -> None:
        """A rotation committed and was installed on this side (`failed`: sinks that did not
        take it; `parts`: where its time went, `stopwatch.Stopwatch`)."""
        record = self.record
        now = trio.current_time()
        duration = now - started
        self.clock = scheduler.after_success(self.clock, self.config.timing, now, self.rand())
        if self.commit_lost:
            # The next rotate under the new auth key also commits the peer's pending epoch.
            self.commit_lost = False
            self.clock = scheduler.after_failure(self.clock, self.config.timing, now)
        self._erase_attempted()  # installs may have ended erase retries
        self.status.rotations += 1
        self.status.last_rotation_seconds = duration
        self.status.erased_reason = None
        self.env.metrics.rotation_done(self.name, record.epoch, duration)
        log.info(
            "link %s: epoch %d committed (%s) in %.1f ms, key IDs %s%s",
            self.name,
            record.epoch,
            "initiator" if self.config.initiator else "responder",
            duration * 1000,
            ",".join(k for _, k in key_ids),
            f" ({parts_text(parts)})" if parts else "",
            extra={
                "link": self.name,
                "epoch": record.epoch,
                "duration_ms": duration * 1000,
                "parts_ms": parts_ms(parts) if parts else None,
            },
        )
        self.env.observers.after_rotation(
            RotationEvent(
                self.name,
                record.epoch,
                tuple(k for _, k in key_ids),
                self.config.initiator,
                duration,
                tuple(self.sinks.ids),
                tuple(failed),
            )
        )
        self._after_commit()

    def _after_commit(self) -> None:
        """Decide what is due next now, for a link the agent times: a wake-up of the agent's
        timer to decide it was a pass of its task per rotation on a responder (which rotates
        in no step of its own; an initiator's step decides when it ends)."""
        if not self.timed_by_agent:
            self.poke()
            return
        try:
            self.due()
        except Exception as exc:  # a bug: the commit stands; the timer decides instead
            log.error(
                "link %s: deciding what is next raised %s (a bug)",
                self.name,
                type(exc).__name__,
                extra={"link": self.name, "stage": "internal"},
            )
            self.poke()

    def failed(self, epoch: int, stage: str, message: str) -> None:
        """A rotation attempt failed at `stage` (backoff for the initiator; no key bytes)."""
        now = trio.current_time()
        self.status.failures += 1
        self.status.last_error = f"{stage}: {message}"[:500]
        self.status.last_error_at = time.time()
        if self.config.initiator:
            self.clock = scheduler.after_failure(self.clock, self.config.timing, now)
        self.env.metrics.failures.labels(self.name, stage).inc()
        log.warning(
            "link %s: rotation failed at %s: %s", self.name, stage, message,
            extra={"link": self.name, "epoch": epoch, "stage": stage},
        )  # fmt: skip
        self.env.observers.on_rotation_error(RotationErrorEvent(self.name, epoch, stage, message))

    def describe(self) -> dict[str, Any]:
        record = self.record
        now_wall, now = time.time(), trio.current_time()
        committed = record.committed_at if record.epoch > 0 else None
        next_rotation = None
        if self.clock.initiator:
            next_rotation = now_wall + max(0.0, self.clock.next_attempt - now)
        return {
            "link": self.name,
            "peer": self.config.peer,
            "role": "initiator" if self.config.initiator else "responder",
            "configured_role": self.config.role,
            "epoch": record.epoch,
            "last_success": committed,
            "key_age": None if committed is None else now_wall - committed,
            "next_rotation": next_rotation,
            "erased": self.status.erased_reason,
            "erase_failed": sorted(self.sinks.erase_failed) or None,
            "rotations": self.status.rotations,
            "failures": self.status.failures,
            "last_error": self.status.last_error,
            "last_error_at": self.status.last_error_at,
            "last_rotation_ms": None
            if self.status.last_rotation_seconds is None
            else round(self.status.last_rotation_seconds * 1000, 3),
            "sources": [s.id for s in self.sources],
            "sinks": self.sinks.ids,
            "protocol": self.protocol,
        }


class LinkRuntime(BaseLink):
    """The native protocol (DESIGN §4). Build with `await LinkRuntime.open(...)`: a runtime
    always has its state loaded."""

    def _setup(self) -> None:
        config = self.config
        self.start = ratchet.chain_start(native_bootstrap(config), config.name)
        self.facts = rules.LinkFacts(
            link=config.name,
            local=self.env.agent_name,
            peer=config.peer,
            peer_identity=config.peer_identity,
            initiator=config.initiator,
            source_ids=tuple(config.sources),
            shared_labels=self.sinks.shared_labels,
            start=self.start,
            max_key_ids=tuple(s.max_key_id for s in self.sources),
        )
        self.initiator = Initiator(self)
        self.responder = Responder(self)

    # -- life cycle --------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        env: LinkEnv,
        config: LinkConfig,
        sources: list[SourceHandle],
        sinks: list[SinkHandle],
    ) -> LinkRuntime:
        """Load or create the link's state and put its sinks in a defined state: the current
        key if it is fresh, else erased (fail closed)."""
        start = ratchet.chain_start(native_bootstrap(config), config.name)
        record, clock, fresh = await cls.load_record(
            env, config, config.peer, start.chain_key, start.auth_key
        )
        runtime = cls(env, config, sources, sinks, record, clock)
        await runtime.start_sinks(fresh)
        return runtime

    timed_by_agent = True

    async def _rotate(self) -> None:
        await self.initiator.rotate_once()

    def _wake_time(self, until: float, now: float) -> float | None:
        """An initiator takes the next rotation's source keys `PREFETCH_LEAD` before it is due
        (`Initiator.prefetch`, in `_early`), so the sources' round trips are off the rotation's
        path."""
        clock = self.clock
        if not clock.initiator or until != clock.next_attempt or clock.failures:
            # after a failure the retry fetches its own keys: no double load on a failing source
            return until
        early = until - prefetch_lead(self.config.timing.interval)
        if now < early:
            return early
        return None if self.initiator.wants_prefetch(until) else until

    async def _early(self, until: float) -> None:
        await self.initiator.prefetch(until)

    async def erase(self, reason: str) -> None:
        self.responder.drop_ahead()
        await super().erase(reason)

    async def rotate_once(self) -> bool:
        """One initiator rotation attempt now; returns whether it committed."""
        return await self.initiator.rotate_once()

    async def handle(
        self,
        action: str,
        body: bytes,
        identity: PeerIdentity,
        reply_now: ReplyNow | None = None,
    ) -> bytes:
        """A peer request for this link (see `Responder.handle`)."""
        return await self.responder.handle(action, body, identity, reply_now)

    def _starved(self) -> None:
        """A responder cannot rotate by itself: say what to check (both sides responder is a
        configuration no single side can detect, so name it)."""
        message = (
            f"no rotation from peer {self.config.peer!r} within reject_after "
            f"({self.config.timing.reject_after:g} s): is it running, reachable, and configured "
            "as the initiator (role = initiator or auto) for this link?"
        )
        self.status.last_error = f"peer: {message}"
        self.status.last_error_at = time.time()
        if self.record.epoch == 0:
            # Never rotated: a configuration problem, worth a line. A link that did rotate
            # and then went quiet was already reported by its reject_after erase.
            log.warning(
                "link %s: %s", self.name, message, extra={"link": self.name, "stage": "peer"}
            )
