"""`qkdagent demo --source pqc`: a post-quantum-only link; each agent gets a fresh static
ML-KEM key pair (as `qkdagent pqc keygen` writes it) in the demo directory."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import trio

from qkdagent import DemoLink, Service, write_secret_file

from . import kem

NAMES = ("alice", "bob")


def demo_link(directory: Path) -> DemoLink:
    """The tables are complete once the service has started: it writes the key files and fills
    in the public keys (the hook itself does no I/O)."""
    keys = Path(directory) / "mlkem"
    tables: dict[str, dict[str, Any]] = {
        name: {"type": "mlkem", "private_key": {"file": str(keys / f"{name}.key")}}
        for name in NAMES
    }

    def write() -> dict[str, str]:
        keys.mkdir(parents=True, exist_ok=True)
        params, public = kem.PARAMETER_SETS[kem.DEFAULT], {}
        for name in NAMES:
            private = params.generate()
            write_secret_file(keys / f"{name}.key", base64.b64encode(private.private_bytes_raw()))
            public[name] = base64.b64encode(private.public_key().public_bytes_raw()).decode()
        return public

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        public = await trio.to_thread.run_sync(write)
        for name, peer in (("alice", "bob"), ("bob", "alice")):
            tables[name]["peer_public_keys"] = {peer: public[peer]}
        task_status.started()

    return DemoLink(
        description="ML-KEM-768 alone (post-quantum PSK rotation, forward secret from epoch 2)",
        service=Service("pqc-keys", run),
        alice_sources={"pqc": tables["alice"]},
        bob_sources={"pqc": tables["bob"]},
    )
