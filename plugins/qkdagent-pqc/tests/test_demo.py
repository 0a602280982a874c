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


def test_the_hybrid_demo_mixes_etsi014_and_ml_kem_keys(tmp_path: Path) -> None:
    demo = ["demo", "--source", "etsi014,pqc", "--rotations", "2", "--interval", "0.5"]
    result = subprocess.run(
        [sys.executable, "-m", "qkdagent", *demo, "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "ETSI GS QKD 014" in result.stdout and "ML-KEM-768" in result.stdout
    assert "2 rotations, secrets identical on both sides every time." in result.stdout
    # every rotation carries two key IDs: the KME's and the ML-KEM ciphertext's
    epochs = [line for line in result.stdout.splitlines() if line.startswith("epoch")]
    assert epochs and all("," in line.split("key IDs")[1].split()[0] for line in epochs)
    assert (tmp_path / "pqc" / "mlkem").is_dir() and (tmp_path / "etsi014").is_dir()


def test_a_demo_source_named_twice_is_refused(tmp_path: Path) -> None:
    demo = ["demo", "--source", "pqc,pqc", "--dir", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, "-m", "qkdagent", *demo], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1 and "name each demo source once" in result.stderr
