"""The core's SourceContract against the `etsi004` source and two simulated modules, per dialect."""

from __future__ import annotations

from typing import Any

import pytest
from qkdagent_etsi004.sim import Simulator
from qkdagent_etsi004.source import Etsi004Source

from qkdagent.testing import SourceContract


class TestEtsi004Source(SourceContract):
    source_class = Etsi004Source

    @pytest.fixture
    def source_options(self, sim: Simulator, transport: str) -> dict[str, Any]:
        return sim.source_table("alice", transport=transport)

    @pytest.fixture
    def responder_options(self, sim: Simulator, transport: str) -> dict[str, Any]:
        return sim.source_table("bob", transport=transport)
