"""contrib/dske: every agent config passes `qkdagent check`, and every hub command line in
hubs.sh parses, once the files they name exist (made up under tmp_path)."""

from __future__ import annotations

import argparse
import base64
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from qkdagent_dske.cli import configure

from qkdagent.testing import write_test_pki

CONTRIB = Path(__file__).resolve().parents[3] / "contrib" / "dske"
CONFIGS = sorted(CONTRIB.glob("*.toml"))
NAMES = ["hank", "helen", "hilary", "holly", "hugo", "alice", "bob"]


def relocate(text: str, tmp_path: Path) -> str:
    """/tmp/dske and /tmp/kme-pki move under tmp_path, with a PKI and a bootstrap secret."""
    for prefix in ("dske", "kme-pki"):
        write_test_pki(tmp_path / prefix / "pki" if prefix == "dske" else tmp_path / prefix, NAMES)
        text = text.replace(f"/tmp/{prefix}/", f"{tmp_path / prefix}/")
    bootstrap = tmp_path / "dske" / "alice-bob.bootstrap"
    bootstrap.write_bytes(base64.b64encode(os.urandom(32)))
    bootstrap.chmod(0o600)
    return text


def test_there_are_examples() -> None:
    assert {p.name for p in CONFIGS} >= {"alice.toml", "bob.toml", "alice-hybrid.toml"}


@pytest.mark.parametrize("example", CONFIGS, ids=lambda p: p.name)
def test_example_config_checks(example: Path, tmp_path: Path) -> None:
    config = tmp_path / example.name
    config.write_text(relocate(example.read_text(), tmp_path))
    # the CLI as a user runs it (plugins may not import the core's cli module)
    done = subprocess.run(
        [sys.executable, "-m", "qkdagent", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout


def test_every_hub_in_hubs_sh_is_a_valid_command_line(tmp_path: Path) -> None:
    script = (CONTRIB / "hubs.sh").read_text().replace("\\\n", " ")
    (line,) = [s for s in script.splitlines() if "qkdagent dske-hub" in s]
    parser = argparse.ArgumentParser()
    configure(parser)
    ports = re.search(r"^port=(\d+)", script, re.M)
    hubs = re.search(r"^for hub in (.+); do", script, re.M)
    assert ports and hubs
    names = hubs.group(1).split()
    assert len(names) == 5
    for i, hub in enumerate(names):
        expanded = (
            line.replace("$PKI", "/tmp/dske/pki")
            .replace('"$hub"', hub)
            .replace("$hub", hub)
            .replace('"$port"', str(int(ports.group(1)) + i))
        )
        argv = shlex.split(expanded.split("dske-hub", 1)[1].rstrip("& "))
        args = parser.parse_args(argv)
        assert (args.name, args.port, args.plain_http) == (hub, 8451 + i, False)
        assert args.cert == Path(f"/tmp/dske/pki/{hub}.pem") and args.ca.name == "ca.pem"
    # the agents' hub URLs are the ports hubs.sh serves
    alice = (CONTRIB / "alice.toml").read_text()
    for i, hub in enumerate(names):
        assert f'url = "https://127.0.0.1:{8451 + i}/{hub}"' in alice
