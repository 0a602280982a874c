"""The contrib/pqc example configs pass `qkdagent check`, as written (alice initiates, so bob's
public key is enough) and with the commented static private key in place (both roles)."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from qkdagent_pqc import kem

from qkdagent import write_secret_file, write_test_pki

EXAMPLES = sorted((Path(__file__).resolve().parents[3] / "contrib" / "pqc").glob("*.toml"))
PRIVATE_KEY = re.compile(r"^# (private_key = \{ file = \"[^\"]+\" \})", re.M)


def _check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qkdagent", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _relocated(example: Path, tmp_path: Path, *, with_private_key: bool) -> Path:
    """The example with every absolute path under tmp_path, and files for each of them."""
    text = example.read_text()
    if with_private_key:
        text, count = PRIVATE_KEY.subn(r"\1", text)
        assert count == 1
    pki = write_test_pki(tmp_path / "pki", ["agent"])
    for path in sorted(set(re.findall(r'"(/[^"]+)"', text)), key=len, reverse=True):
        moved = tmp_path / "root" / path.lstrip("/")
        moved.parent.mkdir(parents=True, exist_ok=True)
        if moved.suffix == ".bootstrap":
            write_secret_file(moved, base64.b64encode(os.urandom(32)))
        elif moved.suffix == ".mlkem":
            seed = kem.PARAMETER_SETS[kem.DEFAULT].generate().private_bytes_raw()
            write_secret_file(moved, base64.b64encode(seed))
        elif moved.suffix == ".key":
            write_secret_file(moved, pki["agent"].key.read_bytes())
        elif moved.suffix == ".pem":
            moved.write_bytes(
                (pki.ca_cert if moved.stem == "ca" else pki["agent"].cert).read_bytes()
            )
        text = text.replace(f'"{path}"', f'"{moved}"')
    config = tmp_path / example.name
    config.write_text(text)
    return config


def test_there_are_pqc_only_and_hybrid_examples() -> None:
    assert [p.name for p in EXAMPLES] == ["alice-hybrid.toml", "alice-pqc.toml"]


@pytest.mark.parametrize("with_private_key", [False, True], ids=["initiator", "both-roles"])
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_the_example_passes_check(example: Path, tmp_path: Path, with_private_key: bool) -> None:
    result = _check(_relocated(example, tmp_path, with_private_key=with_private_key))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_check_refuses_a_damaged_public_key(tmp_path: Path) -> None:
    """The positive results above can fail: a public key cut short is refused, named."""
    config = _relocated(EXAMPLES[-1], tmp_path, with_private_key=False)
    config.write_text(
        re.sub(r'^bob = "(.{100})[^"]*"', r'bob = "\1"', config.read_text(), flags=re.M)
    )
    result = _check(config)
    assert result.returncode != 0
    assert "sources.pqc.peer_public_keys.bob" in result.stderr
