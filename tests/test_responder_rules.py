"""Every decision of the responder's acceptance rules, table-driven, without trio or I/O."""

from __future__ import annotations

from dataclasses import replace

import pytest

from qkdagent import protocol, ratchet
from qkdagent import responder_rules as rules
from qkdagent.identity import PeerIdentity
from qkdagent.secret import Secret
from qkdagent.state import LinkRecord, Pending

START = ratchet.chain_start(Secret(b"b" * 32), "ab")
CURRENT_AUTH = Secret(b"a" * 32)
PENDING_AUTH = Secret(b"p" * 32)
WRONG = Secret(b"w" * 32)
FACTS = rules.LinkFacts(
    link="ab",
    local="bob",
    peer="alice",
    peer_identity="alice",
    initiator=False,
    source_ids=("kme",),
    shared_labels=("wg0",),
    start=START,
)


def _keys(epoch: int, auth: Secret) -> ratchet.EpochKeys:
    inputs = [ratchet.SourceInput("kme", f"k{epoch}", Secret(bytes([epoch]) * 32))]
    transcript = ratchet.Transcript("ab", "alice", "bob", epoch, (("kme", f"k{epoch}"),),
                                    b"i" * 32, b"r" * 32)  # fmt: skip
    keys = ratchet.rotate(Secret(b"c" * 32), inputs, transcript, ["wg0"])
    return replace(keys, auth_key=auth)


PENDING_KEYS = _keys(6, PENDING_AUTH)


def _pending(body: bytes = b"original") -> Pending:
    k = PENDING_KEYS
    return Pending(
        epoch=6,
        kind="rotate",
        request_digest=protocol.request_digest(body),
        key_ids=(("kme", "k6"),),
        chain_key=k.chain_key,
        auth_key=k.auth_key,
        confirm_key=k.confirm_key,
        transcript_hash=k.transcript_hash,
        outputs=k.outputs,
        reply=b"stored-reply",
        created_at=0.0,
    )


def _record(epoch: int = 5, pending: Pending | None = None) -> LinkRecord:
    return LinkRecord("ab", "alice", epoch, Secret(b"c" * 32), CURRENT_AUTH, (), 1.0, {}, pending)


def _msg(kind: str = "rotate", *, epoch: int = 6, auth: Secret = CURRENT_AUTH, **extra: object):
    fields: dict = {"nonce": b"n" * 32}
    if kind in ("rotate", "resync"):
        fields |= {"keys": [["kme", "k"]], "labels": ["wg0"]}
    elif kind == "announce":
        fields |= {"keys": [["kme", "k"]]}
    else:
        fields["confirm"] = ratchet.confirmation(PENDING_KEYS, "initiator")
    fields |= extra
    body = protocol.build(kind, link="ab", sender="alice", receiver="bob", epoch=epoch,
                          auth_key=auth, **fields)  # fmt: skip
    return protocol.parse(body, expect=(kind,)), body


ROTATE_CASES = [
    # (name, facts change, record, message args, expected decision type, code)
    ("next epoch, good MAC", {}, _record(), {}, rules.Derive, None),
    ("both initiators", {"initiator": True}, _record(), {}, rules.Refuse, "role"),
    ("epoch too high", {}, _record(), {"epoch": 8}, rules.Refuse, "epoch"),
    ("epoch replayed", {}, _record(), {"epoch": 5}, rules.Refuse, "epoch"),
    ("bad MAC", {}, _record(), {"auth": WRONG}, rules.Refuse, "auth"),
    ("other sources", {}, _record(), {"keys": [["qkd", "k"]]}, rules.Refuse, "sources"),
    ("more sources", {}, _record(), {"keys": [["kme", "a"], ["x", "b"]]}, rules.Refuse, "sources"),
    ("key ID over 256 bytes", {}, _record(), {"keys": [["kme", "k" * 257]]}, rules.Refuse,
     "sources"),
    ("key ID within a declared max", {"max_key_ids": (2000,)}, _record(),
     {"keys": [["kme", "k" * 1500]]}, rules.Derive, None),
    ("key ID over a declared max", {"max_key_ids": (2000,)}, _record(),
     {"keys": [["kme", "k" * 2001]]}, rules.Refuse, "sources"),
    ("other labels", {}, _record(), {"labels": ["wg1"]}, rules.Refuse, "labels"),
    ("fewer labels", {}, _record(), {"labels": []}, rules.Refuse, "labels"),
    ("n+2 under pending auth", {}, _record(5, _pending()), {"epoch": 7, "auth": PENDING_AUTH},
     rules.CommitPendingFirst, None),
    ("n+2 under a wrong key", {}, _record(5, _pending()), {"epoch": 7, "auth": WRONG},
     rules.Refuse, "epoch"),
    ("same epoch as pending, new body", {}, _record(5, _pending()), {}, rules.Derive, None),
    ("resync past the floor", {}, _record(5, _pending()),
     {"kind": "resync", "epoch": 7, "auth": START.auth_key}, rules.Derive, None),
    ("resync at the floor", {}, _record(5, _pending()),
     {"kind": "resync", "epoch": 6, "auth": START.auth_key}, rules.Refuse, "epoch"),
    ("resync above the ceiling", {}, _record(),
     {"kind": "resync", "epoch": protocol.RESYNC_CEILING + 1, "auth": START.auth_key},
     rules.Refuse, "epoch"),
    ("resync at the ceiling", {}, _record(),
     {"kind": "resync", "epoch": protocol.RESYNC_CEILING, "auth": START.auth_key},
     rules.Refuse, "epoch"),
    ("resync under the current key", {}, _record(), {"kind": "resync", "epoch": 9},
     rules.Refuse, "auth"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("facts_change", "record", "args", "expected", "code"),
    [case[1:] for case in ROTATE_CASES],
    ids=[case[0] for case in ROTATE_CASES],
)
def test_rotate_rules(facts_change, record, args, expected, code) -> None:
    args = dict(args)
    message, body = _msg(args.pop("kind", "rotate"), **args)
    decision = rules.on_rotate(replace(FACTS, **facts_change), record, message, body)
    assert type(decision) is expected
    if code is not None:
        assert decision.code == code


def test_a_retransmission_gets_the_stored_reply() -> None:
    message, body = _msg()
    record = _record(5, _pending(body))
    assert rules.on_rotate(FACTS, record, message, body) == rules.Retransmit(b"stored-reply")


def test_derive_uses_the_current_or_the_bootstrap_keys() -> None:
    message, body = _msg()
    assert rules.on_rotate(FACTS, _record(), message, body) == rules.Derive(
        Secret(b"c" * 32), CURRENT_AUTH
    )
    message, body = _msg("resync", epoch=9, auth=START.auth_key)
    assert rules.on_rotate(FACTS, _record(), message, body) == rules.Derive(
        START.chain_key, START.auth_key
    )


COMMIT_CASES = [
    ("commit the pending epoch", _record(5, _pending()), {"auth": PENDING_AUTH},
     rules.CommitPending, None),
    ("bad MAC", _record(5, _pending()), {"auth": WRONG}, rules.Refuse, "auth"),
    ("bad confirmation", _record(5, _pending()), {"auth": PENDING_AUTH, "confirm": b"x" * 32},
     rules.Refuse, "confirm"),
    ("repeat for the current epoch", _record(6), {"auth": CURRENT_AUTH}, rules.Acknowledge, None),
    ("repeat under a wrong key", _record(6), {"auth": WRONG}, rules.Refuse, "auth"),
    ("nothing pending", _record(5), {}, rules.Refuse, "pending"),
    ("other epoch than pending", _record(5, _pending()), {"epoch": 9, "auth": PENDING_AUTH},
     rules.Refuse, "pending"),
]  # fmt: skip


ANNOUNCE_CASES = [
    ("next epoch, good MAC", {}, _record(), {}, rules.FetchAhead, None),
    ("both initiators", {"initiator": True}, _record(), {}, rules.Refuse, "role"),
    ("an epoch pending", {}, _record(5, _pending()), {"epoch": 7, "auth": PENDING_AUTH},
     rules.Refuse, "pending"),
    ("epoch too high", {}, _record(), {"epoch": 7}, rules.Refuse, "epoch"),
    ("epoch replayed", {}, _record(), {"epoch": 5}, rules.Refuse, "epoch"),
    ("bad MAC", {}, _record(), {"auth": WRONG}, rules.Refuse, "auth"),
    ("under the bootstrap key", {}, _record(), {"auth": START.auth_key}, rules.Refuse, "auth"),
    ("other sources", {}, _record(), {"keys": [["qkd", "k"]]}, rules.Refuse, "sources"),
    ("key ID over a declared max", {"max_key_ids": (20,)}, _record(),
     {"keys": [["kme", "k" * 21]]}, rules.Refuse, "sources"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("facts_change", "record", "args", "expected", "code"),
    [case[1:] for case in ANNOUNCE_CASES],
    ids=[case[0] for case in ANNOUNCE_CASES],
)
def test_announce_rules(facts_change, record, args, expected, code) -> None:
    message, _ = _msg("announce", **args)
    decision = rules.on_announce(replace(FACTS, **facts_change), record, message)
    assert type(decision) is expected
    if code is not None:
        assert decision.code == code


@pytest.mark.parametrize(
    ("record", "args", "expected", "code"),
    [case[1:] for case in COMMIT_CASES],
    ids=[case[0] for case in COMMIT_CASES],
)
def test_commit_rules(record, args, expected, code) -> None:
    message, _ = _msg("commit", **args)
    decision = rules.on_commit(FACTS, record, message)
    assert type(decision) is expected
    if code is not None:
        assert decision.code == code


@pytest.mark.parametrize(
    ("identity", "change", "status"),
    [
        (PeerIdentity(dns=("alice",)), {}, None),
        (PeerIdentity(dns=("ALICE",)), {}, None),
        (PeerIdentity(uris=("alice",)), {}, None),
        (PeerIdentity(common_names=("alice",)), {}, None),
        (PeerIdentity(dns=("mallory",), common_names=("alice",)), {}, 403),
        (PeerIdentity(), {}, 403),
        (PeerIdentity(dns=("mallory",)), {}, 403),
        (PeerIdentity(dns=("alice",)), {"path": "other"}, 400),
        (PeerIdentity(dns=("alice",)), {"sender": "carol"}, 403),
        (PeerIdentity(dns=("alice",)), {"receiver": "dave"}, 403),
    ],
)
def test_admission(identity: PeerIdentity, change: dict, status: int | None) -> None:
    body = protocol.build("rotate", link="ab", sender=change.get("sender", "alice"),
                          receiver=change.get("receiver", "bob"), epoch=6, auth_key=CURRENT_AUTH,
                          keys=[["kme", "k"]], labels=["wg0"], nonce=b"n" * 32)  # fmt: skip
    message = protocol.parse(body, expect=("rotate",))
    rejected = rules.admit(FACTS, change.get("path", "ab"), message, identity)
    assert (rejected and rejected.status) == status


def test_a_label_mismatch_names_both_sides() -> None:
    text = rules.label_mismatch(("wg0_alice",), ("wg0",))
    assert "'wg0_alice' only on the responder" in text
    assert "'wg0' only on the initiator" in text and "local_only" in text


def test_the_epoch_floor_counts_the_pending_epoch() -> None:
    assert rules.epoch_floor(_record(5)) == 5
    assert rules.epoch_floor(_record(5, _pending())) == 6
