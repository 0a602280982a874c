"""A link's sinks as one: install into all, erase all, and remember which erase failed.

Fail closed means the old key is really gone: a sink whose erase fails stays in `erase_failed`
(with the reason it was erased for) until a retried erase, or an install of a newer key,
replaces it; meanwhile the sink is never reported as erased, a gauge counts it and a
`ComponentEvent` says so once. When to retry is the scheduler's decision (`RetryErase`).
"""

from __future__ import annotations

import logging
import time

import trio

from .components import SinkHandle
from .errors import QkdAgentError
from .events import ComponentEvent, EraseEvent
from .interfaces import KeyMeta, Link
from .linkenv import LinkEnv
from .state import LinkRecord

log = logging.getLogger("qkdagent.link")


class LinkSinks:
    def __init__(self, env: LinkEnv, link: Link, handles: list[SinkHandle]) -> None:
        self.env = env
        self.link = link
        self.name = link.name
        self.handles = handles
        self.labels = [h.label for h in handles]
        self.shared_labels = tuple(sorted({h.label for h in handles if not h.local_only}))
        """Labels compared with the peer's (DESIGN v2 §4): a local-only sink's is not."""
        self.erase_failed: dict[str, str] = {}
        """Sink id -> reason, for sinks whose fail-closed erase failed and is retried."""

    @property
    def ids(self) -> list[str]:
        return [h.id for h in self.handles]

    def handle(self, sink_id: str) -> SinkHandle:
        return next(h for h in self.handles if h.id == sink_id)

    # -- install -------------------------------------------------------------------------------

    async def install(self, record: LinkRecord, only: frozenset[str] | None = None) -> list[str]:
        """Install the record's outputs into every sink at once; returns the sinks that failed.

        A sink added after the epoch was derived has no output yet: it is erased (fail closed)
        until the next rotation derives one for its label.
        """
        created = record.committed_at or time.time()
        ids = tuple(k for _, k in record.key_ids)
        failed: list[str] = []

        async def one(handle: SinkHandle) -> None:
            secret = record.outputs.get(handle.label)
            if secret is None:
                if not await self._erase_one(handle, "no-key-yet"):
                    failed.append(handle.id)
                    self._outcome("no-key-yet", [], [handle.id])
                return
            meta = KeyMeta(record.epoch, ids, handle.label, created)
            try:
                await handle.install(self.link, secret, meta)
                self.env.metrics.installs.labels(self.name, handle.id, "ok").inc()
            except QkdAgentError as exc:
                failed.append(handle.id)
                self.env.metrics.installs.labels(self.name, handle.id, "error").inc()
                log.error(
                    "link %s: sink %s: install failed: %s", self.name, handle.id, exc,
                    extra={"link": self.name, "sink": handle.id, "stage": "install"},
                )  # fmt: skip

        chosen = [h for h in self.handles if only is None or h.id in only]
        if len(chosen) == 1:  # the common case: no task to spawn (a scheduler pass each)
            await one(chosen[0])
        else:
            async with trio.open_nursery() as nursery:
                for handle in chosen:
                    nursery.start_soon(one, handle)
        if self.erase_failed:  # a sink that now holds the new key no longer needs erasing
            self._outcome(
                "rotation",
                [s for s in self.erase_failed if s not in failed and (only is None or s in only)],
                [],
                how=f"the sink now holds epoch {record.epoch}'s key instead",
            )
        return failed

    # -- erase ---------------------------------------------------------------------------------

    async def erase(self, reason: str, epoch: int, only: frozenset[str] | None = None) -> None:
        """Fail closed: every sink (or those in `only`) gets a random secret or loses its key."""
        erased: list[str] = []
        failed: list[str] = []

        async def one(handle: SinkHandle) -> None:
            (erased if await self._erase_one(handle, reason) else failed).append(handle.id)

        async with trio.open_nursery() as nursery:
            for handle in self.handles:
                if only is None or handle.id in only:
                    nursery.start_soon(one, handle)
        if erased and reason != "startup":
            log.warning(
                "link %s: sinks erased (%s): %s", self.name, reason, ", ".join(sorted(erased)),
                extra={"link": self.name, "epoch": epoch, "reason": reason},
            )  # fmt: skip
        self._outcome(reason, erased, failed)
        self.env.metrics.erasures.labels(self.name, reason).inc()
        if erased or only is None:  # a retry that erased nothing is no news for observers
            self.env.observers.after_erase(
                EraseEvent(self.name, epoch, reason, tuple(sorted(erased)))
            )

    async def retry_erase(self, epoch: int) -> None:
        """Erase again the sinks whose erase failed, each with the reason it was erased for."""
        by_reason: dict[str, set[str]] = {}
        for sink_id, reason in self.erase_failed.items():
            by_reason.setdefault(reason, set()).add(sink_id)
        for reason, sink_ids in by_reason.items():
            await self.erase(reason, epoch, only=frozenset(sink_ids))

    async def _erase_one(self, handle: SinkHandle, reason: str) -> bool:
        try:
            await handle.erase(self.link, reason)
            return True
        except QkdAgentError as exc:
            log.error(
                "link %s: sink %s: erase failed: %s", self.name, handle.id, exc,
                extra={"link": self.name, "sink": handle.id, "stage": "erase"},
            )  # fmt: skip
            return False

    def _outcome(
        self, reason: str, erased: list[str], failed: list[str], *, how: str | None = None
    ) -> None:
        """Track which sinks may still hold a key that should be gone, and say so."""
        for sink_id in erased:
            if self.erase_failed.pop(sink_id, None) is not None:
                detail = how or f"retried erase ({reason}) succeeded"
                self.env.report(ComponentEvent(sink_id, "erase_recovered", detail, self.name))
        for sink_id in failed:
            if sink_id not in self.erase_failed:
                self.env.report(
                    ComponentEvent(
                        sink_id,
                        "erase_failed",
                        f"fail-closed erase ({reason}) failed: the sink may still hold the "
                        "link's old key; retrying with backoff",
                        self.name,
                    )
                )
            self.erase_failed[sink_id] = reason
        self.env.metrics.erase_failed.labels(self.name).set(len(self.erase_failed))
