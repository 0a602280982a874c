"""`qkdagent demo --source pqc`: two agents rotate through ML-KEM alone, with identical secrets,
and the demo's static private keys are written as `qkdagent pqc keygen` writes them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_the_demo_rotates_a_pqc_only_link(tmp_path: Path) -> None:
    demo = ["demo", "--source", "pqc", "--rotations", "3", "--interval", "0.5"]
    result = subprocess.run(
        [sys.executable, "-m", "qkdagent", *demo, "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "ML-KEM-768" in result.stdout
    assert "3 rotations, secrets identical on both sides every time." in result.stdout
    keys = sorted((tmp_path / "mlkem").iterdir())
    assert [k.name for k in keys] == ["alice.key", "bob.key"]
    assert all(k.stat().st_mode & 0o777 == 0o600 for k in keys)
    assert (tmp_path / "alice" / "bob.key").read_bytes() == (
        tmp_path / "bob" / "alice.key"
    ).read_bytes()
