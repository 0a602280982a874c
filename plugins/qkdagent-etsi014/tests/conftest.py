"""Fixtures: simulated KMEs on loopback, mTLS clients for them, and sources wired to them."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from qkdagent_etsi014.sim import SimSettings, Simulator, make_pki, open_simulator
from qkdagent_etsi014.source import Etsi014Source

from qkdagent import Link
from qkdagent.testing import build_component
from qkdagent.testing.pytest_plugin import install_logging_guard


def pytest_configure(config: pytest.Config) -> None:
    """Also when this directory runs alone (a conftest below the root cannot use
    `pytest_plugins`): no test leaves a logging handler on a closed stream."""
    install_logging_guard(config)


# KME_A serves alice and eve, KME_B serves bob and dave, KME_C serves carol; mallory has a
# certificate from the same CA but is attached to no KME.
KMES = {"KME_A": ["alice", "eve"], "KME_B": ["bob", "dave"], "KME_C": ["carol"]}


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("kme-pki")
    make_pki(directory, {**KMES, "KME_X": ["mallory"]})
    return directory


@pytest.fixture
def settings() -> SimSettings:
    """Override in a test module to change the simulator; links do not refill (rate 0), so key
    counts are exact."""
    return SimSettings(kmes=KMES, rate_bps=0.0)


@pytest.fixture
async def sim(pki: Path, settings: SimSettings) -> AsyncIterator[Simulator]:
    async with open_simulator(pki, settings) as running:
        yield running


def tls_context(pki: Path, name: str | None, *, ca: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca or pki / "ca.pem"))
    if name is not None:
        context.load_cert_chain(str(pki / f"{name}.pem"), str(pki / f"{name}.key"))
    return context


class Clients:
    """`clients[sae, kme]` is an httpx client authenticated as SAE `sae` towards KME `kme`."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self._open: dict[tuple[str, str], httpx.AsyncClient] = {}

    def __getitem__(self, key: tuple[str, str]) -> httpx.AsyncClient:
        if key not in self._open:
            sae, kme = key
            self._open[key] = httpx.AsyncClient(
                base_url=self.sim.urls[kme], verify=tls_context(self.sim.pki, sae), trust_env=False
            )
        return self._open[key]

    def home(self, sae: str) -> httpx.AsyncClient:
        return self[sae, self.sim.network.home[sae]]

    async def aclose(self) -> None:
        for client in self._open.values():
            await client.aclose()


@pytest.fixture
async def clients(sim: Simulator) -> AsyncIterator[Clients]:
    opened = Clients(sim)
    try:
        yield opened
    finally:
        await opened.aclose()


def make_source(
    sim: Simulator,
    sae: str,
    state_dir: Path,
    name: str = "qkd",
    links: tuple[Link, ...] = (),
    **options: Any,
) -> Etsi014Source:
    """SAE `sae`'s source, built from the simulator's table as the agent builds it."""
    return build_component(
        Etsi014Source,
        sim.source_table(sae, **options),
        name=name,
        links=links,
        agent=sae,
        state_dir=state_dir,
    )


@pytest.fixture
async def sources(sim: Simulator, tmp_path: Path) -> AsyncIterator[Any]:
    """`await sources(sae, **options)` -> a prepared source, closed after the test; `links` are
    set on it before prepare(), as the agent does."""
    made: list[Etsi014Source] = []

    async def factory(
        sae: str, *, prepare: bool = True, links: tuple[Link, ...] = (), **options: Any
    ) -> Etsi014Source:
        source = make_source(sim, sae, tmp_path, links=links, **options)
        made.append(source)
        if prepare:
            await source.prepare()
        return source

    try:
        yield factory
    finally:
        for source in made:
            await source.aclose()
