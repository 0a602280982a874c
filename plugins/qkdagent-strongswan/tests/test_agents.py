"""Two real qkdagent agents (mutual TLS over loopback) rotating PPKs into two real charons.

alice (gateway a) is the link's initiator, bob (gateway b) its responder: bob's sink
reauthenticates the IKE SA after each commit. Real time throughout (the daemons are external).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from qkdagent import KeyMeta, Link
from qkdagent.testing import MemoryPool, open_agent_pair

from .testbed import CONN, PPK_ID, Charon, Testbed, established, poll_until

CHECK_INTERVAL = 0.5
REJECT_AFTER = 6.0


def sink_table(charon: Charon) -> dict[str, Any]:
    return {
        "type": "strongswan-ppk",
        "socket": str(charon.vici_path),
        "ppk_id": PPK_ID,
        "ike": CONN,
        "strongswan_conf": str(charon.strongswan_conf),
        "check_interval": CHECK_INTERVAL,
        "timeout": 20,
    }


async def test_agents_rotate_reauthenticate_repair_and_fail_closed(
    bed: Testbed, tmp_path: Path
) -> None:
    async with open_agent_pair(
        tmp_path / "agents",
        alice={"plugins": ["strongswan"], "sinks": {"ppk": sink_table(bed.a)}},
        bob={"plugins": ["strongswan"], "sinks": {"ppk": sink_table(bed.b)}},
        link={"interval": 2.0, "reject_after": REJECT_AFTER, "jitter": 0},
    ) as pair:
        await pair.wait_for_epoch(1)
        assert pair.secret("alice", "ppk") == pair.secret("bob", "ppk")
        assert await trio.to_thread.run_sync(bed.a.initiate, CONN)
        assert [sa["ppk"] for sa in established(bed.b)] == ["yes"]

        for target in (pair.epoch("bob") + 1, pair.epoch("bob") + 2):
            before = {side.side: {sa["uniqueid"] for sa in side.sas(CONN)} for side in bed.sides()}
            await pair.wait_for_epoch(target)
            for side in bed.sides():
                await poll_until(
                    lambda s=side, b=before: any(
                        sa["uniqueid"] not in b[s.side] and sa["ppk"] == "yes"
                        for sa in established(s)
                    ),
                    10,
                )
            # The next rotation (2 s on) may come while these run: each check is retried on
            # the key of the moment until it holds (a switch-over can lose one ping).
            with trio.fail_after(15):  # ping blocks: off the loop the agents share
                while (await trio.to_thread.run_sync(bed.a.ping)).returncode != 0:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            bob_link = Link("alice-bob", "bob", "alice", False)
            with trio.fail_after(10):
                while True:
                    secret = pair.secret("bob", "ppk")
                    meta = KeyMeta(pair.epoch("bob"), (), "ppk", 0.0)
                    if secret == pair.secret("alice", "ppk") and (
                        await pair.sink("bob", "ppk").verify(bob_link, secret, meta) is True
                    ):
                        break
                    await trio.sleep(0.05)

        # an operator reloads bob's credentials: the agent's check service re-pushes the PPK.
        # Rotations are held off first (key source down), so the repair cannot be pre-empted
        # by the next rotation's install.
        pool = MemoryPool.named(pair.configs["alice"]["sources"]["sim"]["pool"])
        pool.down = True
        failures = pair.alice.link("alice-bob").describe()["failures"]
        await poll_until(lambda: pair.alice.link("alice-bob").describe()["failures"] > failures, 5)
        secret_id = "qkdagent-alice-bob"
        await trio.to_thread.run_sync(bed.b.swanctl, "--load-creds", "--noprompt")
        await poll_until(lambda: secret_id in bed.b.shared_ids(), CHECK_INTERVAL + 2)
        await poll_until(lambda: bool(pair.sink("bob", "ppk").repairs), 3)
        pool.down = False
        # reported to bob's agent (hook, metric, log line, status) as a component event
        (event,) = pair.bob.describe()["recent_component_events"]
        assert (event["component"], event["kind"]) == ("ppk", "repaired")
        assert event["link"] == "alice-bob" and secret_id in event["detail"]

        # bob's agent stops: after reject_after alice fails closed, new IKE SAs cannot be made
        await pair.stop("bob")
        await poll_until(lambda: secret_id not in bed.a.shared_ids(), REJECT_AFTER + 5)
        assert not await trio.to_thread.run_sync(bed.a.fresh_initiate, CONN)
        assert not await trio.to_thread.run_sync(bed.b.fresh_initiate, CONN)
        assert "PPK required but no PPK found" in bed.a.log()
