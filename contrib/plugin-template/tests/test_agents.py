"""Two real agents (mutual TLS on loopback) rotating through this plugin's source and sink.

This is the test that needs the plugin installed (`pip install -e .`): the agents find it by its
entry point, as a deployment would, from `[agent] plugins = ["example"]`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio
from qkdagent.testing import open_agent_pair

Provision = Callable[..., list[Path]]
"""The `provision` fixture (conftest.py): `provision(count)` -> alice's and bob's key dirs."""


async def test_agents_rotate_through_the_plugin(provision: Provision, tmp_path: Path) -> None:
    alice_dir, bob_dir = provision(20)
    sides = {
        name: {
            "plugins": ["example"],
            "sources": {"pool": {"type": "example-shareddir", "directory": str(directory)}},
            "sinks": {"psk": {"type": "example-file", "path": str(tmp_path / name / "{peer}.psk")}},
        }
        for name, directory in (("alice", alice_dir), ("bob", bob_dir))
    }
    for name in sides:
        (tmp_path / name).mkdir()
    link = {"interval": 1, "reject_after": 30, "jitter": 0}
    async with open_agent_pair(tmp_path / "pair", link=link, **sides) as pair:
        await pair.wait_for_epoch(2)
        # bob installs right after he commits: wait (bounded) until his file holds the epoch
        # both sides derived (rotations go on meanwhile, so read both each time)
        with trio.fail_after(10):
            while True:
                alice_secret = pair.secret("alice", "psk")
                held = (tmp_path / "bob" / "alice.psk").read_text()
                same = alice_secret == pair.secret("bob", "psk")
                if same and bytes.fromhex(held) == alice_secret.reveal():
                    break
                await trio.sleep(0.05)
    used = 20 - len(list(alice_dir.iterdir()))
    assert used >= 2 and len(list(bob_dir.iterdir())) <= 20 - 2  # both sides consumed keys
