"""The responder's side of a rotation (DESIGN §4 steps 3 and 5): carry out what the pure rules
of `responder_rules.py` decide — fetch the keys by ID, derive, store the pending epoch durably,
answer; commit and install on `commit`. On an `announce` it fetches the next rotation's keys
ahead and holds them, in memory only, for that rotation (`FetchedAhead`).

Every refusal is decided before any state changes, and answered with an authenticated
`refusal` bound to the request (DESIGN v2 §4).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import trio

from . import protocol, ratchet
from . import responder_rules as rules
from .errors import KeyNotFound, KeyReuseError, ProtocolError, QkdAgentError, named
from .faults import crash_point
from .identity import PeerIdentity
from .interfaces import Answered
from .locks import held
from .peering import ReplyNow
from .state import LinkRecord, Pending
from .stopwatch import Stopwatch

if TYPE_CHECKING:
    from .link import LinkRuntime

log = logging.getLogger("qkdagent.link")


@dataclass(eq=False)
class FetchedAhead:
    """Keys fetched on an `announce`, for the one rotate from `record` that names `key_ids`.

    The next rotate or resync the rules accept (its MAC checked: a forged or stale one,
    refused, leaves them) takes them, whatever it names and whatever its outcome; they are
    dropped by the first request for the link after `expires` (the link's `reject_after`)
    and when the link erases its sinks.
    A rotate naming keys already dropped asks its sources again and, from a source that
    deletes a key once delivered (ETSI 014, DSKE), gets key-not-found: one failed attempt,
    and the initiator retries with fresh keys. No key is used twice: the store still refuses
    used IDs."""

    record: LinkRecord
    key_ids: tuple[tuple[str, str], ...]
    expires: float
    answered: dict[str, Answered] = field(default_factory=dict, repr=False)
    used: bool = False
    """Whether the rotate naming them took them (for the metric)."""


NOT_A_PEER = protocol.error_body("refused", "the client certificate is not a peer of this agent")
"""What a stranger gets for a link with another peer and for an unknown link alike, so it
cannot enumerate link names."""


class Responder:
    __slots__ = ("_ahead", "env", "link", "name", "peer")

    def __init__(self, link: LinkRuntime) -> None:
        self.link = link
        self.env = link.env
        self.name = link.name
        self.peer = link.config.peer
        self._ahead: FetchedAhead | None = None

    async def handle(
        self,
        action: str,
        body: bytes,
        identity: PeerIdentity,
        reply_now: ReplyNow | None = None,
    ) -> bytes:
        """Answer a peer request; a refusal raises ProtocolError carrying its reply body.
        `reply_now` (`peering.ReplyNow`), if given, acknowledges a `commit` as soon as it is
        durable, before the install."""
        stranger = rules.admit_identity(self.link.facts, identity)
        if stranger is not None:  # the detail for our log; the stranger learns nothing
            raise ProtocolError(stranger.message, status=stranger.status, body=NOT_A_PEER)
        message = protocol.parse(body, expect=(action,))
        rejected = rules.admit(self.link.facts, self.name, message, identity)
        if rejected is not None:
            raise ProtocolError(rejected.message, status=rejected.status)
        conflict = rules.role_conflict(self.link.facts, action)
        if conflict is not None:
            raise self._refuse(conflict, body)
        async with held(self.link.lock):
            if self.link.retired:
                # The agent stopped this runtime to remove or replace the link (requests
                # queued ahead of that finished first): it erases the sinks or hands them to
                # the new runtime next, and state written now would come after that.
                raise ProtocolError("link removed or reconfigured", status=503)
            ahead = self._ahead
            if ahead is not None and trio.current_time() > ahead.expires:
                self._dropped(ahead)  # (refused rotates no longer take them)
                self._ahead = None
            if action == "announce":
                return await self._on_announce(message, body)
            if action == "commit":  # (a repeated commit leaves keys fetched ahead alone)
                return await self._on_commit(message, body, reply_now)
            return await self._on_rotate(message, body)

    def _refuse(self, refusal: rules.Refuse, body: bytes) -> ProtocolError:
        """An authenticated refusal of the request `body` (DESIGN v2 §4), as an exception."""
        reply = protocol.build_refusal(
            refusal.code,
            refusal.message,
            link=self.name,
            sender=self.env.agent_name,
            receiver=self.peer,
            epoch=rules.epoch_floor(self.link.record),
            request=protocol.request_digest(body),
            bootstrap_auth=self.link.start.auth_key,
        )
        return ProtocolError(refusal.message, status=refusal.status, body=reply)

    async def _on_announce(self, message: protocol.Message, body: bytes) -> bytes:
        """Fetch the announced keys now, so the `rotate` naming them does not wait for its
        sources. A key a source fails to give is fetched again by the rotate (the source's
        error is the rotate's to report); one it gave is held for it."""
        link = self.link
        decision = rules.on_announce(link.facts, link.record, message)
        if isinstance(decision, rules.Refuse):
            raise self._refuse(decision, body)
        key_ids = message.keys
        ahead = self._ahead
        now = trio.current_time()
        if ahead is None or ahead.record is not link.record or ahead.key_ids != key_ids:
            self._dropped(ahead)
            ahead = FetchedAhead(link.record, key_ids, now + link.config.timing.reject_after)
        self._ahead = ahead
        states = link.record.source_state
        for source, (_, key_id) in zip(link.sources, key_ids, strict=True):
            if source.id in ahead.answered:
                continue  # a repeated announce: each key is fetched once
            try:
                ahead.answered[source.id] = await source.answer(
                    link.link, key_id, states.get(source.id)
                )
            except QkdAgentError as exc:
                log.debug("link %s: fetching ahead from source %s: %s", self.name, source.id, exc)
        return self._acknowledge("announce-reply", message)

    def drop_ahead(self) -> None:
        """Forget keys fetched ahead (the link failed closed: no rotation is coming)."""
        self._dropped(self._ahead)
        self._ahead = None

    def _dropped(self, ahead: FetchedAhead | None) -> None:
        if ahead is not None and ahead.answered:
            self.env.metrics.fetched_ahead.labels(self.name, "dropped").inc(len(ahead.answered))

    def _held(self, ahead: FetchedAhead | None, message: protocol.Message) -> dict[str, Answered]:
        """What was fetched ahead for this very rotate (same record, same key IDs, in time)."""
        if (
            ahead is None
            or message.kind != "rotate"
            or ahead.record is not self.link.record
            or ahead.key_ids != message.keys
            or trio.current_time() > ahead.expires
        ):
            return {}
        return ahead.answered

    async def _on_rotate(self, message: protocol.Message, body: bytes) -> bytes:
        link = self.link
        decision = rules.on_rotate(link.facts, link.record, message, body)
        if isinstance(decision, rules.CommitPendingFirst):
            await self.commit_pending(decision.pending)
            decision = rules.on_rotate(link.facts, link.record, message, body)
        if isinstance(decision, rules.Retransmit):
            return decision.reply  # same answer, no state change
        if isinstance(decision, rules.Refuse):
            if decision.code == "labels":
                link.failed(link.record.epoch, "peer", decision.message)
            raise self._refuse(decision, body)
        assert isinstance(decision, rules.Derive)
        # Keys fetched ahead go to the next rotate the rules accept (its MAC checked), whatever
        # it names: a forged or stale one, refused, leaves them for the real one.
        ahead, self._ahead = self._ahead, None
        try:
            return await self._derive(message, body, decision, ahead)
        finally:
            if ahead is not None and not ahead.used:
                self._dropped(ahead)

    async def _derive(
        self,
        message: protocol.Message,
        body: bytes,
        decision: rules.Derive,
        ahead: FetchedAhead | None,
    ) -> bytes:
        """Fetch the named keys (or take those fetched ahead), derive the next epoch, store it
        as pending, durably, and answer with the reply stored with it."""
        link = self.link
        record = link.record
        key_ids = message.keys
        states = {} if message.kind == "resync" else record.source_state
        held = self._held(ahead, message)
        if held and ahead is not None:
            ahead.used = True
            self.env.metrics.fetched_ahead.labels(self.name, "used").inc(len(held))
        answered: list[Answered] = []
        # Key reuse is refused when the pending epoch is stored (one transaction with the check);
        # a message with used IDs can only come from the authenticated peer (MAC checked above).
        for source, (_, key_id) in zip(link.sources, key_ids, strict=True):
            if source.id in held:
                answered.append(held[source.id])
                continue
            try:
                answered.append(await source.answer(link.link, key_id, states.get(source.id)))
            except KeyNotFound as exc:
                link.failed(record.epoch, "source", named("source", source.id, exc))
                refusal = rules.Refuse("key-not-found", named("source", source.id, exc), 409)
                raise self._refuse(refusal, body) from None
            except QkdAgentError as exc:
                link.failed(record.epoch, "source", named("source", source.id, exc))
                refusal = rules.Refuse("source", f"source {source.id!r} failed", 503)
                raise self._refuse(refusal, body) from None
        crash_point("responder:keys-fetched")
        nonce = protocol.new_nonce()
        answers = tuple(
            (source.id, a.answer)
            for source, a in zip(link.sources, answered, strict=True)
            if a.answer
        )
        transcript = ratchet.Transcript(
            self.name,
            self.peer,
            self.env.agent_name,
            message.epoch,
            key_ids,
            message.nonce,
            nonce,
            labels=link.sinks.shared_labels,
            answers=answers,
        )
        inputs = [
            ratchet.SourceInput(s, a.key.key_id, a.key.value)
            for (s, _), a in zip(key_ids, answered, strict=True)
        ]
        derived = ratchet.rotate(decision.chain_key, inputs, transcript, link.sinks.labels)
        reply = protocol.build(
            message.kind + "-reply",
            link=self.name,
            sender=self.env.agent_name,
            receiver=self.peer,
            epoch=message.epoch,
            auth_key=decision.auth_key,
            nonce=nonce,
            request_nonce=message.nonce,
            confirm=ratchet.confirmation(derived, "responder"),
            answers=[[source, protocol.b64(answer)] for source, answer in answers],
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
            source_state={
                source.id: a.state
                for source, a in zip(link.sources, answered, strict=True)
                if a.state is not None
            },
        )
        store = self.env.store
        try:
            await store.run(partial(store.store_pending, self.name, pending, mark_used=True))
        except KeyReuseError as exc:  # on this link, or lately on another: a source's fault
            link.failed(record.epoch, "source", str(exc))
            refusal = rules.Refuse("replay", "key ID already used", 409)
            raise self._refuse(refusal, body) from None
        record.pending = pending
        crash_point("responder:pending-stored")
        return reply

    async def _on_commit(
        self, message: protocol.Message, body: bytes, reply_now: ReplyNow | None
    ) -> bytes:
        link = self.link
        decision = rules.on_commit(link.facts, link.record, message)
        if isinstance(decision, rules.Refuse):
            raise self._refuse(decision, body)
        if not isinstance(decision, rules.CommitPending):
            return self._acknowledge("commit-reply", message)  # committed already: a repeat
        watch = Stopwatch(trio.current_time())
        await self._commit(decision.pending)
        watch.lap("store")
        reply = self._acknowledge("commit-reply", message)
        if reply_now is not None:
            # The acknowledgement says the epoch is committed, and its keys are durable (see
            # `_commit`): the initiator's rotation ends now, while this side installs (under
            # the link's lock still, so the next request for the link finds it installed).
            # DESIGN §4 step 5.
            if await reply_now(reply):  # (declined: the reply goes after the install)
                watch.lap("ack")
            crash_point("responder:acknowledged")
        await self._install(decision.pending, watch)
        return reply

    def _acknowledge(self, kind: str, message: protocol.Message) -> bytes:
        """A reply that only says the request was taken, MAC'd under the current auth key."""
        return protocol.build(
            kind,
            link=self.name,
            sender=self.env.agent_name,
            receiver=self.peer,
            epoch=message.epoch,
            auth_key=self.link.record.auth_key,
            request_nonce=message.nonce,
        )

    async def commit_pending(self, pending: Pending) -> None:
        """Make the pending epoch current (with its sources' state), then install it."""
        watch = Stopwatch(trio.current_time())
        await self._commit(pending)
        watch.lap("store")
        await self._install(pending, watch)

    async def _commit(self, pending: Pending) -> None:
        """Make the pending epoch current, without an fsync of its own (`durable=False`).

        Everything the install and a restart need is on disk already: the pending epoch, its
        outputs and its used key IDs were made durable before the reply that offered it. A
        crash of the process keeps this commit (the operating system holds the log); a power
        loss before the next fsync (the next durable commit, or the checkpoint within about
        `state.SCRUB_DELAY`) leaves the pending epoch, which the initiator's next `rotate`,
        MAC'd under its auth key, commits first (DESIGN §4 step 5). Until that regular
        rotation the two sides hold different keys: availability, not secrecy, is what the
        saved fsync risks (docs/design-deviations.md). The initiator's commit, which decides
        the rotation, stays durable before anything leaves it."""
        link = self.link
        store = self.env.store
        commit = partial(
            store.commit,
            self.name,
            epoch=pending.epoch,
            chain_key=pending.chain_key,
            auth_key=pending.auth_key,
            key_ids=pending.key_ids,
            outputs=pending.outputs,
            source_state=pending.source_state,
        )
        link.record = await store.run(commit, durable=False)
        crash_point("responder:committed")

    async def _install(self, pending: Pending, watch: Stopwatch) -> None:
        link = self.link
        failed = await link.sinks.install(link.record)
        crash_point("responder:installed")
        watch.lap("install")
        link.succeeded(watch.started, pending.key_ids, failed, watch.parts)
