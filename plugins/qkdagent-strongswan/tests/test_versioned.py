"""Versioned PPK_IDs (one per epoch) between two real charons.

Gateway b's connection has no `ppk_id`, so it accepts any PPK_ID it holds a PPK for. Gateway a's
connection is re-sent from `conn_file` with each epoch's PPK_ID. Gateway a sends the PPK_ID, so it
must be the side that reauthenticates: its agent is the link's responder here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from qkdagent_strongswan import StrongswanPpkSink

from qkdagent import ComponentEvent, KeyMeta, Link, Secret, SinkError

from .testbed import (
    CONN,
    ConnSpec,
    Testbed,
    established,
    poll_until,
    ppk_log_count,
)

SinkFactory = Callable[..., StrongswanPpkSink]

ALICE = Link("ab", "alice", "bob", False)
BOB = Link("ab", "bob", "alice", True)
BASE = "qkd-ab"


def meta(epoch: int) -> KeyMeta:
    return KeyMeta(epoch, (f"key-{epoch}",), "ppk", time.time())


@pytest.fixture
def lab_conns() -> tuple[list[ConnSpec], list[ConnSpec]]:
    return [ConnSpec(CONN, f"{BASE}-0")], [ConnSpec(CONN, None)]


def conn_ppk_id(bed: Testbed) -> str:
    session = bed.a.session()
    try:
        (entry,) = list(session.list_conns({"ike": CONN}))
        return entry[CONN]["ppk_id"].decode()
    finally:
        session.transport.close()


async def versioned_pair(
    bed: Testbed, make_sink: SinkFactory, tmp_path: Path
) -> tuple[StrongswanPpkSink, StrongswanPpkSink]:
    """alice re-sends gateway a's connection per epoch (conn_file); bob accepts any PPK_ID."""
    conn_file = tmp_path / "gw.json"
    conn_file.write_text(json.dumps(bed.a.conn_message(bed.a.conns[0])))
    common = {"versioned": True, "ppk_id": BASE, "keep_versions": 2}
    alice = make_sink(bed.a, conn_file=str(conn_file), **common)
    bob = make_sink(bed.b, **common)
    await alice.prepare()
    await bob.prepare()
    return alice, bob


async def versioned_pair_up(
    bed: Testbed, make_sink: SinkFactory, tmp_path: Path
) -> tuple[StrongswanPpkSink, StrongswanPpkSink, Secret, dict[str, object]]:
    """`versioned_pair` with epoch 1's secret (returned) installed on both sides and its IKE
    SA up (returned)."""
    alice, bob = await versioned_pair(bed, make_sink, tmp_path)
    first = Secret.random()
    await bob.install(BOB, first, meta(1))
    await alice.install(ALICE, first, meta(1))
    assert await trio.to_thread.run_sync(bed.a.initiate, CONN)
    (sa,) = established(bed.a)
    return alice, bob, first, sa


async def test_versioned_ppk_ids_rotate_with_reauthentication(
    bed: Testbed, make_sink: SinkFactory, tmp_path: Path, reported: list[ComponentEvent]
) -> None:
    alice, bob = await versioned_pair(bed, make_sink, tmp_path)

    secret = Secret.random()
    await bob.install(BOB, secret, meta(1))
    await alice.install(ALICE, secret, meta(1))
    assert conn_ppk_id(bed) == f"{BASE}-1"
    assert await trio.to_thread.run_sync(bed.a.initiate, CONN)
    assert ppk_log_count(bed.b, f"{BASE}-1") == 1

    for epoch in (2, 3, 4):
        secret = Secret.random()
        await bob.install(BOB, secret, meta(epoch))
        await alice.install(ALICE, secret, meta(epoch))  # reauthenticates
        assert conn_ppk_id(bed) == f"{BASE}-{epoch}"
        assert ppk_log_count(bed.a, f"{BASE}-{epoch}") == 1
        assert ppk_log_count(bed.b, f"{BASE}-{epoch}") == 1
        ours = {i for i in bed.b.shared_ids() if i.startswith("qkdagent-ab-")}
        assert ours == {f"qkdagent-ab-{epoch - 1}", f"qkdagent-ab-{epoch}"}
        assert await bob.verify(BOB, secret, meta(epoch)) is True
        assert await alice.verify(ALICE, secret, meta(epoch)) is True
    assert bed.a.ping().returncode == 0

    # an operator's `swanctl --load-conns` resets the connection's PPK_ID: the check repairs it
    await trio.to_thread.run_sync(bed.a.swanctl, "--load-conns")
    assert conn_ppk_id(bed) == f"{BASE}-0"
    repaired = await alice.check_once()
    assert [r.secret_id for r in repaired] == [f"conn:{CONN}"]
    assert [(e.kind, e.link) for e in reported] == [("repaired", ALICE.name)]
    assert f"connection {CONN!r}" in reported[0].detail
    assert conn_ppk_id(bed) == f"{BASE}-4"
    await alice.reauthenticate(ALICE)
    assert ppk_log_count(bed.b, f"{BASE}-4") == 2
    await alice.aclose()
    await bob.aclose()


async def test_failed_replacement_is_reported_and_keeps_the_old_sa(
    bed: Testbed, make_sink: SinkFactory, tmp_path: Path
) -> None:
    alice, bob, _, old = await versioned_pair_up(bed, make_sink, tmp_path)

    good, wrong = Secret.random(), Secret.random()
    await bob.install(BOB, good, meta(2))
    with pytest.raises(SinkError, match=r"new IKE SA 'gw' .* failed .*previous SA was left"):
        await alice.install(ALICE, wrong, meta(2))
    assert "AUTHENTICATION_FAILED" in bed.a.log() + bed.b.log()
    # the agent tore nothing down: the epoch-1 SA still carries traffic, and is not taken
    # for proof that epoch 2's PPK is in effect
    assert [(sa["uniqueid"], sa["ppk"]) for sa in established(bed.a)] == [(old["uniqueid"], "yes")]
    assert bed.a.ping().returncode == 0
    assert conn_ppk_id(bed) == f"{BASE}-2"
    assert await alice.verify(ALICE, wrong, meta(2)) is False

    # the matching PPK: a new SA with epoch 2's PPK_ID replaces the old one
    await alice.install(ALICE, good, meta(2))
    assert [sa["uniqueid"] for sa in established(bed.a)] != [old["uniqueid"]]
    assert ppk_log_count(bed.b, f"{BASE}-2") == 1
    assert await alice.verify(ALICE, good, meta(2)) is True
    assert bed.a.ping().returncode == 0
    await alice.aclose()
    await bob.aclose()


async def test_check_repairs_while_a_rotation_blocks_in_initiate(
    bed: Testbed, make_sink: SinkFactory, tmp_path: Path
) -> None:
    """The checker has its own VICI client: a waiting `initiate` does not hold up repairs."""
    alice, bob, first, old = await versioned_pair_up(bed, make_sink, tmp_path)
    # gateway b's link goes down: alice's initiate waits through charon's retransmissions (≈4 s)
    bed.b.netns_exec("ip", "link", "set", f"{bed.prefix}vb", "down")

    outcome: list[BaseException | None] = []

    async def rotate() -> None:
        try:
            await alice.install(ALICE, Secret.random(), meta(2))
        except SinkError as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(rotate)
        # the rotation's initiate is waiting for the new IKE SA
        await poll_until(lambda: any(sa["state"] == "CONNECTING" for sa in bed.a.sas(CONN)), 5)
        await trio.to_thread.run_sync(bed.a.swanctl, "--load-creds", "--noprompt")
        assert "qkdagent-ab-2" not in bed.a.shared_ids()
        with trio.fail_after(2):
            repaired = await alice.check_once()
        assert outcome == [], "the rotation ended before the repair"
        assert [r.secret_id for r in repaired] == ["qkdagent-ab-2"]
        assert "qkdagent-ab-2" in bed.a.shared_ids()
    (failure,) = outcome
    assert isinstance(failure, SinkError) and "previous SA was left in place" in str(failure)
    assert [sa["uniqueid"] for sa in established(bed.a)] == [old["uniqueid"]]
    assert await alice.verify(ALICE, first, meta(1)) is False  # superseded by epoch 2
    await alice.aclose()
    await bob.aclose()
