"""The core's contract suites against this plugin's source and sink.

The suites build each component from its config table (as the agent does), prepare it, start
its `run()` task, and after each test cancel the task and close it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from qkdagent import Link
from qkdagent.testing import SinkContract, SourceContract

from qkdagent_example import FileSink, SharedDirSource

Provision = Callable[..., list[Path]]
"""The `provision` fixture (conftest.py): `provision(count)` -> alice's and bob's key dirs."""


class TestSharedDirSource(SourceContract):
    source_class = SharedDirSource

    @pytest.fixture
    def directories(self, provision: Provision) -> list[Path]:
        return provision(40)

    @pytest.fixture
    def source_options(self, directories: list[Path]) -> dict[str, Any]:
        return {"directory": str(directories[0]), "low_water": 0}

    @pytest.fixture
    def responder_options(self, directories: list[Path]) -> dict[str, Any]:
        return {"directory": str(directories[1]), "low_water": 0}


class TestFileSink(SinkContract):
    sink_class = FileSink

    @pytest.fixture
    def sink_options(self, tmp_path: Path) -> dict[str, Any]:
        return {"path": str(tmp_path / "{peer}.psk")}

    @pytest.fixture
    def read_back(self, tmp_path: Path) -> Any:
        async def read(link: Link) -> bytes | None:
            path = tmp_path / f"{link.peer}.psk"
            return bytes.fromhex(path.read_text()) if path.exists() else None

        return read
