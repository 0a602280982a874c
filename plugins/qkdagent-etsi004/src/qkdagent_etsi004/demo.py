"""`qkdagent demo --source etsi004`: alice's agent takes keys from QKDM_A, bob's from QKDM_B."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from qkdagent import DemoLink, Service

from .sim import SimSettings, Simulator, run_simulator

MODULES = {"QKDM_A": ["alice"], "QKDM_B": ["bob"]}


def demo_link(directory: Path) -> DemoLink:
    """Source tables are complete once the service has started: the modules bind their ports,
    then fill in `module` (the hook itself does no I/O)."""
    pki = Path(directory) / "qkdm-pki"
    tables: dict[str, dict[str, Any]] = {}
    for app, module in (("alice", "QKDM_A"), ("bob", "QKDM_B")):
        tables[app] = {
            "type": "etsi004",
            "module": "",
            "transport": "binary-v2",
            "cert": str(pki / f"{app}.pem"),
            "key": str(pki / f"{app}.key"),
            "ca": str(pki / "ca.pem"),
            "module_id": module,
        }

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            sim: Simulator = await nursery.start(
                run_simulator, pki, SimSettings(modules=dict(MODULES))
            )
            for app, table in tables.items():
                table.update(sim.source_table(app, transport=table["transport"]))
            task_status.started()

    return DemoLink(
        description="ETSI GS QKD 004: two simulated QKD modules (QKDM_A, QKDM_B), binary v2 "
        "dialect over mutual TLS, one simulated QKD link of 10 Mbit/s",
        service=Service("qkdm-sim", run),
        alice_sources={"qkd": tables["alice"]},
        bob_sources={"qkd": tables["bob"]},
    )
