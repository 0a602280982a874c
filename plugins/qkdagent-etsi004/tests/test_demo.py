"""`qkdagent demo --source etsi004`: the demo hook and the core demo through two modules."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import qkdagent_etsi004
import trio
from qkdagent_etsi004 import codec
from qkdagent_etsi004.source import Etsi004Source

from qkdagent import Link
from qkdagent.testing import build_component, missing, running


async def test_demo_link_service_fills_the_source_tables(tmp_path: Path) -> None:
    demo = qkdagent_etsi004.qkdagent_demo_link(tmp_path)
    assert demo.alice_sources["qkd"]["type"] == "etsi004"
    assert demo.alice_sources["qkd"]["module"] == ""  # the hook does no I/O
    async with trio.open_nursery() as nursery:
        await nursery.start(demo.service.run)
        tables = {"alice": demo.alice_sources["qkd"], "bob": demo.bob_sources["qkd"]}
        assert all(t["module"].startswith("127.0.0.1:") for t in tables.values())
        assert tables["alice"]["module"] != tables["bob"]["module"]
        sources = {
            name: build_component(Etsi004Source, table, name="qkd", agent=name, state_dir=tmp_path)
            for name, table in tables.items()
        }
        async with running(*sources.values()):
            key = await sources["alice"].new_key(Link("l", "alice", "bob", True))
            same = await sources["bob"].key_by_id(Link("l", "bob", "alice", False), key.key_id)
            assert same.value == key.value
            assert codec.parse_key_id(key.key_id) is not None
        nursery.cancel_scope.cancel()
    assert (tmp_path / "qkdm-pki" / "QKDM_A.pem").is_file()


def test_core_demo_through_two_simulated_modules(tmp_path: Path) -> None:
    qkdagent = shutil.which("qkdagent")
    if qkdagent is None:
        missing("the core's `qkdagent` command is not installed")
        raise AssertionError("unreachable")
    args = ["demo", "--source", "etsi004", "--rotations", "4", "--interval", "0.2"]
    result = subprocess.run(
        [qkdagent, *args, "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ETSI GS QKD 004" in result.stdout
    epochs = [line for line in result.stdout.splitlines() if line.startswith("epoch")]
    assert len(epochs) >= 4 and all(line.endswith(" match") for line in epochs)
    assert "4 rotations, secrets identical on both sides every time." in result.stdout
    secret = (tmp_path / "alice" / "bob.key").read_bytes()
    assert secret and secret == (tmp_path / "bob" / "alice.key").read_bytes()
    assert secret.decode().strip() not in result.stdout + result.stderr
