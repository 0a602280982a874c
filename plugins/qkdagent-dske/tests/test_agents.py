"""Two real agents rotating 100 times through our hubs (identical secrets every epoch): one
hub down, one lying."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from qkdagent.testing import open_agent_pair

from .hubs import hub_table, open_hubs

ROTATIONS = 100


async def test_agents_rotate_through_hubs_with_one_down_and_one_lying(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with open_hubs(tmp_path / "dske", ["hank", "helen", "hilary", "holly"]) as (pki, hubs):
        hubs[0].stop()  # hank is down for the whole run
        hubs[1].stop()  # helen comes back as a liar
        hubs[1].lying = True
        await hubs[1].start()

        def side(name: str) -> dict:
            table = {"type": "dske", "hubs": hub_table(pki, hubs, name), "k": 2}
            return {
                "plugins": ["dske", "memory"],
                "sources": {"dske": table},
                "sinks": {"rec": {"type": "recording"}},
            }

        async with open_agent_pair(
            tmp_path / "agents",
            alice=side("alice"),
            bob=side("bob"),
            link={"interval": 0.01, "jitter": 0, "reject_after": 60},
        ) as pair:
            await pair.wait_for_epoch(ROTATIONS, timeout=75)
            await pair.wait_for_installs(ROTATIONS, "rec")
            installs = {
                name: {r.epoch: r for r in pair.sink(name, "rec").installs}
                for name in ("alice", "bob")
            }
    epochs = range(1, ROTATIONS + 1)
    for epoch in epochs:
        a, b = installs["alice"][epoch], installs["bob"][epoch]
        assert a.fingerprint == b.fingerprint, epoch
        assert a.key_ids == b.key_ids and len(a.key_ids) == 1
    assert len({installs["alice"][e].fingerprint for e in epochs}) == ROTATIONS
    lies = [r for r in caplog.records if "helen" in r.getMessage() and "digest" in r.getMessage()]
    assert len(lies) >= ROTATIONS  # bob named the liar on every rotation
