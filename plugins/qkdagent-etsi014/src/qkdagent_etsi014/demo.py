"""`qkdagent demo` through two simulated KMEs: alice's agent talks to KME_A, bob's to KME_B."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from qkdagent import DemoLink, Service

from .sim import SimSettings, run_simulator


def demo_link(directory: Path) -> DemoLink:
    """Source tables are complete once the service has started: it binds the ports, then fills
    in `kme_url` (the hook itself does no I/O)."""
    pki = Path(directory) / "kme-pki"
    tables: dict[str, dict[str, Any]] = {}
    for sae, kme in (("alice", "KME_A"), ("bob", "KME_B")):
        tables[sae] = {
            "type": "etsi014",
            "kme_url": "",
            "cert": str(pki / f"{sae}.pem"),
            "key": str(pki / f"{sae}.key"),
            "ca": str(pki / "ca.pem"),
            "sae_id": sae,
            "kme_id": kme,
        }

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            sim = await nursery.start(run_simulator, pki, SimSettings())
            for sae, table in tables.items():
                table["kme_url"] = sim.credentials(sae).kme_url
            task_status.started()

    return DemoLink(
        description="ETSI GS QKD 014: two simulated KMEs (KME_A, KME_B) over HTTPS with mutual "
        "TLS, one simulated QKD link of 1 Mbit/s",
        service=Service("kme-sim", run),
        alice_sources={"qkd": tables["alice"]},
        bob_sources={"qkd": tables["bob"]},
    )
