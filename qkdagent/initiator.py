"""The initiator's side of a rotation (DESIGN §4 steps 1, 2, 4): fresh keys, `rotate`, check the
reply and its confirmation, commit durably, install, `commit`.

A rotation attempt either commits or changes nothing: every failure is a `RotationFailed` with
the stage it happened at, and only an authenticated refusal may change what happens next (a
resync after the peer's epoch hint).
"""

from __future__ import annotations

import hmac
import logging
import math
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import trio

from . import protocol, ratchet
from .errors import KeyReuseError, ProtocolError, QkdAgentError, SourceError, named
from .faults import crash_point
from .locks import held
from .peering import PeerReply, TransportError
from .secret import Key, Secret
from .state import LinkRecord
from .stopwatch import Stopwatch
from .text import printable

if TYPE_CHECKING:
    from .link import LinkRuntime

log = logging.getLogger("qkdagent.link")

REQUEST_RETRIES = 3
ANNOUNCE_PAUSE = 3600.0
"""Seconds an initiator stops announcing to a peer that does not know the message."""


@dataclass(frozen=True, eq=False)
class _Prefetched:
    """What a prefetch prepared for the rotation from `record`: used by one attempt at most."""

    record: LinkRecord
    keys: list[tuple[str, Key]] = field(repr=False)
    body: bytes = field(repr=False)
    """The `rotate` naming the keys' IDs, MAC'd under the record's auth key."""
    nonce: bytes = field(repr=False)


class RotationFailed(Exception):
    """A rotation attempt ended without a commit; `stage` says where."""

    def __init__(self, stage: str, message: str) -> None:
        self.stage = stage
        super().__init__(message)


class Initiator:
    __slots__ = (
        "_announce_paused_until", "_announces", "_prefetch_for", "_prefetched", "config", "env",
        "link", "name",
    )  # fmt: skip

    def __init__(self, link: LinkRuntime) -> None:
        self.link = link
        self.env = link.env
        self.config = link.config
        self.name = link.name
        self._prefetched: _Prefetched | None = None
        """Source keys taken ahead for the next rotation from this record (its state), and
        the `rotate` naming them."""
        self._prefetch_for: float | None = None
        """The rotation time the last prefetch was made (or tried) for: one try per rotation."""
        self._announces = any(source.fetch_ahead for source in link.sources)
        """Whether a prefetch tells the peer the key IDs (`announce`)."""
        self._announce_paused_until = -math.inf
        """Until when not to, after a peer answered that it does not know the message."""

    # -- prefetch ------------------------------------------------------------------------------

    def wants_prefetch(self, due: float) -> bool:
        return self._prefetch_for != due

    async def prefetch(self, due: float) -> None:
        """Take the keys of the rotation due at `due` now. They serve only a rotation from the
        same committed record (its epoch and source state); any other use takes fresh keys,
        and keys taken ahead are used by one attempt at most, whatever its outcome. A crash
        loses them: their IDs never left this process, so nothing can use them twice. A
        failure here is not reported: the rotation fetches again and reports its own."""
        self._prefetch_for = due
        link = self.link
        async with held(self.env.rotation_slots), held(link.lock):
            record = link.record
            try:
                with trio.fail_after(self.env.rotation_timeout):
                    keys = await self._offers(record.source_state)
            except (RotationFailed, trio.TooSlowError):
                return
            # the rotate that will name them, built now, off the rotation's path
            body, nonce = self._build(
                "rotate", record.epoch + 1, self._key_ids(keys), record.auth_key
            )
            self._prefetched = _Prefetched(record, keys, body, nonce)
            announce = self._announces and trio.current_time() >= self._announce_paused_until
            if announce:
                with trio.move_on_after(self.env.rotation_timeout):
                    await self._announce(record, self._key_ids(keys))
        if not announce and self._needs_warm():  # (holding neither the link nor a slot)
            with trio.move_on_at(due):  # never later than the rotation
                await self._warm()

    def _needs_warm(self) -> bool:
        """Whether the client has a connection to make or close (no timeouts set up when it
        has not: the usual case, a connection kept or a request under way)."""
        try:
            return self.env.client.needs_warm(self.config.peer_url)
        except Exception:  # (a bad URL, or a bug): `_warm` meets it again and says so
            return True

    async def _warm(self) -> None:
        """Have the connection the rotation will use made now if none is kept: at the 120 s
        default interval the client has dropped the last one (it keeps them 100 s), and the
        TLS handshake, more than the rest of a rotation on loopback, came on its path. (An
        announce does this for links whose sources fetch ahead.) Whatever goes wrong is the
        rotation's to meet and report."""
        try:
            await self.env.client.warm(self.config.peer_url)
        except (TransportError, trio.TooSlowError) as exc:
            log.debug("link %s: no connection made ahead: %s", self.name, type(exc).__name__)
        except Exception as exc:  # a bug: logged, and the rotation goes ahead
            log.error(
                "link %s: making a connection ahead raised %s (a bug)",
                self.name,
                type(exc).__name__,
                extra={"link": self.name, "stage": "internal"},
            )

    async def _announce(self, record: LinkRecord, key_ids: tuple[tuple[str, str], ...]) -> None:
        """Name the next rotation's key IDs to the peer, which fetches them ahead (one attempt;
        whatever happens, the rotation is the same, only its path may be shorter)."""
        body = protocol.build(
            "announce",
            link=self.name,
            sender=self.env.agent_name,
            receiver=self.config.peer,
            epoch=record.epoch + 1,
            auth_key=record.auth_key,
            keys=[list(pair) for pair in key_ids],
            nonce=protocol.new_nonce(),
        )
        try:
            reply = await self.env.client.post(self.config.peer_url, self.name, "announce", body)
        except (TransportError, trio.TooSlowError) as exc:
            log.debug("link %s: announce not delivered: %s", self.name, type(exc).__name__)
            return
        if (
            reply.status == 404
            and protocol.error_code(reply.body) == "not-found"
            and reply.identity.matches(self.config.peer_identity)
        ):
            self._announce_paused_until = trio.current_time() + ANNOUNCE_PAUSE
            log.info(
                "link %s: the peer does not take announced key IDs (an older qkdagent?); its "
                "sources' fetches stay on the rotation's path (asking again in %d s)",
                self.name,
                ANNOUNCE_PAUSE,
                extra={"link": self.name},
            )

    def _take_prefetched(self, record: LinkRecord) -> _Prefetched | None:
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is None or prefetched.record is not record:
            return None
        return prefetched

    async def rotate_once(self) -> bool:
        """One rotation attempt under the link's lock; returns whether it committed."""
        link = self.link
        async with held(self.env.rotation_slots), held(link.lock):
            started = trio.current_time()
            epoch = link.record.epoch
            try:
                with trio.fail_after(self.env.rotation_timeout):
                    await self._rotate(started)
                return True
            except trio.TooSlowError:
                link.failed(epoch, "timeout", "rotation timed out")
            except RotationFailed as exc:
                link.failed(epoch, exc.stage, str(exc))
            except QkdAgentError as exc:
                link.failed(epoch, "source" if isinstance(exc, SourceError) else "state", str(exc))
            except Exception as exc:  # a bug: one failed attempt, never the agent (message dropped)
                log.debug("link %s: rotation attempt raised", self.name, exc_info=True)
                link.failed(epoch, "internal", f"unexpected {type(exc).__name__}")
            return False

    async def _rotate(self, started: float) -> None:
        link = self.link
        record = link.record
        epoch = record.epoch + 1
        kind, chain_key, auth_key = "rotate", record.chain_key, record.auth_key
        watch = Stopwatch(started)
        prefetched = self._take_prefetched(record)
        if prefetched is None:
            keys = await self._offers(record.source_state)
            sent, nonce = self._build(kind, epoch, self._key_ids(keys), auth_key)
        else:  # the keys, and the rotate naming them, prepared ahead
            keys, sent, nonce = prefetched.keys, prefetched.body, prefetched.nonce
        crash_point("initiator:keys-fetched")
        key_ids = self._key_ids(keys)
        states: dict[str, bytes] = record.source_state
        watch.lap("keys")
        reply = await self._post(kind, sent)
        watch.lap("reply")
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
            # Exchange sources start again from no state, as the peer does.
            states = {}
            keys = await self._offers(states)
            key_ids = self._key_ids(keys)
            epoch = max(record.epoch, refusal.epoch) + 1
            kind, chain_key, auth_key = "resync", link.start.chain_key, link.start.auth_key
            sent, nonce = self._build(kind, epoch, key_ids, auth_key)
            watch.lap("keys")
            reply = await self._post(kind, sent)
            watch.lap("reply")
            refusal = self._refusal(reply, sent)
        if refusal is not None:
            raise RotationFailed(
                "peer", f"peer refused {kind}: {refusal.code}: {printable(refusal.message)}"
            )
        message = self._parse_reply(reply.body, kind + "-reply", epoch, auth_key, nonce)
        crash_point("initiator:reply-received")
        answers = message.answers
        new_states = await self._accept(answers, states)
        watch.lap("check")
        transcript = ratchet.Transcript(
            self.name,
            self.env.agent_name,
            self.config.peer,
            epoch,
            key_ids,
            nonce,
            message.nonce,
            labels=link.sinks.shared_labels,
            answers=answers,
        )
        inputs = [ratchet.SourceInput(source_id, key.key_id, key.value) for source_id, key in keys]
        derived = ratchet.rotate(chain_key, inputs, transcript, link.sinks.labels)
        if not hmac.compare_digest(message.confirm, ratchet.confirmation(derived, "responder")):
            raise RotationFailed("confirm", "key confirmation failed: the peer derived other keys")
        watch.lap("derive")
        store = self.env.store
        try:
            # One transaction: the key IDs recorded as used, the epoch and the sources' state.
            # Durable before anything leaves: this commit decides the rotation (the responder
            # installs on the `commit` that follows it).
            commit_epoch = partial(
                store.commit,
                self.name,
                epoch=epoch,
                chain_key=derived.chain_key,
                auth_key=derived.auth_key,
                key_ids=key_ids,
                outputs=derived.outputs,
                mark_used=True,
                source_state=new_states,
            )
            link.record = await store.run(commit_epoch)
        except KeyReuseError as exc:
            raise RotationFailed("source", str(exc)) from None
        crash_point("initiator:committed")
        watch.lap("store")
        commit_nonce = protocol.new_nonce()
        commit = protocol.build(
            "commit",
            link=self.name,
            sender=self.env.agent_name,
            receiver=self.config.peer,
            epoch=epoch,
            auth_key=derived.auth_key,
            nonce=commit_nonce,
            confirm=ratchet.confirmation(derived, "initiator"),
        )
        # DESIGN §4: install here first, then commit, so the responder's install is the last one
        # (a sink that must act once both consumers hold the key, e.g. a strongSwan reauth, acts
        # from the responder's install).
        failed = await link.sinks.install(link.record)
        crash_point("initiator:installed")
        watch.lap("install")
        await self._send_commit(link.record, commit, commit_nonce)
        watch.lap("ack")
        link.succeeded(started, key_ids, failed, watch.parts)

    @staticmethod
    def _key_ids(keys: list[tuple[str, Key]]) -> tuple[tuple[str, str], ...]:
        return tuple((source_id, key.key_id) for source_id, key in keys)

    async def _offers(self, states: dict[str, bytes]) -> list[tuple[str, Key]]:
        keys = []
        for source in self.link.sources:
            try:
                keys.append((source.id, await source.offer(self.link.link, states.get(source.id))))
            except QkdAgentError as exc:
                raise RotationFailed("source", named("source", source.id, exc)) from None
        return keys

    async def _accept(
        self, answers: tuple[tuple[str, bytes], ...], states: dict[str, bytes]
    ) -> dict[str, bytes]:
        """Each source takes the peer's answer (empty for plain sources) and returns its new
        per-link state, committed with the epoch."""
        by_source = dict(answers)
        if [s for s, _ in answers] != [s.id for s in self.link.sources if s.id in by_source] or (
            len(by_source) != len(answers)
        ):
            raise RotationFailed("peer", "the peer answered for sources this link does not have")
        new: dict[str, bytes] = {}
        for source in self.link.sources:
            try:
                state = await source.accept_answer(
                    self.link.link, by_source.get(source.id, b""), states.get(source.id)
                )
            except QkdAgentError as exc:
                raise RotationFailed("source", named("source", source.id, exc)) from None
            if state is not None:
                new[source.id] = state
        return new

    def _build(
        self, kind: str, epoch: int, key_ids: tuple[tuple[str, str], ...], auth_key: Secret
    ) -> tuple[bytes, bytes]:
        """A rotate or resync naming `key_ids`, and its nonce (fresh: one per message)."""
        nonce = protocol.new_nonce()
        body = protocol.build(
            kind,
            link=self.name,
            sender=self.env.agent_name,
            receiver=self.config.peer,
            epoch=epoch,
            auth_key=auth_key,
            keys=[list(pair) for pair in key_ids],
            labels=list(self.link.sinks.shared_labels),
            nonce=nonce,
        )
        return body, nonce

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
            bootstrap_auth=self.link.start.auth_key,
            link=self.name,
            sender=self.config.peer,
            receiver=self.env.agent_name,
            request=sent,
        ):
            return refusal
        self.env.metrics.unauthenticated_refusals.labels(self.name).inc()
        raise RotationFailed(
            "peer", f"peer answered {reply.status} without an authenticated refusal (ignored)"
        )

    async def _post(self, action: str, body: bytes) -> PeerReply:
        """Send with bounded retransmission: the responder answers a repeat idempotently."""
        delay = 0.05
        url = self.config.peer_url
        for attempt in range(REQUEST_RETRIES):
            try:
                reply = await self.env.client.post(url, self.name, action, body)
            except TransportError as exc:
                error = printable(f"{type(exc).__name__}: {exc}", 300)
            except trio.TooSlowError:
                error = "no complete reply in time"
            else:
                if not reply.identity.matches(self.config.peer_identity):
                    raise RotationFailed(
                        "peer",
                        f"{url} presented a certificate naming {reply.identity.describe()}, "
                        f"not peer {self.config.peer_identity!r}",
                    )
                if reply.status < 500:
                    return reply
                error = f"HTTP {reply.status}"
            if attempt + 1 < REQUEST_RETRIES:
                await trio.sleep(delay)
                delay *= 4
        raise RotationFailed("peer", f"{action} to {url} failed: {error}")

    def _parse_reply(
        self, body: bytes, kind: str, epoch: int, auth_key: Secret, nonce: bytes
    ) -> protocol.Message:
        try:
            message = protocol.parse(body, expect=(kind,))
        except ProtocolError as exc:
            raise RotationFailed("peer", f"bad reply: {exc}") from None
        if (
            message.link != self.name
            or message.sender != self.config.peer
            or message.receiver != self.env.agent_name
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
                    "commit", f"peer refused commit: {refusal.code}: {printable(refusal.message)}"
                )
            self._parse_reply(reply.body, "commit-reply", record.epoch, record.auth_key, nonce)
        except RotationFailed as exc:
            log.warning(
                "link %s: commit of epoch %d not acknowledged: %s", self.name, record.epoch, exc
            )
            self.link.commit_lost = True
