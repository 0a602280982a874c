"""Fixtures shared by the plugin's tests: static key pairs and `mlkem` source tables."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from qkdagent_pqc import kem

from qkdagent import write_secret_file
from qkdagent.testing.pytest_plugin import install_logging_guard

NAMES = ("alice", "bob")


def pytest_configure(config: pytest.Config) -> None:
    """Each test leaves the logging tree as it found it (the test kit's guard)."""
    install_logging_guard(config)


class StaticKeys:
    """A static key pair per agent, written as `qkdagent pqc keygen` writes them."""

    def __init__(self, directory: Path, parameter_set: str = kem.DEFAULT) -> None:
        self.params = kem.PARAMETER_SETS[parameter_set]
        self.files: dict[str, Path] = {}
        self.public: dict[str, bytes] = {}
        directory.mkdir(parents=True, exist_ok=True)
        for name in NAMES:
            private = self.params.generate()
            self.files[name] = path = directory / f"{name}.mlkem"
            write_secret_file(path, base64.b64encode(private.private_bytes_raw()))
            self.public[name] = private.public_key().public_bytes_raw()

    def table(self, name: str, **extra: Any) -> dict[str, Any]:
        """`[sources.pqc]` for agent `name`: its private key, the other's public key."""
        peer = NAMES[1 - NAMES.index(name)]
        return {
            "type": "mlkem",
            "parameter_set": self.params.name,
            "private_key": {"file": str(self.files[name])},
            "peer_public_keys": {peer: base64.b64encode(self.public[peer]).decode()},
            **extra,
        }


@pytest.fixture
def static_keys(tmp_path: Path) -> StaticKeys:
    return StaticKeys(tmp_path / "mlkem")


@pytest.fixture
def make_keys(tmp_path: Path) -> Callable[..., StaticKeys]:
    return lambda parameter_set=kem.DEFAULT, name="mlkem": StaticKeys(
        tmp_path / name, parameter_set
    )
