"""What a responder does with a peer message: pure functions of (link facts, record, message).

This is the most security-critical logic of the project, so it lives apart from all I/O and
reads top to bottom. Every refusal is decided before any state changes; the runtime
(`responder.py`) only carries out the decision: derive, store, commit, install, answer.

Decisions:
- `Reject`: the message is not from this link's peer (path, names, certificate): an
  unauthenticated error, since the sender is not established.
- `Refuse`: a refusal the runtime answers with an authenticated `refusal` (DESIGN v2 §4), bound
  to the request; `epoch` and `pending` refusals change what the initiator does next.
- `Retransmit`: the same request again: the same stored answer, no state change.
- `CommitPendingFirst`: a rotate for n+2 under n+1's auth key proves the peer committed n+1:
  commit it, then decide again.
- `Derive`: accept; derive the next epoch from these chain and auth keys.
- `CommitPending` / `Acknowledge`: a commit for the pending epoch, or a repeat for the current.
- `FetchAhead`: an `announce` of the next rotation's key IDs: fetch them now, change nothing.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from . import protocol, ratchet
from .identity import PeerIdentity
from .secret import MAX_KEY_ID_BYTES, Secret
from .state import LinkRecord, Pending


@dataclass(frozen=True, slots=True)
class LinkFacts:
    """What the rules need to know about the link's configuration."""

    link: str
    local: str
    """This agent's name."""
    peer: str
    peer_identity: str
    initiator: bool
    source_ids: tuple[str, ...]
    shared_labels: tuple[str, ...]
    """Sorted labels of the sinks that are not `local_only`."""
    start: ratchet.ChainStart
    max_key_ids: tuple[int, ...] = ()
    """Each source's longest key ID in bytes (empty: the default 256 for every source)."""


@dataclass(frozen=True)
class Reject:
    message: str
    status: int


@dataclass(frozen=True)
class Refuse:
    code: str
    message: str
    status: int


@dataclass(frozen=True)
class Retransmit:
    reply: bytes


@dataclass(frozen=True)
class CommitPendingFirst:
    pending: Pending


@dataclass(frozen=True)
class Derive:
    chain_key: Secret
    auth_key: Secret


@dataclass(frozen=True)
class CommitPending:
    pending: Pending


@dataclass(frozen=True)
class Acknowledge:
    pass


@dataclass(frozen=True)
class FetchAhead:
    pass


RotateDecision = Refuse | Retransmit | CommitPendingFirst | Derive
CommitDecision = Refuse | CommitPending | Acknowledge
AnnounceDecision = Refuse | FetchAhead


def admit_identity(facts: LinkFacts, identity: PeerIdentity) -> Reject | None:
    """Checked before the body is even parsed: the connection's certificate must name this
    link's peer (another CA-signed agent learns nothing and costs no parsing)."""
    if not identity.matches(facts.peer_identity):
        return Reject(
            f"client certificate names {identity.describe()}, not this link's peer "
            f"{facts.peer_identity!r}",
            403,
        )
    return None


def admit(
    facts: LinkFacts, path_link: str, message: protocol.Message, identity: PeerIdentity
) -> Reject | None:
    """Whether the message may be considered at all: it names this link, comes from the
    configured peer to us, over a connection whose certificate names that peer."""
    rejected = admit_identity(facts, identity)
    if rejected is not None:
        return rejected
    if message.link != path_link or message.link != facts.link:
        return Reject("link name in the message does not match the path", 400)
    if message.sender != facts.peer or message.receiver != facts.local:
        return Reject("message is not from this link's peer to this agent", 403)
    return None


def role_conflict(facts: LinkFacts, action: str) -> Refuse | None:
    """Both sides configured as initiator: refused before waiting for the link's lock, which
    this side's own rotation holds while it waits for the peer (the peer does the same)."""
    if facts.initiator and action != "commit":
        return Refuse("role", "both agents are configured as initiator", 409)
    return None


def epoch_floor(record: LinkRecord) -> int:
    """The highest epoch this side holds, committed or pending: a resync must move past it."""
    return max(record.epoch, record.pending.epoch if record.pending else 0)


def on_rotate(
    facts: LinkFacts, record: LinkRecord, message: protocol.Message, body: bytes
) -> RotateDecision:
    """A `rotate` or `resync` request."""
    conflict = role_conflict(facts, message.kind)
    if conflict is not None:
        return conflict
    pending = record.pending
    if (
        pending is not None
        and message.kind == "rotate"
        and message.epoch == pending.epoch + 1
        and protocol.verify_mac(message, pending.auth_key)
    ):
        return CommitPendingFirst(pending)
    if (
        pending is not None
        and message.epoch == pending.epoch
        and hmac.compare_digest(protocol.request_digest(body), pending.request_digest)
    ):
        return Retransmit(pending.reply)
    if message.kind == "resync":
        floor = epoch_floor(record)
        if message.epoch <= floor:
            return Refuse("epoch", f"resync must move past epoch {floor}", 409)
        if message.epoch >= protocol.RESYNC_CEILING:  # the same bound as everywhere else
            return Refuse("epoch", "resync epoch above the ceiling", 400)
        chain_key, auth_key = facts.start.chain_key, facts.start.auth_key
    else:
        if message.epoch != record.epoch + 1:
            return Refuse("epoch", f"expected epoch {record.epoch + 1}", 409)
        chain_key, auth_key = record.chain_key, record.auth_key
    if not protocol.verify_mac(message, auth_key):
        return Refuse("auth", "message authentication failed", 403)
    wrong_keys = check_keys(facts, message)
    if wrong_keys is not None:
        return wrong_keys
    if message.labels != facts.shared_labels:
        return Refuse("labels", label_mismatch(facts.shared_labels, message.labels), 409)
    return Derive(chain_key, auth_key)


def check_keys(facts: LinkFacts, message: protocol.Message) -> Refuse | None:
    """The message names one key per source of this link, in config order, each within its
    source's key ID limit."""
    if tuple(s for s, _ in message.keys) != facts.source_ids:
        return Refuse("sources", "the peer's sources differ from this link's", 400)
    limits = facts.max_key_ids or (MAX_KEY_ID_BYTES,) * len(facts.source_ids)
    for (source, key_id), limit in zip(message.keys, limits, strict=True):
        if len(key_id.encode("utf-8")) > limit:
            return Refuse("sources", f"key ID for source {source!r} is over {limit} bytes", 400)
    return None


def on_announce(
    facts: LinkFacts, record: LinkRecord, message: protocol.Message
) -> AnnounceDecision:
    """An `announce`: the key IDs of the rotation to the next epoch, sent ahead of it. Only
    for a link with nothing pending (a pending epoch is settled by the next rotate or commit
    first), for exactly the next epoch, under the current auth key."""
    conflict = role_conflict(facts, message.kind)
    if conflict is not None:
        return conflict
    if record.pending is not None:
        return Refuse("pending", "an epoch is pending: nothing is fetched ahead", 409)
    if message.epoch != record.epoch + 1:
        return Refuse("epoch", f"expected epoch {record.epoch + 1}", 409)
    if not protocol.verify_mac(message, record.auth_key):
        return Refuse("auth", "message authentication failed", 403)
    wrong_keys = check_keys(facts, message)
    if wrong_keys is not None:
        return wrong_keys
    return FetchAhead()


def pending_keys(pending: Pending) -> ratchet.EpochKeys:
    """The epoch keys the responder derived and stored with its pending epoch."""
    return ratchet.EpochKeys(
        pending.epoch,
        pending.chain_key,
        pending.auth_key,
        pending.confirm_key,
        pending.outputs,
        pending.transcript_hash,
    )


def on_commit(facts: LinkFacts, record: LinkRecord, message: protocol.Message) -> CommitDecision:
    """A `commit`: the initiator committed the pending epoch and proves its keys once more."""
    pending = record.pending
    if pending is not None and message.epoch == pending.epoch:
        if not protocol.verify_mac(message, pending.auth_key):
            return Refuse("auth", "message authentication failed", 403)
        keys = pending_keys(pending)
        if not hmac.compare_digest(message.confirm, ratchet.confirmation(keys, "initiator")):
            return Refuse("confirm", "key confirmation failed", 403)
        return CommitPending(pending)
    if message.epoch == record.epoch and record.epoch > 0:
        if not protocol.verify_mac(message, record.auth_key):
            return Refuse("auth", "message authentication failed", 403)
        return Acknowledge()
    return Refuse("pending", f"no pending epoch {message.epoch}", 409)


def label_mismatch(ours: tuple[str, ...], theirs: tuple[str, ...]) -> str:
    """Name the labels configured on one side only (the fix is a config change)."""
    here = sorted(set(ours) - set(theirs))
    there = sorted(set(theirs) - set(ours))
    parts = []
    if here:
        parts.append(f"sink label(s) {', '.join(map(repr, here))} only on the responder")
    if there:
        parts.append(f"sink label(s) {', '.join(map(repr, there))} only on the initiator")
    return (
        "; ".join(parts)
        + ": both sides would install different keys; give the consumers the same label on "
        "both hosts, or set local_only = true on a sink that exists on one side only"
    )
