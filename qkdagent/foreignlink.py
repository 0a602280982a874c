"""A link run by a plugin's peer protocol (`linkprotocol.py`), with the core's guarantees kept.

The protocol decides when to rotate and what the secret is; the core keeps the rest: the
secret is committed durably (with the protocol's state and the key IDs, recorded as used)
before any sink sees it, the sinks are erased when nothing committed within `reject_after`,
a failed erase is retried, and status, metrics and hooks see the link like any other. The
stored record is kept under "<peer> via <protocol>", so switching a link between protocols
starts a fresh chain instead of reusing the other protocol's state.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import trio

from . import scheduler
from .components import SinkHandle, SourceHandle
from .config import LinkConfig
from .errors import ProtocolError, SinkError, SourceError, raised_at
from .identity import PeerIdentity
from .lifecycle import RESTART_MAX, RESTART_MIN, OnceStarted
from .link import BaseLink
from .linkenv import LinkEnv
from .linkprotocol import ForeignLink, LinkProtocol
from .peering import ReplyNow
from .secret import Key, Secret
from .state import LinkRecord

log = logging.getLogger("qkdagent.link")

STATE = ":protocol"
"""The protocol's state among the link's source states (no source id has a colon)."""
ERASED = ":erased"
"""Set durably when the sinks were erased: the committed key is dead even before reject_after
(the protocol gave it up, as quPSKd does at expiry), so a restart must not put it back."""
MIN_SECRET = 16


def insecure_warning(config: LinkConfig) -> str:
    return (
        f"link {config.name}: protocol {config.protocol!r} does not authenticate its peer "
        "(insecure = true): anyone on the path can read the key IDs, reset the chain or make "
        "the two sides disagree; use it only while migrating"
    )


class ForeignLinkRuntime(BaseLink, ForeignLink):
    """Build with `await ForeignLinkRuntime.open(...)`."""

    def __init__(
        self,
        env: LinkEnv,
        config: LinkConfig,
        sources: list[SourceHandle],
        sinks: list[SinkHandle],
        record: LinkRecord,
        clock: scheduler.Clock,
        runner: LinkProtocol,
    ) -> None:
        super().__init__(env, config, sources, sinks, record, clock)
        self.runner = runner
        self.protocol = config.protocol
        self.source_ids = tuple(h.id for h in sources)
        self.interval = config.timing.interval
        self.reject_after = config.timing.reject_after
        self._protocol_scope: trio.CancelScope | None = None

    @classmethod
    async def open(
        cls,
        env: LinkEnv,
        config: LinkConfig,
        sources: list[SourceHandle],
        sinks: list[SinkHandle],
        runner: LinkProtocol,
    ) -> ForeignLinkRuntime:
        unused = Secret(os.urandom(32))  # the native chain keys, never used on this link
        record, clock, fresh = await cls.load_record(
            env, config, f"{config.peer} via {config.protocol}", unused, unused
        )
        if fresh and ERASED in record.source_state:
            fresh = False  # erased since its commit: stays erased (start_sinks erases again)
            clock = scheduler.after_erase(clock)
        runtime = cls(env, config, sources, sinks, record, clock, runner)
        if config.insecure:
            log.warning(insecure_warning(config), extra={"link": config.name})
        await runtime.start_sinks(fresh)
        return runtime

    # -- what the protocol sees (ForeignLink) --------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.record.epoch

    @property
    def erased(self) -> bool:
        return self.clock.erased or self.record.epoch == 0

    @property
    def state(self) -> bytes | None:
        return self.record.source_state.get(STATE)

    async def _mark_erased(self) -> None:
        if ERASED in self.record.source_state or self.record.epoch == 0:
            return
        store = self.env.store
        await store.run(store.set_source_state, self.name, ERASED, b"1")
        self.record.source_state[ERASED] = b"1"

    def _source(self, source: str | None) -> SourceHandle:
        for handle in self.sources:
            if source is None or handle.id == source:
                return handle
        raise SourceError(f"link {self.name!r} has no source {source!r}")

    async def new_key(self, source: str | None = None) -> Key:
        return await self._source(source).offer(self.link, None)

    async def key_by_id(self, key_id: str, source: str | None = None) -> Key:
        handle = self._source(source)
        store = self.env.store
        if await store.run(store.is_used, self.name, handle.id, key_id):
            raise SourceError(f"key ID {key_id[:80]!r} of source {handle.id!r} was already used")
        return (await handle.answer(self.link, key_id, None)).key

    async def commit(
        self,
        secret: Secret,
        key_ids: Sequence[str],
        *,
        state: bytes | None = None,
        started: float | None = None,
    ) -> int:
        if not isinstance(secret, Secret) or len(secret) < MIN_SECRET:
            raise SinkError(f"link {self.name}: a secret must be a Secret of {MIN_SECRET}+ bytes")
        if len(key_ids) != len(self.sources):
            raise SourceError(f"link {self.name}: one key ID per source expected")
        ids = tuple((h.id, k) for h, k in zip(self.sources, key_ids, strict=True))
        begun = trio.current_time() if started is None else started
        outputs = {h.label: secret for h in self.sinks.handles}
        store = self.env.store

        def write() -> LinkRecord:
            return store.commit(
                self.name,
                epoch=self.record.epoch + 1,
                chain_key=self.record.chain_key,
                auth_key=self.record.auth_key,
                key_ids=ids,
                outputs=outputs,
                mark_used=True,
                source_state={} if state is None else {STATE: state},
            )

        async with self.lock:
            # Shielded: a stop (shutdown, reload) lets a commit reach its sinks; each sink call
            # has its own timeout.
            with trio.CancelScope(shield=True):
                self.record = await store.run(write)
                failed = await self.sinks.install(self.record)
                self.succeeded(begun, ids, failed)
        return self.record.epoch

    async def erase(self, reason: str) -> None:
        """Fail closed now (the protocol's call), or from the timer that holds the lock; the
        erasure is recorded durably first, so a restart does not reinstall the dead key. The
        sinks are erased even when that record fails (the error is raised after), and a stop
        lets an erase under way finish, as it lets a commit (each sink call has its timeout)."""
        if self.lock.statistics().owner is trio.lowlevel.current_task():
            await self._erase_recorded(reason)
            return
        async with self.lock:
            with trio.CancelScope(shield=True):
                self.clock = scheduler.after_erase(self.clock)
                await self._erase_recorded(reason)

    async def _erase_recorded(self, reason: str) -> None:
        try:
            await self._mark_erased()
        finally:
            await super().erase(reason)

    def report_failure(self, stage: str, message: str) -> None:
        self.failed(self.record.epoch, stage, message)

    # -- what the agent sees -------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The core's timer (expiry erase, erase retries) beside the protocol's own task."""
        if self.stopped:
            task_status.started()
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.timer_loop)  # ends on stop(), after an erase under way
            await nursery.start(self._supervise)
            task_status.started()

    def stop(self) -> None:
        """The protocol stops at once (a commit under way finishes: it is shielded); the
        core's timer ends after any erase it is doing, as a native link's does."""
        super().stop()
        if self._protocol_scope is not None:
            self._protocol_scope.cancel()

    async def _supervise(self, task_status: trio.TaskStatus[None]) -> None:
        """Run the protocol; if it raises, log by type and place and start it again."""
        status = OnceStarted(task_status)
        delay = RESTART_MIN
        # a new scope each run: the agent restarts a run that failed with a bug
        self._protocol_scope = scope = trio.CancelScope()
        if self.stopped:
            scope.cancel()
        with scope:
            await self._protocol_loop(status, delay)
        status.started()

    async def _protocol_loop(self, status: OnceStarted, delay: float) -> None:
        while True:
            began = trio.current_time()
            try:
                await self.runner.run(self, task_status=status)
            except Exception as exc:
                if trio.current_time() - began > RESTART_MAX:
                    delay = RESTART_MIN  # it ran well for a while: a fresh failure, short wait
                where = raised_at(exc)
                message = f"protocol {self.protocol!r} stopped: {type(exc).__name__}{where}"
                log.error(
                    "link %s: %s; restarting it in %g s", self.name, message, delay,
                    extra={"link": self.name, "stage": "protocol"},
                )  # fmt: skip
                self.status.last_error = f"protocol: {message}"
                self.status.last_error_at = time.time()
            else:
                if trio.current_time() - began > RESTART_MAX:
                    delay = RESTART_MIN
                message = f"protocol {self.protocol!r} returned; restarting it in {delay:g} s"
                log.error("link %s: %s", self.name, message, extra={"link": self.name})
            status.started()
            await trio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX)

    async def handle(
        self,
        action: str,
        body: bytes,
        identity: PeerIdentity,
        reply_now: ReplyNow | None = None,
    ) -> bytes:
        raise ProtocolError("unknown link", status=404)

    def _starved(self) -> None:
        message = (
            f"nothing committed over protocol {self.protocol!r} with peer {self.config.peer!r} "
            f"within reject_after ({self.config.timing.reject_after:g} s)"
        )
        self.status.last_error = f"peer: {message}"
        self.status.last_error_at = time.time()
        if self.record.epoch == 0:
            log.warning("link %s: %s", self.name, message, extra={"link": self.name})

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described["insecure"] = self.config.insecure
        try:
            extra = dict(self.runner.describe())
        except Exception as exc:  # a plugin bug must not break /status
            extra = {"describe_error": type(exc).__name__}
        described.update({k: v for k, v in extra.items() if k not in described})
        return described
