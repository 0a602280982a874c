"""One link at run time: the rotation protocol of DESIGN §4 for both roles, and its timers.

The initiator drives rotations from `run()`; the responder answers `handle_*` calls from the peer
API. Both hold `self.lock` for a whole exchange so a link is never in two rotations at once. State
is written through the store before any sink is touched, and every refusal of a peer message
happens before any state changes.
"""

from __future__ import annotations

import hmac
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import trio

from . import protocol, ratchet, scheduler
from . import responder_rules as rules
from .components import SinkHandle, SourceHandle
from .config import LinkConfig
from .errors import KeyNotFound, KeyReuseError, ProtocolError, QkdAgentError, SourceError
from .events import ComponentEvent, EraseEvent, RotationErrorEvent, RotationEvent
from .faults import crash_point
from .identity import PeerIdentity
from .interfaces import KeyMeta, Link
from .peering import PeerReply
from .secret import Key
from .state import LinkRecord, Pending

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger(__name__)

REQUEST_RETRIES = 3


class RotationFailed(Exception):
    """A rotation attempt ended without a commit; `stage` says where."""

    def __init__(self, stage: str, message: str) -> None:
        self.stage = stage
        super().__init__(message)


@dataclass
class LinkStatus:
    """What `qkdagent status` shows for a link (no key material)."""

    last_error: str | None = None
    last_error_at: float | None = None
    last_rotation_seconds: float | None = None
    rotations: int = 0
    failures: int = 0
    erased_reason: str | None = None


class LinkRuntime:
    def __init__(self, agent: Agent, config: LinkConfig) -> None:
        self.agent = agent
        self.config = config
        self.name = config.name
        self.link = Link(config.name, agent.name, config.peer, config.initiator)
        self.sources: list[SourceHandle] = [agent.components.sources[s] for s in config.sources]
        self.sinks: list[SinkHandle] = [agent.components.sinks[s] for s in config.sinks]
        self.labels = [s.label for s in self.sinks]
        self.shared_labels = tuple(sorted({s.label for s in self.sinks if not s.local_only}))
        """Labels compared with the peer's (DESIGN v2 §4): a local-only sink is not."""
        self.start = ratchet.chain_start(config.bootstrap, config.name)
        self.facts = rules.LinkFacts(
            link=config.name,
            local=agent.name,
            peer=config.peer,
            peer_identity=config.peer_identity,
            initiator=config.initiator,
            source_ids=tuple(config.sources),
            shared_labels=self.shared_labels,
            start=self.start,
        )
        self.lock = trio.Lock()
        self.record: LinkRecord | None = None
        self.clock: scheduler.Clock | None = None
        self.wake = trio.Event()
        self.status = LinkStatus()
        self.stopped = False
        self.commit_lost = False
        """Set when the peer did not acknowledge a commit: the next rotation comes early."""
        self.erase_failed: dict[str, str] = {}
        """Sink id -> reason, for sinks whose fail-closed erase failed and is retried."""
        self.rand: Callable[[], float] = random.random

    # -- life cycle --------------------------------------------------------------------------

    async def open(self) -> None:
        """Load or create state; put the sinks in a defined state (current key or fail-closed)."""
        store = self.agent.store
        record = await store.run(store.load, self.name)
        if record is not None and max(record.epoch, rules.epoch_floor(record)) >= (
            protocol.RESYNC_CEILING
        ):
            # Only a forged epoch hint of older versions could have put the link up here, from
            # where it could not rotate for long: start a fresh chain (the peer resyncs).
            log.warning(
                "link %s: stored epoch %d is above any reachable epoch; starting a fresh chain",
                self.name, record.epoch, extra={"link": self.name, "stage": "state"},
            )  # fmt: skip
            record = None
        if record is None or record.peer != self.config.peer:
            record = await store.run(
                store.create, self.name, self.config.peer, self.start.chain_key, self.start.auth_key
            )
        self.record = record
        now = trio.current_time()
        age = None if record.committed_at is None else max(0.0, time.time() - record.committed_at)
        fresh = record.epoch > 0 and age is not None and age < self.config.timing.reject_after
        if fresh:
            assert age is not None
            await self._install_collect(self._meta(record), [])
        else:
            await self.erase_sinks("startup" if record.epoch == 0 else "reject_after")
        self.clock = scheduler.start(
            self.config.initiator,
            now,
            last_success=(now - age) if fresh and age is not None else None,
            erased=not fresh,
        )
        if self.erase_failed:  # an erase at start-up failed: retry it like any other
            self.clock = scheduler.after_erase_attempt(
                self.clock, self.config.timing, now, failed=True
            )

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()

    def poke(self) -> None:
        self.wake.set()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The link's timer loop: rotate when due (initiator), erase when stale (both roles)."""
        task_status.started()
        while not self.stopped:
            assert self.clock is not None
            action = scheduler.decide(self.clock, self.config.timing, trio.current_time())
            if isinstance(action, scheduler.Wait):
                with trio.move_on_at(action.until):
                    await self.wake.wait()
                self.wake = trio.Event()
            elif isinstance(action, scheduler.Rotate):
                await self.rotate_once()
            else:
                async with self.lock:
                    # a commit may have landed while we waited for the lock: decide again
                    action = scheduler.decide(self.clock, self.config.timing, trio.current_time())
                    if isinstance(action, scheduler.Erase):
                        self.clock = scheduler.after_erase(self.clock)
                        await self.erase_sinks(action.reason)
                    elif isinstance(action, scheduler.RetryErase):
                        await self.retry_erase()
                    elif isinstance(action, scheduler.Starved):
                        self._responder_starved()
                        self.clock = scheduler.after_starved(self.clock)

    def _responder_starved(self) -> None:
        """A responder cannot rotate by itself: say what to check (both sides responder is a
        configuration no single side can detect, so name it)."""
        message = (
            f"no rotation from peer {self.config.peer!r} within reject_after "
            f"({self.config.timing.reject_after:g} s): is it running, reachable, and configured "
            "as the initiator (role = initiator or auto) for this link?"
        )
        self.status.last_error = f"peer: {message}"
        self.status.last_error_at = time.time()
        if self.record is None or self.record.epoch == 0:
            # Never rotated: a configuration problem, worth a line. A link that did rotate
            # and then went quiet was already reported by its reject_after erase.
            log.warning(
                "link %s: %s", self.name, message, extra={"link": self.name, "stage": "peer"}
            )

    # -- initiator ---------------------------------------------------------------------------

    async def rotate_once(self) -> bool:
        """One initiator rotation attempt; returns whether it committed."""
        async with self.agent.rotation_slots, self.lock:
            started = trio.current_time()
            assert self.record is not None
            epoch = self.record.epoch
            try:
                with trio.fail_after(self.agent.settings.rotation_timeout):
                    await self._rotate(started)
                return True
            except trio.TooSlowError:
                self._failed(epoch, "timeout", "rotation timed out")
            except RotationFailed as exc:
                self._failed(epoch, exc.stage, str(exc))
            except QkdAgentError as exc:
                self._failed(epoch, "source" if isinstance(exc, SourceError) else "state", str(exc))
            except Exception as exc:  # a bug: one failed attempt, never the agent (message dropped)
                log.debug("link %s: rotation attempt raised", self.name, exc_info=True)
                self._failed(epoch, "internal", f"unexpected {type(exc).__name__}")
            return False

    async def _rotate(self, started: float) -> None:
        record = self.record
        assert record is not None
        keys = await self._new_keys()
        crash_point("initiator:keys-fetched")
        key_ids = tuple((src.id, key.key_id) for src, key in zip(self.sources, keys, strict=True))
        epoch = record.epoch + 1
        kind, chain_key, auth_key = "rotate", record.chain_key, record.auth_key
        reply, nonce, sent = await self._exchange(kind, epoch, key_ids, auth_key)
        refusal = self._refusal(reply, sent)
        if refusal is not None and refusal.code == "epoch":
            if refusal.epoch >= protocol.RESYNC_CEILING:
                raise RotationFailed(
                    "peer", f"peer claims epoch {refusal.epoch}, above any reachable epoch"
                )
            log.warning(
                "link %s: peer is on epoch %s, we are on %s; resynchronising",
                self.name,
                refusal.epoch,
                record.epoch,
                extra={"link": self.name, "epoch": record.epoch, "stage": "resync"},
            )
            # The peer lost state or we did: restart the chain from the bootstrap secret with the
            # fresh keys, at an epoch above both sides' so that no old message can be replayed.
            keys = await self._new_keys()
            key_ids = tuple((s.id, k.key_id) for s, k in zip(self.sources, keys, strict=True))
            epoch = max(record.epoch, refusal.epoch) + 1
            kind, chain_key, auth_key = "resync", self.start.chain_key, self.start.auth_key
            reply, nonce, sent = await self._exchange(kind, epoch, key_ids, auth_key)
            refusal = self._refusal(reply, sent)
        if refusal is not None:
            raise RotationFailed(
                "peer", f"peer refused {kind}: {refusal.code}: {_printable(refusal.message)}"
            )
        message = self._parse_reply(reply.body, kind + "-reply", epoch, auth_key, nonce)
        crash_point("initiator:reply-received")
        transcript = ratchet.Transcript(
            self.name, self.agent.name, self.config.peer, epoch, key_ids, nonce, message.nonce
        )
        inputs = [
            ratchet.SourceInput(src.id, key.key_id, key.value)
            for src, key in zip(self.sources, keys, strict=True)
        ]
        derived = ratchet.rotate(chain_key, inputs, transcript, self.labels)
        if not hmac.compare_digest(message.confirm, ratchet.confirmation(derived, "responder")):
            raise RotationFailed("confirm", "key confirmation failed: the peer derived other keys")
        try:
            # One transaction: the key IDs are recorded as used and the epoch committed together.
            self.record = await self.agent.store.run(
                lambda: self.agent.store.commit(
                    self.name,
                    epoch=epoch,
                    chain_key=derived.chain_key,
                    auth_key=derived.auth_key,
                    key_ids=key_ids,
                    outputs=derived.outputs,
                    mark_used=True,
                )
            )
        except KeyReuseError as exc:
            raise RotationFailed("source", str(exc)) from None
        crash_point("initiator:committed")
        commit_nonce = protocol.new_nonce()
        commit = protocol.build(
            "commit",
            link=self.name,
            sender=self.agent.name,
            receiver=self.config.peer,
            epoch=epoch,
            auth_key=derived.auth_key,
            nonce=commit_nonce,
            confirm=ratchet.confirmation(derived, "initiator"),
        )
        failed: list[str] = []
        # DESIGN §4: install here first, then commit, so the responder's install is the last one
        # (a sink that must act once both consumers hold the key, e.g. a strongSwan reauth, acts
        # from the responder's install).
        await self._install_collect(self._meta(self.record), failed)
        crash_point("initiator:installed")
        await self._send_commit(self.record, commit, commit_nonce)
        self._succeeded(started, key_ids, failed)

    async def _new_keys(self) -> list[Key]:
        keys = []
        for source in self.sources:
            try:
                keys.append(await source.new_key(self.link))
            except QkdAgentError as exc:
                raise RotationFailed("source", f"source {source.id!r}: {exc}") from None
        return keys

    async def _exchange(
        self, kind: str, epoch: int, key_ids: tuple[tuple[str, str], ...], auth_key: Any
    ) -> tuple[PeerReply, bytes, bytes]:
        """Send a rotate or resync; returns the reply, our nonce and the body we sent."""
        nonce = protocol.new_nonce()
        body = protocol.build(
            kind,
            link=self.name,
            sender=self.agent.name,
            receiver=self.config.peer,
            epoch=epoch,
            auth_key=auth_key,
            keys=[list(pair) for pair in key_ids],
            labels=list(self.shared_labels),
            nonce=nonce,
        )
        return await self._post(kind, body), nonce, body

    def _refusal(self, reply: PeerReply, sent: bytes) -> protocol.Refusal | None:
        """None for a 200; the peer's authenticated refusal; else one failed attempt.

        Only a refusal MAC'd under the bootstrap-derived auth key and bound to the request we
        sent may change what we do next (DESIGN v2 §4): anyone on the path could have written
        any other, so it is logged, counted and acted on no further than a lost reply.
        """
        if reply.status == 200:
            return None
        try:
            refusal = protocol.parse_refusal(reply.body)
        except ProtocolError:
            refusal = None
        if refusal is not None and protocol.verify_refusal(
            refusal,
            bootstrap_auth=self.start.auth_key,
            link=self.name,
            sender=self.config.peer,
            receiver=self.agent.name,
            request=sent,
        ):
            return refusal
        self.agent.metrics.unauthenticated_refusals.labels(self.name).inc()
        raise RotationFailed(
            "peer", f"peer answered {reply.status} without an authenticated refusal (ignored)"
        )

    async def _post(self, action: str, body: bytes) -> PeerReply:
        """Send with bounded retransmission: the responder answers a repeat idempotently."""
        delay = 0.05
        for attempt in range(REQUEST_RETRIES):
            try:
                reply = await self.agent.client.post(self.config.peer_url, self.name, action, body)
            except httpx.HTTPError as exc:
                error = _printable(f"{type(exc).__name__}: {exc}", 300)
            except trio.TooSlowError:
                error = "no complete reply in time"
            else:
                if not reply.identity.matches(self.config.peer_identity):
                    raise RotationFailed(
                        "peer",
                        f"{self.config.peer_url} presented a certificate naming "
                        f"{reply.identity.describe()}, not peer {self.config.peer_identity!r}",
                    )
                if reply.status < 500:
                    return reply
                error = f"HTTP {reply.status}"
            if attempt + 1 < REQUEST_RETRIES:
                await trio.sleep(delay)
                delay *= 4
        raise RotationFailed("peer", f"{action} to {self.config.peer_url} failed: {error}")

    def _parse_reply(
        self, body: bytes, kind: str, epoch: int, auth_key: Any, nonce: bytes
    ) -> protocol.Message:
        try:
            message = protocol.parse(body, expect=(kind,))
        except ProtocolError as exc:
            raise RotationFailed("peer", f"bad reply: {exc}") from None
        if (
            message.link != self.name
            or message.sender != self.config.peer
            or message.receiver != self.agent.name
            or message.epoch != epoch
            or not hmac.compare_digest(message.request_nonce, nonce)
        ):
            raise RotationFailed("peer", "reply does not answer this request")
        if not protocol.verify_mac(message, auth_key):
            raise RotationFailed("peer", "reply MAC does not verify")
        return message

    async def _send_commit(self, record: LinkRecord, body: bytes, nonce: bytes) -> None:
        """Tell the responder to commit; a lost commit is recovered by the next rotate."""
        try:
            reply = await self._post("commit", body)
            refusal = self._refusal(reply, body)
            if refusal is not None:
                raise RotationFailed(
                    "commit", f"peer refused commit: {refusal.code}: {_printable(refusal.message)}"
                )
            self._parse_reply(reply.body, "commit-reply", record.epoch, record.auth_key, nonce)
        except RotationFailed as exc:
            log.warning(
                "link %s: commit of epoch %d not acknowledged: %s", self.name, record.epoch, exc
            )
            self.commit_lost = True
            return

    # -- responder ---------------------------------------------------------------------------

    async def handle(self, action: str, body: bytes, identity: PeerIdentity) -> bytes:
        """Answer a peer request; a refusal raises ProtocolError carrying its reply body."""
        message = protocol.parse(body, expect=(action,))
        rejected = rules.admit(self.facts, self.name, message, identity)
        if rejected is not None:
            raise ProtocolError(rejected.message, status=rejected.status)
        conflict = rules.role_conflict(self.facts, action)
        if conflict is not None:
            raise self._refuse(conflict, body)
        async with self.lock:
            if action == "commit":
                return await self._on_commit(message, body)
            return await self._on_rotate(message, body)

    def _refuse(self, refusal: rules.Refuse, body: bytes) -> ProtocolError:
        """An authenticated refusal of the request `body` (DESIGN v2 §4), as an exception."""
        assert self.record is not None
        reply = protocol.build_refusal(
            refusal.code,
            refusal.message,
            link=self.name,
            sender=self.agent.name,
            receiver=self.config.peer,
            epoch=rules.epoch_floor(self.record),
            request=protocol.request_digest(body),
            bootstrap_auth=self.start.auth_key,
        )
        return ProtocolError(refusal.message, status=refusal.status, body=reply)

    async def _on_rotate(self, message: protocol.Message, body: bytes) -> bytes:
        assert self.record is not None
        decision = rules.on_rotate(self.facts, self.record, message, body)
        if isinstance(decision, rules.CommitPendingFirst):
            await self._commit_pending(decision.pending)
            assert self.record is not None
            decision = rules.on_rotate(self.facts, self.record, message, body)
        if isinstance(decision, rules.Retransmit):
            return decision.reply  # same answer, no state change
        if isinstance(decision, rules.Refuse):
            if decision.code == "labels":
                self._failed(self.record.epoch, "peer", decision.message)
            raise self._refuse(decision, body)
        assert isinstance(decision, rules.Derive)
        record = self.record
        key_ids = message.keys
        store = self.agent.store
        # Key reuse is refused when the pending epoch is stored (one transaction with the check);
        # a message with used IDs can only come from the authenticated peer (MAC checked above).
        keys = []
        for source, (_, key_id) in zip(self.sources, key_ids, strict=True):
            try:
                keys.append(await source.key_by_id(self.link, key_id))
            except KeyNotFound as exc:
                self._failed(record.epoch, "source", f"source {source.id!r}: {exc}")
                raise self._refuse(
                    rules.Refuse("key-not-found", f"source {source.id!r}: {exc}", 409), body
                ) from None
            except QkdAgentError as exc:
                self._failed(record.epoch, "source", f"source {source.id!r}: {exc}")
                raise self._refuse(
                    rules.Refuse("source", f"source {source.id!r} failed", 503), body
                ) from None
        crash_point("responder:keys-fetched")
        nonce = protocol.new_nonce()
        transcript = ratchet.Transcript(
            self.name,
            self.config.peer,
            self.agent.name,
            message.epoch,
            key_ids,
            message.nonce,
            nonce,
        )
        inputs = [
            ratchet.SourceInput(s, k.key_id, k.value)
            for (s, _), k in zip(key_ids, keys, strict=True)
        ]
        derived = ratchet.rotate(decision.chain_key, inputs, transcript, self.labels)
        reply = protocol.build(
            message.kind + "-reply",
            link=self.name,
            sender=self.agent.name,
            receiver=self.config.peer,
            epoch=message.epoch,
            auth_key=decision.auth_key,
            nonce=nonce,
            request_nonce=message.nonce,
            confirm=ratchet.confirmation(derived, "responder"),
        )
        pending = Pending(
            epoch=message.epoch,
            kind=message.kind,
            request_digest=protocol.request_digest(body),
            key_ids=key_ids,
            chain_key=derived.chain_key,
            auth_key=derived.auth_key,
            confirm_key=derived.confirm_key,
            transcript_hash=derived.transcript_hash,
            outputs=derived.outputs,
            reply=reply,
            created_at=time.time(),
        )
        try:
            await store.run(lambda: store.store_pending(self.name, pending, mark_used=True))
        except KeyReuseError:
            raise self._refuse(
                rules.Refuse("replay", "key ID already used on this link", 409), body
            ) from None
        record.pending = pending
        crash_point("responder:pending-stored")
        return reply

    async def _on_commit(self, message: protocol.Message, body: bytes) -> bytes:
        assert self.record is not None
        decision = rules.on_commit(self.facts, self.record, message)
        if isinstance(decision, rules.Refuse):
            raise self._refuse(decision, body)
        if isinstance(decision, rules.CommitPending):
            await self._commit_pending(decision.pending)
        assert self.record is not None
        return protocol.build(
            "commit-reply",
            link=self.name,
            sender=self.agent.name,
            receiver=self.config.peer,
            epoch=message.epoch,
            auth_key=self.record.auth_key,
            request_nonce=message.nonce,
        )

    async def _commit_pending(self, pending: Pending) -> None:
        started = trio.current_time()
        store = self.agent.store
        self.record = await store.run(
            lambda: store.commit(
                self.name,
                epoch=pending.epoch,
                chain_key=pending.chain_key,
                auth_key=pending.auth_key,
                key_ids=pending.key_ids,
                outputs=pending.outputs,
            )
        )
        crash_point("responder:committed")
        failed: list[str] = []
        await self._install_collect(self._meta(self.record), failed)
        crash_point("responder:installed")
        self._succeeded(started, pending.key_ids, failed)

    # -- sinks -------------------------------------------------------------------------------

    def _meta(self, record: LinkRecord) -> dict[str, KeyMeta]:
        created = record.committed_at or time.time()
        ids = tuple(k for _, k in record.key_ids)
        return {s.id: KeyMeta(record.epoch, ids, s.label, created) for s in self.sinks}

    async def _install_collect(self, metas: dict[str, KeyMeta], failed: list[str]) -> None:
        record = self.record
        assert record is not None

        async def one(handle: SinkHandle) -> None:
            secret = record.outputs.get(handle.label)
            if secret is None:
                # A sink added after this epoch was derived: it has no output yet; fail closed
                # until the next rotation derives one for its label.
                if not await self._erase_one(handle, "no-key-yet"):
                    failed.append(handle.id)
                    self._erase_outcome("no-key-yet", [], [handle.id])
                return
            try:
                await handle.install(self.link, secret, metas[handle.id])
                self.agent.metrics.installs.labels(self.name, handle.id, "ok").inc()
            except QkdAgentError as exc:
                failed.append(handle.id)
                self.agent.metrics.installs.labels(self.name, handle.id, "error").inc()
                log.error(
                    "link %s: sink %s: install failed: %s", self.name, handle.id, exc,
                    extra={"link": self.name, "sink": handle.id, "stage": "install"},
                )  # fmt: skip

        async with trio.open_nursery() as nursery:
            for handle in self.sinks:
                nursery.start_soon(one, handle)

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

    async def erase_sinks(self, reason: str, only: frozenset[str] | None = None) -> None:
        """Fail closed: every sink of the link (or those in `only`) gets a random secret or
        loses its key. A sink whose erase fails is remembered and retried with backoff until
        it succeeds (`scheduler.RetryErase`); it is never reported as erased meanwhile."""
        erased: list[str] = []
        failed: list[str] = []

        async def one(handle: SinkHandle) -> None:
            (erased if await self._erase_one(handle, reason) else failed).append(handle.id)

        async with trio.open_nursery() as nursery:
            for handle in self.sinks:
                if only is None or handle.id in only:
                    nursery.start_soon(one, handle)
        self.status.erased_reason = reason
        epoch = self.record.epoch if self.record else 0
        if erased and reason != "startup":
            log.warning(
                "link %s: sinks erased (%s): %s", self.name, reason, ", ".join(sorted(erased)),
                extra={"link": self.name, "epoch": epoch, "reason": reason},
            )  # fmt: skip
        self._erase_outcome(reason, erased, failed)
        self.agent.metrics.erasures.labels(self.name, reason).inc()
        self.agent.notify(
            "qkdagent_after_erase",
            EraseEvent(self.name, epoch, reason, tuple(sorted(erased))),
        )

    def _erase_outcome(
        self, reason: str, erased: list[str], failed: list[str], *, how: str | None = None
    ) -> None:
        """Track which sinks may still hold a key that should be gone, and say so."""
        for sink_id in erased:
            if self.erase_failed.pop(sink_id, None) is not None:
                detail = how or f"retried erase ({reason}) succeeded"
                self.agent.report(ComponentEvent(sink_id, "erase_recovered", detail, self.name))
        for sink_id in failed:
            if sink_id not in self.erase_failed:
                self.agent.report(
                    ComponentEvent(
                        sink_id,
                        "erase_failed",
                        f"fail-closed erase ({reason}) failed: the sink may still hold the "
                        "link's old key; retrying with backoff",
                        self.name,
                    )
                )
            self.erase_failed[sink_id] = reason
        self.agent.metrics.erase_failed.labels(self.name).set(len(self.erase_failed))
        if self.clock is not None:
            self.clock = scheduler.after_erase_attempt(
                self.clock, self.config.timing, trio.current_time(), failed=bool(self.erase_failed)
            )

    async def retry_erase(self) -> None:
        """Erase again the sinks whose erase failed, each with the reason it was erased for."""
        by_reason: dict[str, set[str]] = {}
        for sink_id, reason in self.erase_failed.items():
            by_reason.setdefault(reason, set()).add(sink_id)
        for reason, sink_ids in by_reason.items():
            await self.erase_sinks(reason, only=frozenset(sink_ids))

    # -- bookkeeping -------------------------------------------------------------------------

    def _succeeded(
        self, started: float, key_ids: tuple[tuple[str, str], ...], failed: list[str]
    ) -> None:
        record = self.record
        assert record is not None and self.clock is not None
        now = trio.current_time()
        duration = now - started
        self.clock = scheduler.after_success(self.clock, self.config.timing, now, self.rand())
        if self.commit_lost:
            # The next rotate under the new auth key also commits the peer's pending epoch.
            self.commit_lost = False
            self.clock = scheduler.after_failure(self.clock, self.config.timing, now)
        self.status.rotations += 1
        self.status.last_rotation_seconds = duration
        self.status.erased_reason = None
        if self.erase_failed:  # a sink that now holds the new key no longer needs erasing
            self._erase_outcome(
                "rotation",
                [s for s in self.erase_failed if s not in failed],
                [],
                how=f"the sink now holds epoch {record.epoch}'s key instead",
            )
        self.agent.metrics.rotation_done(self.name, record.epoch, duration)
        log.info(
            "link %s: epoch %d committed (%s) in %.1f ms, key IDs %s",
            self.name,
            record.epoch,
            "initiator" if self.config.initiator else "responder",
            duration * 1000,
            ",".join(k for _, k in key_ids),
            extra={"link": self.name, "epoch": record.epoch, "duration_ms": duration * 1000},
        )
        self.agent.notify(
            "qkdagent_after_rotation",
            RotationEvent(
                self.name,
                record.epoch,
                tuple(k for _, k in key_ids),
                self.config.initiator,
                duration,
                tuple(s.id for s in self.sinks),
                tuple(failed),
            ),
        )
        self.poke()

    def _failed(self, epoch: int, stage: str, message: str) -> None:
        now = trio.current_time()
        self.status.failures += 1
        self.status.last_error = f"{stage}: {message}"[:500]
        self.status.last_error_at = time.time()
        if self.clock is not None and self.config.initiator:
            self.clock = scheduler.after_failure(self.clock, self.config.timing, now)
        self.agent.metrics.failures.labels(self.name, stage).inc()
        log.warning(
            "link %s: rotation failed at %s: %s", self.name, stage, message,
            extra={"link": self.name, "epoch": epoch, "stage": stage},
        )  # fmt: skip
        self.agent.notify(
            "qkdagent_on_rotation_error", RotationErrorEvent(self.name, epoch, stage, message)
        )

    def describe(self) -> dict[str, Any]:
        record = self.record
        now_wall, now = time.time(), trio.current_time()
        committed = record.committed_at if record and record.epoch > 0 else None
        next_rotation = None
        if self.clock is not None and self.config.initiator:
            next_rotation = now_wall + max(0.0, self.clock.next_attempt - now)
        return {
            "link": self.name,
            "peer": self.config.peer,
            "role": "initiator" if self.config.initiator else "responder",
            "configured_role": self.config.role,
            "epoch": record.epoch if record else 0,
            "last_success": committed,
            "key_age": None if committed is None else now_wall - committed,
            "next_rotation": next_rotation,
            "erased": self.status.erased_reason,
            "erase_failed": sorted(self.erase_failed) or None,
            "rotations": self.status.rotations,
            "failures": self.status.failures,
            "last_error": self.status.last_error,
            "last_error_at": self.status.last_error_at,
            "last_rotation_ms": None
            if self.status.last_rotation_seconds is None
            else round(self.status.last_rotation_seconds * 1000, 3),
            "sources": [s.id for s in self.sources],
            "sinks": [s.id for s in self.sinks],
        }


def _printable(text: object, limit: int = 200) -> str:
    """A peer's error text is not authenticated: no control characters (log lines stay single
    and unforgeable), bounded length."""
    return "".join(c if c.isprintable() else "?" for c in str(text)[:limit])
