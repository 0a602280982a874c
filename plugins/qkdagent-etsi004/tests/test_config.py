"""An agent config naming the `etsi004` source passes the core's own parsing (`qkdagent check`).

The core owns `timeout` in every component table (seconds, at most 600, bounding each call);
the QoS timeout (milliseconds) is therefore `qos_timeout`, and the two must not collide.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qkdagent.testing import config_toml, missing, pair_configs


def _check(tmp_path: Path, **qkd: Any) -> subprocess.CompletedProcess[str]:
    qkdagent = shutil.which("qkdagent")
    if qkdagent is None:
        missing("the core's `qkdagent` command is not installed")
        raise AssertionError("unreachable")
    pki = tmp_path / "pki"  # pair_configs writes it: alice's files serve as her module identity
    table = {
        "type": "etsi004",
        "module": "127.0.0.1:25575",
        "cert": str(pki / "alice.pem"),
        "key": str(pki / "alice.key"),
        "ca": str(pki / "ca.pem"),
        **qkd,
    }
    sinks = {"psk": {"type": "file", "path": str(tmp_path / "bob.psk")}}
    alice = {"sources": {"qkd": table}, "sinks": sinks, "plugins": ["etsi004"]}
    config = pair_configs(tmp_path, alice=alice)
    path = tmp_path / "alice.toml"
    path.write_text(config_toml(config["alice"]))
    return subprocess.run(
        [qkdagent, "check", "-c", str(path)], capture_output=True, text=True, timeout=60
    )


def test_qos_timeout_in_milliseconds_beside_the_core_timeout(tmp_path: Path) -> None:
    result = _check(tmp_path, qos_timeout=5000, timeout=10, ttl=3600, key_chunk_size=32)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


@pytest.mark.parametrize(
    ("option", "value", "text"),
    [
        ("qos_timeout", 0, "qos_timeout"),
        ("transport", "binary-v3", "transport"),
        ("module", "127.0.0.1:\u00b2", "module"),  # isdigit() passes it, int() refuses it
    ],
)
def test_bad_options_are_named(tmp_path: Path, option: str, value: Any, text: str) -> None:
    result = _check(tmp_path, **{option: value})
    assert result.returncode != 0
    assert text in result.stderr
