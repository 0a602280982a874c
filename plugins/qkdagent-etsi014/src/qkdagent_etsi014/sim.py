"""A network of simulated KMEs, ready to use in-process (tests, demo) or from `qkdagent kme-sim`.

    async with open_kme_pair(tmp_path) as sim:          # KME_A serves alice, KME_B serves bob
        table = sim.source_table("alice")                # a [sources.*] table for agent alice
        sim.network.link("KME_A", "KME_B").drain()       # provoke 503

Certificates come from `make_pki` (a throw-away CA, one certificate per KME and per SAE with
CN = the ID and SANs localhost/127.0.0.1/::1) unless `pki` names a directory that already has a
CA: then names it has no certificate for get one from that CA (`qkdagent.extend_test_pki`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from qkdagent import SupplyFactory, extend_test_pki, file_stem, write_test_pki

from .app import DEFAULT_MAX_BODY, KmeApp, Quirks
from .identity import IdentityRule
from .network import KmeNetwork, Limits
from .server import KmeServer, server_ssl_context

log = logging.getLogger(__name__)

DEFAULT_KMES: dict[str, list[str]] = {"KME_A": ["alice"], "KME_B": ["bob"]}


@dataclass(frozen=True)
class Credentials:
    """Certificate, key and CA files of one SAE or KME, and the URL of the KME it talks to."""

    name: str
    cert: Path
    key: Path
    ca: Path
    kme_id: str
    kme_url: str = ""

    def source_table(self, **extra: Any) -> dict[str, Any]:
        """A `[sources.<id>]` table for an agent acting as this SAE."""
        table: dict[str, Any] = {
            "type": "etsi014",
            "kme_url": self.kme_url,
            "cert": str(self.cert),
            "key": str(self.key),
            "ca": str(self.ca),
            "sae_id": self.name,
            "kme_id": self.kme_id,
        }
        table.update(extra)
        return table


def make_pki(directory: Path | str, kmes: Mapping[str, list[str]] = DEFAULT_KMES) -> Path:
    """Write a throw-away CA plus one certificate per KME and per SAE into `directory`."""
    directory = Path(directory)
    names = [*kmes, *(sae for saes in kmes.values() for sae in saes)]
    write_test_pki(directory, names, ca_name="qkdagent kme-sim test CA")
    return directory


def pki_files(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{file_stem(name)}.pem", directory / f"{file_stem(name)}.key"
    if not cert.is_file() or not key.is_file():
        raise FileNotFoundError(f"no certificate/key for {name!r} in {directory}")
    return cert, key


@dataclass
class Simulator:
    """Running KMEs: their network (keys, links), apps (stats), servers and URLs."""

    network: KmeNetwork
    apps: dict[str, KmeApp]
    pki: Path
    urls: dict[str, str] = field(default_factory=dict)
    servers: dict[str, KmeServer] = field(default_factory=dict)
    """Per KME: its server (`accepted` counts TLS connections, to check keep-alive)."""

    def credentials(self, sae_id: str) -> Credentials:
        kme_id = self.network.home[sae_id]
        cert, key = pki_files(self.pki, sae_id)
        return Credentials(sae_id, cert, key, self.pki / "ca.pem", kme_id, self.urls[kme_id])

    def source_table(self, sae_id: str, /, **extra: Any) -> dict[str, Any]:
        return self.credentials(sae_id).source_table(**extra)

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"kme_id": k, "url": self.urls[k], "saes": sorted(self.network.kmes[k].saes)}
            for k in self.apps
        ]


@dataclass(frozen=True)
class SimSettings:
    """Everything `open_simulator` needs besides the directory (CLI and demo build one)."""

    kmes: Mapping[str, list[str]] = field(default_factory=lambda: dict(DEFAULT_KMES))
    host: str = "127.0.0.1"
    ports: Mapping[str, int] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    rate_bps: float = 1_000_000.0
    initial_fill: float = 1.0
    sync_delay: float = 0.0
    identity: IdentityRule = field(default_factory=IdentityRule)
    quirks: Quirks = field(default_factory=Quirks)
    max_body: int = DEFAULT_MAX_BODY
    clock: Callable[[], float] = time.monotonic
    supply_factory: SupplyFactory | None = None
    """Makes each link's key supply, `(kme_a, kme_b) -> KeySupply` (e.g. a BB84 engine); None:
    the CSPRNG supply of `rate_bps`, `initial_fill`."""


async def run_simulator(
    directory: Path | str,
    settings: SimSettings,
    *,
    task_status: trio.TaskStatus[Simulator] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve every KME until cancelled; `task_status.started(sim)` once all ports are bound."""
    directory = Path(directory)
    if not (directory / "ca.pem").is_file():
        make_pki(directory, settings.kmes)
    else:  # names this directory was not made for get certificates from its CA
        names = [*settings.kmes, *(sae for saes in settings.kmes.values() for sae in saes)]
        for name in extend_test_pki(directory, names):
            log.info("kme-sim: issued a certificate for %s in %s", name, directory)
    network = KmeNetwork(
        {k: list(v) for k, v in settings.kmes.items()},
        limits=settings.limits,
        rate_bps=settings.rate_bps,
        initial_fill=settings.initial_fill,
        sync_delay=settings.sync_delay,
        supply_factory=settings.supply_factory,
        clock=settings.clock,
    )
    sim = Simulator(network, {}, directory)
    async with trio.open_nursery() as nursery:
        for kme_id in settings.kmes:
            cert, key = pki_files(directory, kme_id)
            app = sim.apps[kme_id] = KmeApp(
                network, kme_id, max_body=settings.max_body, quirks=settings.quirks
            )
            server = sim.servers[kme_id] = KmeServer(
                app,
                server_ssl_context(cert, key, directory / "ca.pem"),
                settings.identity,
                settings.host,
                settings.ports.get(kme_id, 0),
            )
            port = await nursery.start(server.run)
            host = f"[{settings.host}]" if ":" in settings.host else settings.host
            sim.urls[kme_id] = f"https://{host}:{port}"
        task_status.started(sim)


@asynccontextmanager
async def open_simulator(
    directory: Path | str, settings: SimSettings | None = None, **overrides: Any
) -> AsyncIterator[Simulator]:
    """Run simulated KMEs for the duration of the block (keyword arguments override settings)."""
    base = settings or SimSettings()
    if overrides:
        base = SimSettings(**{**base.__dict__, **overrides})
    async with trio.open_nursery() as nursery:
        sim = await nursery.start(run_simulator, directory, base)
        try:
            yield sim
        finally:
            nursery.cancel_scope.cancel()


def open_kme_pair(
    directory: Path | str, alice: str = "alice", bob: str = "bob", **overrides: Any
) -> Any:
    """Two KMEs (KME_A serving SAE `alice`, KME_B serving SAE `bob`) sharing one QKD link."""
    return open_simulator(directory, kmes={"KME_A": [alice], "KME_B": [bob]}, **overrides)
