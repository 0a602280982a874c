"""The core's SourceContract, run against the `etsi014` source and two simulated KMEs."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from qkdagent_etsi014.source import Etsi014Source

from qkdagent.testing import SourceContract

# unknown IDs are retried (the peer's KME may lag); keep that short in the contract run
FAST = {"not_found_retries": 2, "retry_backoff": 0.01}


class TestEtsi014Source(SourceContract):
    @pytest.fixture
    async def source_pair(self, sources) -> AsyncIterator[tuple[Etsi014Source, Etsi014Source]]:
        # the contract's links are alice (initiator) <-> bob (responder); SAE IDs = agent names
        alice = await sources("alice", peer_sae_ids={"bob": "bob"}, **FAST)
        bob = await sources("bob", peer_sae_ids={"alice": "alice"}, **FAST)
        yield alice, bob


class TestEtsi014SourceGetOnly(SourceContract):
    """The same contract against a KME that offers only GET (source falls back by itself)."""

    @pytest.fixture
    def settings(self):
        from qkdagent_etsi014.app import Quirks
        from qkdagent_etsi014.sim import SimSettings

        from .conftest import KMES

        return SimSettings(kmes=KMES, rate_bps=0.0, quirks=Quirks(only_method="GET"))

    @pytest.fixture
    async def source_pair(self, sources) -> AsyncIterator[tuple[Etsi014Source, Etsi014Source]]:
        yield await sources("alice", **FAST), await sources("bob", **FAST)
