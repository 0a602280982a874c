"""The core's SourceContract, run against the `etsi014` source and two simulated KMEs."""

from __future__ import annotations

from typing import Any

import pytest
from qkdagent_etsi014.sim import Simulator
from qkdagent_etsi014.source import Etsi014Source

from qkdagent.testing import SourceContract

# unknown IDs are retried (the peer's KME may lag); keep that short in the contract run
FAST = {"not_found_retries": 2, "retry_backoff": 0.01}


class TestEtsi014Source(SourceContract):
    """alice (initiator) <-> bob (responder), SAE IDs = agent names, named explicitly."""

    source_class = Etsi014Source

    @pytest.fixture
    def source_options(self, sim: Simulator) -> dict[str, Any]:
        return sim.source_table("alice", peer_sae_ids={"bob": "bob"}, **FAST)

    @pytest.fixture
    def responder_options(self, sim: Simulator) -> dict[str, Any]:
        return sim.source_table("bob", peer_sae_ids={"alice": "alice"}, **FAST)


class TestEtsi014SourceGetOnly(SourceContract):
    """The same contract against a KME that offers only GET (source falls back by itself)."""

    source_class = Etsi014Source

    @pytest.fixture
    def settings(self):
        from qkdagent_etsi014.app import Quirks
        from qkdagent_etsi014.sim import SimSettings

        from .conftest import KMES

        return SimSettings(kmes=KMES, rate_bps=0.0, quirks=Quirks(only_method="GET"))

    @pytest.fixture
    def source_options(self, sim: Simulator) -> dict[str, Any]:
        return sim.source_table("alice", **FAST)

    @pytest.fixture
    def responder_options(self, sim: Simulator) -> dict[str, Any]:
        return sim.source_table("bob", **FAST)
