"""contrib/bb84: every agent config passes `qkdagent check` (once the files it names exist, made
up under tmp_path), and kme-sim.sh's command line parses with its bb84 supply options valid."""

from __future__ import annotations

import argparse
import base64
import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from qkdagent.testing import write_test_pki
from qkdagent_etsi014.cli import configure, settings_from

CONTRIB = Path(__file__).resolve().parents[3] / "contrib" / "bb84"
CONFIGS = sorted(CONTRIB.glob("*.toml"))
WHERE = "/tmp/bb84"  # noqa: S108 - where the examples put their files


def relocate(text: str, tmp_path: Path) -> str:
    """WHERE moves under tmp_path, with a PKI, the bootstrap secret and the channel secret."""
    root = tmp_path / "bb84"
    write_test_pki(root / "pki", ["alice", "bob", "KME_A", "KME_B"])
    bootstrap = root / "alice-bob.bootstrap"
    bootstrap.write_bytes(base64.b64encode(os.urandom(32)))
    bootstrap.chmod(0o600)
    channel = root / "channel.key"  # the bb84 sources' classical-channel HMAC secret
    channel.write_bytes(base64.b64encode(os.urandom(32)))
    channel.chmod(0o600)
    return text.replace(f"{WHERE}/", f"{root}/")


def test_there_are_examples() -> None:
    names = {p.name for p in CONFIGS}
    assert names == {"alice.toml", "bob.toml", "alice-kme.toml", "bob-kme.toml"}
    assert 'type = "bb84"' in (CONTRIB / "alice.toml").read_text()


@pytest.mark.parametrize("example", CONFIGS, ids=lambda p: p.name)
def test_example_config_checks(example: Path, tmp_path: Path) -> None:
    config = tmp_path / example.name
    config.write_text(relocate(example.read_text(), tmp_path))
    done = subprocess.run(  # noqa: S603 - the CLI as a user runs it
        [sys.executable, "-m", "qkdagent", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout


def test_the_two_bb84_agents_simulate_the_same_link() -> None:
    """The two ends' [sources.qkd] tables must agree on every setting (else every block aborts)
    but where each end is: bob listens where alice connects, each names the other's certificate
    and holds its own."""
    ends = {"listen", "connect", "peer_name", "tls"}
    tables = [
        tomllib.loads((CONTRIB / name).read_text())["sources"]["qkd"]
        for name in ("alice.toml", "bob.toml")
    ]
    alice, bob = ({k: v for k, v in t.items() if k not in ends} for t in tables)
    assert alice == bob and alice["auth_key"]
    assert tables[0]["connect"] == tables[1]["listen"]
    assert (tables[0]["peer_name"], tables[1]["peer_name"]) == ("bob", "alice")


def test_kme_sim_sh_is_a_valid_command_line_with_a_bb84_supply() -> None:
    script = (CONTRIB / "kme-sim.sh").read_text().replace("\\\n", " ")
    (line,) = [s for s in script.splitlines() if "qkdagent kme-sim" in s]
    argv = shlex.split(line.split("kme-sim", 1)[1].replace('"$PKI"', f"{WHERE}/pki"))
    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(argv)
    assert args.port == 8441 and args.supply.startswith("bb84:")
    settings = settings_from(args)  # loads the bb84 supply through its entry point
    assert settings.supply_factory is not None
    assert dict(settings.kmes) == {"KME_A": ["alice"], "KME_B": ["bob"]}
    # the agents' KME URLs are the ports kme-sim.sh serves
    assert "https://127.0.0.1:8441" in (CONTRIB / "alice-kme.toml").read_text()
    assert "https://127.0.0.1:8442" in (CONTRIB / "bob-kme.toml").read_text()
