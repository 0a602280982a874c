"""Two real charons (kernel-libipsec, UDP encapsulation) in two namespaces, PPK required.

Both sinks are driven directly the way the core drives them after a commit: alice (the link's
initiator) installs first, bob (the responder) installs second and reauthenticates.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from functools import partial

import pytest
import trio
from qkdagent_strongswan import StrongswanPpkSink

from qkdagent import ComponentEvent, KeyMeta, Link, Misconfigured, NotInstalled, Secret, SinkError
from qkdagent.testing import assert_not_leaked

from .testbed import (
    CONN,
    PPK_ID,
    Charon,
    Testbed,
    established,
    poll_until,
    ppk_log_count,
    wait_until,
)

SinkFactory = Callable[..., StrongswanPpkSink]
# The link as each agent sees it: alice (gateway a) is the link's initiator, bob (b) responds.
ALICE = Link("ab", "alice", "bob", True)
BOB = Link("ab", "bob", "alice", False)


def meta(epoch: int) -> KeyMeta:
    return KeyMeta(epoch, (f"key-{epoch}",), "ppk", time.time())


@pytest.fixture
async def pair(
    bed: Testbed, make_sink: SinkFactory
) -> AsyncIterator[tuple[StrongswanPpkSink, StrongswanPpkSink]]:
    alice, bob = make_sink(bed.a), make_sink(bed.b)
    await alice.prepare()
    await bob.prepare()
    yield alice, bob
    await alice.aclose()
    await bob.aclose()


async def rotate(
    pair: tuple[StrongswanPpkSink, StrongswanPpkSink],
    epoch: int,
    secret: Secret,
    bob_secret: Secret | None = None,
) -> None:
    alice, bob = pair
    await alice.install(ALICE, secret, meta(epoch))
    await bob.install(BOB, bob_secret or secret, meta(epoch))


async def up(bed: Testbed) -> None:
    assert await trio.to_thread.run_sync(bed.a.initiate, CONN), bed.a.log()[-3000:]


def ping_ok(charon: Charon) -> bool:
    return charon.ping(count=1, wait=2).returncode == 0


async def test_each_rotation_reauthenticates_with_the_new_ppk(bed: Testbed, pair) -> None:
    alice, bob = pair
    first = Secret.random()
    await rotate(pair, 1, first)
    await up(bed)
    for side in bed.sides():
        assert [sa["ppk"] for sa in established(side)] == ["yes"]
    assert ping_ok(bed.a)

    secrets = [first]
    for epoch in (2, 3, 4):
        before = {side.side: {sa["uniqueid"] for sa in side.sas(CONN)} for side in bed.sides()}
        used = {side.side: ppk_log_count(side, PPK_ID) for side in bed.sides()}
        secret = Secret.random()
        secrets.append(secret)
        await rotate(pair, epoch, secret)
        for side in bed.sides():
            # the old SA goes away once the new one is up (make-before-break)
            wait_until(lambda s=side: len(established(s)) == 1, 10, "old IKE SA not deleted")
            (sa,) = established(side)
            assert sa["uniqueid"] not in before[side.side], "IKE SA was not reauthenticated"
            assert sa["ppk"] == "yes"
            assert ppk_log_count(side, PPK_ID) == used[side.side] + 1
        assert ping_ok(bed.a) and ping_ok(bed.b)
        assert await alice.verify(ALICE, secret, meta(epoch)) is True
        assert await bob.verify(BOB, secret, meta(epoch)) is True
        assert await bob.verify(BOB, secrets[-2], meta(epoch - 1)) is False
    assert_not_leaked(bed.a.log() + bed.b.log(), secrets)


async def test_different_ppk_fails_authentication_and_keeps_the_old_sa(bed: Testbed, pair) -> None:
    alice, bob = pair
    await rotate(pair, 1, Secret.random())
    await up(bed)
    (old,) = established(bed.a)

    good = Secret.random()
    await alice.install(ALICE, good, meta(2))
    with pytest.raises(SinkError, match="previous SA was left in place"):
        await bob.install(BOB, Secret.random(), meta(2))
    # the agent did not tear anything down: the old SA still carries traffic
    assert [sa["uniqueid"] for sa in established(bed.a)] == [old["uniqueid"]]
    assert ping_ok(bed.a)
    assert "AUTHENTICATION_FAILED" in bed.a.log() + bed.b.log()

    # the matching PPK repairs it on the next install
    await bob.install(BOB, good, meta(2))
    wait_until(lambda: len(established(bed.b)) == 1, 10, "old IKE SA not deleted")
    (sa,) = established(bed.b)
    assert sa["uniqueid"] != old["uniqueid"] and sa["ppk"] == "yes"
    assert ping_ok(bed.b)


async def test_verify_needs_the_ike_sa_made_with_the_new_ppk(
    bed: Testbed, make_sink: SinkFactory
) -> None:
    alice, bob = make_sink(bed.a), make_sink(bed.b, reauth_retries=0)
    await rotate((alice, bob), 1, Secret.random())
    await up(bed)
    (old,) = established(bed.b)
    secret = Secret.random()

    # bob loads epoch 2 first: his reauthentication is rejected, the old SA (epoch 1's PPK,
    # `ppk: yes`) stays up, so epoch 2's PPK is loaded but not in effect
    with pytest.raises(SinkError, match="previous SA was left in place"):
        await bob.install(BOB, secret, meta(2))
    assert [(sa["uniqueid"], sa["ppk"]) for sa in established(bed.b)] == [(old["uniqueid"], "yes")]
    assert await bob.verify(BOB, secret, meta(2)) is False

    # both hold it now: the retried install reauthenticates and verify() accepts the new SA
    await alice.install(ALICE, secret, meta(2))
    await bob.install(BOB, secret, meta(2))
    assert await bob.verify(BOB, secret, meta(2)) is True
    assert any(sa["uniqueid"] != old["uniqueid"] for sa in established(bed.b))

    # a plain IKE rekey of the new SA keeps its (PPK-derived) keys: still verified
    before = {sa["uniqueid"] for sa in established(bed.b)}
    await trio.to_thread.run_sync(ike_rekey, bed.b)
    await poll_until(lambda: {sa["uniqueid"] for sa in established(bed.b)}.isdisjoint(before), 10)
    assert await bob.verify(BOB, secret, meta(2)) is True

    # no IKE SA at all after the reauthentication: not verified until a new one comes up
    await trio.to_thread.run_sync(bed.a.terminate, CONN)
    assert established(bed.b) == []
    assert await bob.verify(BOB, secret, meta(2)) is False
    await up(bed)
    assert await bob.verify(BOB, secret, meta(2)) is True
    await alice.aclose()
    await bob.aclose()


def ike_rekey(charon: Charon) -> None:
    session = charon.session()
    try:
        session.rekey({"ike": CONN})
    finally:
        session.transport.close()


async def test_control_run_with_different_ppks_never_authenticates(bed: Testbed, pair) -> None:
    await rotate(pair, 1, Secret.random(), bob_secret=Secret.random())
    assert not await trio.to_thread.run_sync(bed.a.fresh_initiate, CONN)
    assert not await trio.to_thread.run_sync(bed.b.fresh_initiate, CONN)
    assert established(bed.a) == [] and established(bed.b) == []
    assert "AUTHENTICATION_FAILED" in bed.a.log() + bed.b.log()
    assert not ping_ok(bed.a)
    # same sinks, same charons, matching PPKs: works (so the failure above was the PPK)
    await rotate(pair, 2, Secret.random())
    assert await trio.to_thread.run_sync(bed.a.fresh_initiate, CONN)
    assert ping_ok(bed.a)


async def test_swanctl_load_creds_is_repaired_within_one_check_interval(
    bed: Testbed, make_sink: SinkFactory, reported: list[ComponentEvent]
) -> None:
    interval = 1.0
    alice, bob = make_sink(bed.a), make_sink(bed.b, check_interval=interval)
    await alice.prepare()
    await bob.prepare()
    await rotate((alice, bob), 1, Secret.random())
    await up(bed)
    secret_id = bob.config.secret_id.format(link=BOB.name, sink=bob.name)
    assert secret_id in bed.b.shared_ids()

    result = await trio.to_thread.run_sync(bed.b.swanctl, "--load-creds", "--noprompt")
    assert "ike-qkdtest" in result.stdout
    assert secret_id not in bed.b.shared_ids(), "swanctl did not unload the PPK"

    async with trio.open_nursery() as nursery:
        await nursery.start(bob.run)
        started = time.monotonic()
        # the sink's own report marks the repair (polling charon from here would add the
        # latency of a swanctl process per poll to the figure)
        await poll_until(lambda: bool(reported), interval + 10)
        repaired_after = time.monotonic() - started
        nursery.cancel_scope.cancel()
    assert secret_id in bed.b.shared_ids()
    assert repaired_after <= interval + 0.5
    assert [(r.link, r.secret_id) for r in bob.repairs] == [(BOB.name, secret_id)]
    (event,) = reported
    assert (event.component, event.kind, event.link) == (bob.name, "repaired", BOB.name)
    assert secret_id in event.detail and "--load-creds" in event.detail
    # the re-pushed PPK is the right one: a reauthentication succeeds with it
    before = {sa["uniqueid"] for sa in bed.b.sas(CONN)}
    await bob.reauthenticate(BOB)
    assert {sa["uniqueid"] for sa in established(bed.b)} - before
    await alice.aclose()
    await bob.aclose()


PING_STATS = re.compile(r"(\d+) packets transmitted, (\d+) received")


async def test_make_before_break_loses_at_most_one_packet_per_rotation(bed: Testbed, pair) -> None:
    await rotate(pair, 1, Secret.random())
    await up(bed)
    rotations, count, spacing = 3, 1000, 25
    argv = ["ip", "netns", "exec", bed.a.netns, "stdbuf", "-oL"]  # each reply line as it comes
    argv += ["ping", "-n", "-i", "0.01", "-c", str(count)]
    argv += ["-W", "1", "-I", bed.a.inner, bed.a.peer_inner]
    output = bytearray()

    def replies() -> int:
        return output.count(b"bytes from")

    async def read(stream: trio.abc.ReceiveStream) -> None:
        async for chunk in stream:
            output.extend(chunk)

    async with trio.open_nursery() as nursery:
        ping = await nursery.start(
            partial(trio.run_process, argv, stdout=subprocess.PIPE, check=False)
        )
        nursery.start_soon(read, ping.stdout)
        for epoch in range(2, 2 + rotations):
            # pings flow through the tunnel before (and between) the rotations
            target = replies() + spacing
            await poll_until(lambda t=target: replies() >= t, 10)
            before = {side.side: {sa["uniqueid"] for sa in side.sas(CONN)} for side in bed.sides()}
            await rotate(pair, epoch, Secret.random())
            for side in bed.sides():
                # make-before-break done: the old SA is gone, the new one is up
                await poll_until(
                    lambda s=side, b=before: (
                        bool(established(s))
                        and all(sa["uniqueid"] not in b[s.side] for sa in established(s))
                    ),
                    10,
                )
        # every rotation finished inside the ping window, and pings go on after the last one
        assert ping.poll() is None, "the rotations outlasted the ping window"
        after_rotations = replies()
    text = output.decode()
    assert replies() > after_rotations + spacing, text[-500:]
    sent, received = map(int, PING_STATS.search(text).groups())
    assert sent == count
    assert sent - received <= rotations, text[-500:]  # at most one per rotation


async def test_erase_makes_new_ike_sas_fail_closed(bed: Testbed, pair) -> None:
    alice, _ = pair
    secret = Secret.random()
    await rotate(pair, 1, secret)
    await up(bed)
    await alice.erase(ALICE, "reject_after")
    assert await alice.verify(ALICE, secret, meta(1)) is False
    assert not await trio.to_thread.run_sync(bed.a.fresh_initiate, CONN)
    assert "PPK required but no PPK found" in bed.a.log()
    # bob still has the PPK, but alice (responding now) has none: fails too
    assert not await trio.to_thread.run_sync(bed.b.fresh_initiate, CONN)
    assert established(bed.a) == [] and not ping_ok(bed.a)


async def test_erase_random_makes_new_ike_sas_fail_authentication(
    bed: Testbed, make_sink: SinkFactory
) -> None:
    alice, bob = make_sink(bed.a, erase="random"), make_sink(bed.b)
    await alice.prepare()
    await bob.prepare()
    await rotate((alice, bob), 1, Secret.random())
    await up(bed)
    await alice.erase(ALICE, "reject_after")
    assert alice.config.secret_id.format(link="ab", sink="ppk") in bed.a.shared_ids()
    assert not await trio.to_thread.run_sync(bed.a.fresh_initiate, CONN)
    assert "AUTHENTICATION_FAILED" in bed.a.log() + bed.b.log()
    # the checker keeps the random replacement, it does not resurrect the erased PPK
    bed.a.swanctl("--load-creds", "--noprompt")
    repaired = await alice.check_once()
    assert len(repaired) == 1
    assert not await trio.to_thread.run_sync(bed.b.fresh_initiate, CONN)
    await alice.aclose()
    await bob.aclose()


async def test_prepare_reports_missing_daemon_and_wrong_config(
    bed: Testbed, make_sink: SinkFactory, tmp_path
) -> None:
    with pytest.raises(NotInstalled, match="VICI socket"):
        await make_sink(bed.a, socket=str(tmp_path / "nothing.vici")).prepare()
    with pytest.raises(Misconfigured, match="no connection 'nope'"):
        await make_sink(bed.a, ike="nope").prepare()
    with pytest.raises(Misconfigured, match="uses ppk_id 'qkd-gw'"):
        await make_sink(bed.a, ppk_id="other").prepare()
    sink = make_sink(bed.a)
    await sink.prepare()
    assert sink.make_before_break is True
    assert sink.daemon_version and sink.daemon_version.startswith(("5.", "6."))


@pytest.mark.parametrize("make_before_break", [False])
async def test_prepare_warns_without_make_before_break(
    bed: Testbed, make_sink: SinkFactory, caplog
) -> None:
    sink = make_sink(bed.b)
    await sink.prepare()
    assert sink.make_before_break is False
    assert "make_before_break" in caplog.text


async def test_charon_restart_loses_the_ppk_and_the_check_restores_it(
    bed: Testbed, pair, reported: list[ComponentEvent]
) -> None:
    alice, _ = pair
    secret = Secret.random()
    await rotate(pair, 1, secret)
    await trio.to_thread.run_sync(bed.a.stop)
    # charon is down: every check fails, the agent hears of it once
    for _ in range(2):
        with pytest.raises(SinkError, match="VICI socket"):
            await alice.check_once()
    assert [(e.component, e.kind, e.link) for e in reported] == [("ppk", "check_failed", None)]
    await trio.to_thread.run_sync(bed.a.start)
    await trio.to_thread.run_sync(lambda: bed.a.swanctl("--load-all", "--noprompt"))
    assert "qkdagent-ab" not in bed.a.shared_ids()
    assert await alice.verify(ALICE, secret, meta(1)) is False
    repaired = await alice.check_once()  # reconnects its VICI session to the new daemon
    assert [r.secret_id for r in repaired] == ["qkdagent-ab"]
    assert [(e.kind, e.link) for e in reported[1:]] == [("repaired", ALICE.name)]
    assert_not_leaked(repr(reported), [secret])
    assert await alice.verify(ALICE, secret, meta(1)) is True
    assert await trio.to_thread.run_sync(bed.a.initiate, CONN)
    assert [sa["ppk"] for sa in established(bed.a)] == ["yes"]


async def test_reauth_rejected_because_the_initiator_was_late_is_retried(
    bed: Testbed, make_sink: SinkFactory
) -> None:
    """The core installs on the initiator while it sends `commit`: the responder may be first."""
    alice, bob = make_sink(bed.a), make_sink(bed.b, reauth_retry_delay=2.0)
    await rotate((alice, bob), 1, Secret.random())
    await up(bed)
    (old,) = established(bed.b)
    secret = Secret.random()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bob.install, BOB, secret, meta(2))  # alice does not have it yet
        await poll_until(lambda: "AUTHENTICATION_FAILED" in bed.b.log(), 5)
        await alice.install(ALICE, secret, meta(2))  # lands during bob's retry delay
    wait_until(lambda: len(established(bed.b)) == 1, 10, "old IKE SA not deleted")
    (new,) = established(bed.b)
    assert new["uniqueid"] != old["uniqueid"] and new["ppk"] == "yes"
    assert ppk_log_count(bed.b, PPK_ID) == 2
    await alice.aclose()
    await bob.aclose()
