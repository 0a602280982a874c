"""Fixtures: two simulated QKD modules on loopback and sources wired to them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from qkdagent_etsi004.sim import SimSettings, Simulator, make_pki, open_simulator
from qkdagent_etsi004.source import Etsi004Source

from qkdagent import Link
from qkdagent.testing import build_component
from qkdagent.testing.pytest_plugin import install_logging_guard

MODULES = {"QKDM_A": ["alice", "eve"], "QKDM_B": ["bob"]}
ALICE = Link("l", "alice", "bob", True)
BOB = Link("l", "bob", "alice", False)


def pytest_configure(config: pytest.Config) -> None:
    install_logging_guard(config)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("qkdm-pki"), {**MODULES, "QKDM_X": ["mallory"]})


@pytest.fixture
def settings() -> SimSettings:
    return SimSettings(modules=MODULES)


@pytest.fixture
async def sim(pki: Path, settings: SimSettings) -> AsyncIterator[Simulator]:
    async with open_simulator(pki, settings) as running:
        yield running


@pytest.fixture(params=["binary-v2", "binary-v1"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def sources(sim: Simulator, tmp_path: Path, transport: str) -> AsyncIterator[Any]:
    """`await sources(app, **options)` -> a prepared source in the test's dialect."""
    made: list[Etsi004Source] = []

    async def factory(app: str, *, prepare: bool = True, **options: Any) -> Etsi004Source:
        table = sim.source_table(app, transport=transport, **options)
        link = ALICE if app == "alice" else BOB
        source = build_component(
            Etsi004Source, table, name="qkd", links=(link,), agent=app, state_dir=tmp_path
        )
        made.append(source)
        if prepare:
            await source.prepare()
        return source

    try:
        yield factory
    finally:
        for source in made:
            await source.aclose()
