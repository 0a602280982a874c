"""The core's source contract suite against the `dske` source and three of our hubs (k = 2)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from qkdagent_dske.source import DskeSource

from qkdagent.testing import SourceContract

from .hubs import hub_table, open_hubs


class TestDskeSource(SourceContract):
    source_class = DskeSource

    @pytest.fixture
    async def hubs(self, tmp_path: Path) -> AsyncIterator[tuple[Any, Any]]:
        async with open_hubs(tmp_path / "dske", ["hank", "helen", "hilary"]) as running:
            yield running

    @pytest.fixture
    def source_options(self, hubs: tuple[Any, Any]) -> dict[str, Any]:
        pki, running = hubs
        return {"hubs": hub_table(pki, running, "alice"), "k": 2, "psrd_block_size": 8192}

    @pytest.fixture
    def responder_options(self, hubs: tuple[Any, Any]) -> dict[str, Any]:
        pki, running = hubs
        return {"hubs": hub_table(pki, running, "bob"), "k": 2, "psrd_block_size": 8192}
