"""`qkdagent pqc keygen` and `pubkey`, through the real command line."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from qkdagent_pqc import kem
from qkdagent_pqc.source import MlkemSource

from qkdagent import Link
from qkdagent.testing import build_component


def _qkdagent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qkdagent", "pqc", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("parameter_set", ["ML-KEM-768", "ML-KEM-1024"])
async def test_keygen_writes_a_pair_the_source_uses(tmp_path: Path, parameter_set: str) -> None:
    private = tmp_path / "bob.mlkem"
    done = _qkdagent("keygen", str(private), "--parameter-set", parameter_set)
    assert done.returncode == 0, done.stderr
    assert private.stat().st_mode & 0o777 == 0o600
    printed = done.stdout.strip()
    assert (tmp_path / "bob.mlkem.pub").read_text().strip() == printed
    assert _qkdagent("pubkey", str(private), "--parameter-set", parameter_set).stdout == done.stdout
    # the public key goes into alice's config, the private key file into bob's
    params = kem.PARAMETER_SETS[parameter_set]
    table: dict[str, Any] = {"parameter_set": parameter_set}
    alice = build_component(MlkemSource, {**table, "peer_public_keys": {"bob": printed}})
    bob = build_component(MlkemSource, {**table, "private_key": {"file": str(private)}})
    assert bob.static_fingerprint in done.stderr
    key = await alice.offer(Link("l", "alice", "bob", True), None)
    answered = await bob.answer(Link("l", "bob", "alice", False), key.key_id, None)
    assert answered.key.value == key.value
    assert len(base64.b64decode(printed)) == params.public_size


def test_keygen_does_not_replace_a_key_unless_forced(tmp_path: Path) -> None:
    private = tmp_path / "k"
    first = _qkdagent("keygen", str(private)).stdout
    refused = _qkdagent("keygen", str(private))
    assert refused.returncode == 2 and "exists; --force replaces it" in refused.stderr
    assert _qkdagent("pubkey", str(private)).stdout == first
    forced = _qkdagent("keygen", str(private), "--force")
    assert forced.returncode == 0 and forced.stdout != first


@pytest.mark.parametrize(
    "content", [b"", b"not base64!", base64.b64encode(b"\0" * 32), b"A" * 9000]
)
def test_pubkey_refuses_what_is_not_a_private_key_in_one_line(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "k"
    path.write_bytes(content)
    done = _qkdagent("pubkey", str(path))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("qkdagent pqc pubkey: ")


def test_pubkey_refuses_a_fifo_without_hanging(tmp_path: Path) -> None:
    import os

    path = tmp_path / "fifo"
    os.mkfifo(path)
    done = _qkdagent("pubkey", str(path))
    assert done.returncode == 2 and "not a regular file" in done.stderr
