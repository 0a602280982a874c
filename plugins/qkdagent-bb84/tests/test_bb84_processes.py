"""Two agents as two processes, rotating through the `bb84` source over its mutual-TLS channel."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import httpx
from qkdagent.testing import AgentProcess, config_toml, free_port, pair_configs, wait_until

TABLE = {"type": "bb84", "decoys": False, "block_bits": 4_000, "low_water": 4}


def metric(agent: AgentProcess, name: str) -> float:
    """A value from the agent's `/metrics` (0 when absent)."""
    url = agent.status_url.removesuffix("/status") + "/metrics"
    try:
        text = httpx.get(url, timeout=2).text
    except httpx.HTTPError:
        return 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def configs(tmp_path: Path) -> dict[str, Path]:
    secret = tmp_path / "channel.key"
    secret.write_bytes(base64.b64encode(os.urandom(32)))
    secret.chmod(0o600)
    port = free_port()
    sides: dict[str, dict[str, Any]] = {
        name: {
            "plugins": ["bb84"],
            "sources": {"qkd": {**TABLE, "auth_key": {"file": str(secret)}}},
            "sinks": {"psk": {"type": "file", "path": str(tmp_path / f"{name}.psk")}},
        }
        for name in ("alice", "bob")
    }
    sides["alice"]["sources"]["qkd"].update(connect=f"127.0.0.1:{port}", peer_name="bob")
    sides["bob"]["sources"]["qkd"].update(listen=f"127.0.0.1:{port}", peer_name="alice")
    link = {"interval": 1, "reject_after": 30, "jitter": 0}
    made = pair_configs(tmp_path, alice=sides["alice"], bob=sides["bob"], link=link)
    paths = {}
    for name, config in made.items():
        config["sources"]["qkd"]["tls"] = dict(config["agent"]["tls"])  # the agent's own PKI
        paths[name] = tmp_path / f"{name}.toml"
        paths[name].write_text(config_toml(config))
    return paths


def test_two_agent_processes_rotate_through_bb84_over_mutual_tls(tmp_path: Path) -> None:
    paths = configs(tmp_path)
    bob = AgentProcess(paths["bob"], tmp_path / "bob.log")
    alice = AgentProcess(paths["alice"], tmp_path / "alice.log")
    try:
        psk = {name: tmp_path / f"{name}.psk" for name in ("alice", "bob")}

        def agreed(epoch: int) -> bool:
            epochs = [max(a.epochs().values(), default=0) for a in (alice, bob)]
            files = [p.read_bytes() if p.exists() else None for p in psk.values()]
            return min(epochs) >= epoch and files[0] is not None and files[0] == files[1]

        wait_until(lambda: agreed(3), 60, "three epochs with identical file sinks")
        first = psk["alice"].read_bytes()
        wait_until(lambda: agreed(5) and psk["alice"].read_bytes() != first, 60, "epoch 5")
        # the keys came through the network channel: blocks on both ends, the pools in metrics
        assert metric(alice, "qkdagent_bb84_blocks_total") >= 1
        assert metric(bob, "qkdagent_bb84_blocks_total") >= 1
        assert metric(alice, "qkdagent_bb84_blocks_aborted_total") == 0
        assert metric(bob, "qkdagent_bb84_pool_bits") > 0
    finally:
        alice.stop()
        bob.stop()
