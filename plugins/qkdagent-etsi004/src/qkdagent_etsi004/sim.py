"""Simulated QKD modules, ready in-process (tests, demo) or from `qkdagent qkdm-sim`.

    async with open_qkdm_pair(tmp_path) as sim:          # QKDM_A serves alice, QKDM_B bob
        table = sim.source_table("alice", transport="binary-v1")

Certificates come from a throw-away CA (`qkdagent.write_test_pki`, CN = the name, SANs
localhost/127.0.0.1/::1); a directory that already has a CA gets the missing names added.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from qkdagent import SupplyFactory, extend_test_pki, file_stem, write_test_pki

from .codec import Dialect
from .network import Limits, ModuleNetwork
from .restserver import RestServer
from .server import ModuleServer, server_ssl_context

DEFAULT_MODULES: dict[str, list[str]] = {"QKDM_A": ["alice"], "QKDM_B": ["bob"]}


def default_pairs(modules: Mapping[str, list[str]]) -> list[tuple[str, str]]:
    """Modules in the order given, linked two by two."""
    names = list(modules)
    if len(names) % 2:
        raise ValueError("modules are linked in pairs: give an even number of modules")
    return [(names[i], names[i + 1]) for i in range(0, len(names), 2)]


def make_pki(directory: Path | str, modules: Mapping[str, list[str]] = DEFAULT_MODULES) -> Path:
    directory = Path(directory)
    names = [*modules, *(app for apps in modules.values() for app in apps)]
    if (directory / "ca.pem").is_file():
        extend_test_pki(directory, names)
    else:
        write_test_pki(directory, names, ca_name="qkdagent qkdm-sim test CA")
    return directory


@dataclass(frozen=True)
class SimSettings:
    modules: Mapping[str, list[str]] = field(default_factory=lambda: dict(DEFAULT_MODULES))
    pairs: list[tuple[str, str]] | None = None
    host: str = "127.0.0.1"
    ports: Mapping[str, int] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    rate_bps: float = 10_000_000.0
    supply_factory: SupplyFactory | None = None
    """Makes each module pair's key supply (`qkdagent.KeySupply`); None: CSPRNG at `rate_bps`."""
    clock: Callable[[], float] = time.monotonic
    v1_status_one: bool = False
    close_after_request: bool = False
    """Modules close each connection after one answer, as the ETSI reference module does."""
    rest: bool = False
    """Also serve qkd-module's REST form (plain HTTP: keys in clear), one more port per module."""
    rest_ports: Mapping[str, int] = field(default_factory=dict)


@dataclass
class Simulator:
    network: ModuleNetwork
    pki: Path
    servers: dict[str, ModuleServer] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)
    rest_servers: dict[str, RestServer] = field(default_factory=dict)
    rest_addresses: dict[str, str] = field(default_factory=dict)

    def home(self, app: str) -> str:
        for module, apps in self.network.modules.items():
            if app in apps:
                return module
        raise KeyError(app)

    def source_table(self, app: str, /, **extra: Any) -> dict[str, Any]:
        """A `[sources.<id>]` table for an agent acting as application `app`."""
        module = self.home(app)
        if extra.get("transport") == "qkd-module":
            peer = self.network.peer[module]
            address = self.rest_addresses[peer]
            rest_table: dict[str, Any] = {
                "type": "etsi004",
                "module": self.rest_addresses[module],
                "insecure": True,
                "peer_uris": {a: address for a in sorted(self.network.modules[peer])},
            }
            rest_table.update(extra)
            return rest_table
        table: dict[str, Any] = {
            "type": "etsi004",
            "module": self.addresses[module],
            "cert": str(self.pki / f"{file_stem(app)}.pem"),
            "key": str(self.pki / f"{file_stem(app)}.key"),
            "ca": str(self.pki / "ca.pem"),
            "module_id": module,
        }
        table.update(extra)
        return table

    def describe(self) -> list[dict[str, Any]]:
        """Per module what a client needs: address, dialects, module_id (the certificate's CN),
        the CA, and each application's certificate and key (what `--ready-file` holds)."""
        return [
            {
                "module_id": m,
                "address": self.addresses[m],
                "dialects": [d.value for d in Dialect],
                "keeps_connections": not self.servers[m].close_after_request,
                "peer": self.network.peer.get(m),
                "applications": sorted(self.network.modules[m]),
                "ca": str(self.pki / "ca.pem"),
                "credentials": {
                    app: {
                        "cert": str(self.pki / f"{file_stem(app)}.pem"),
                        "key": str(self.pki / f"{file_stem(app)}.key"),
                    }
                    for app in sorted(self.network.modules[m])
                },
                **({"rest_address": self.rest_addresses[m]} if m in self.rest_addresses else {}),
            }
            for m in self.servers
        ]


async def run_simulator(
    directory: Path | str,
    settings: SimSettings,
    *,
    task_status: trio.TaskStatus[Simulator] = trio.TASK_STATUS_IGNORED,
) -> None:
    # key generation, file writes and certificate loads: off the trio thread
    directory = await trio.to_thread.run_sync(make_pki, directory, settings.modules)
    network = ModuleNetwork(
        {m: list(a) for m, a in settings.modules.items()},
        settings.pairs or default_pairs(settings.modules),
        limits=settings.limits,
        rate_bps=settings.rate_bps,
        supply_factory=settings.supply_factory,
        clock=settings.clock,
    )
    sim = Simulator(network, directory)
    async with trio.open_nursery() as nursery:
        for module in settings.modules:
            stem = file_stem(module)
            context = await trio.to_thread.run_sync(
                server_ssl_context,
                directory / f"{stem}.pem",
                directory / f"{stem}.key",
                directory / "ca.pem",
            )
            server = sim.servers[module] = ModuleServer(
                network,
                module,
                context,
                settings.host,
                settings.ports.get(module, 0),
                v1_status_one=settings.v1_status_one,
                close_after_request=settings.close_after_request,
            )
            port = await nursery.start(server.run)
            host = f"[{settings.host}]" if ":" in settings.host else settings.host
            sim.addresses[module] = f"{host}:{port}"
            if settings.rest:
                rest = sim.rest_servers[module] = RestServer(
                    network,
                    module,
                    sim.rest_addresses,
                    settings.host,
                    settings.rest_ports.get(module, 0),
                )
                port = await nursery.start(rest.run)
                sim.rest_addresses[module] = f"{host}:{port}"
        task_status.started(sim)


@asynccontextmanager
async def open_simulator(
    directory: Path | str, settings: SimSettings | None = None, **overrides: Any
) -> AsyncIterator[Simulator]:
    base = settings or SimSettings()
    if overrides:
        base = SimSettings(**{**base.__dict__, **overrides})
    async with trio.open_nursery() as nursery:
        sim = await nursery.start(run_simulator, directory, base)
        try:
            yield sim
        finally:
            nursery.cancel_scope.cancel()


def open_qkdm_pair(
    directory: Path | str, alice: str = "alice", bob: str = "bob", **overrides: Any
) -> Any:
    """Two modules (QKDM_A serving `alice`, QKDM_B serving `bob`) sharing one QKD link."""
    return open_simulator(directory, modules={"QKDM_A": [alice], "QKDM_B": [bob]}, **overrides)
