"""Opt-in pytest fixtures for qkdagent and plugin tests.

Enable with `pytest_plugins = ["qkdagent.testing.pytest_plugin"]` in a conftest.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from .agents import AgentPair, open_agent_pair


@pytest.fixture
def agent_pair_factory(tmp_path: Path) -> Callable[..., AbstractAsyncContextManager[AgentPair]]:
    """`async with agent_pair_factory(alice={...}, bob={...}, link={...}) as pair:`"""

    def factory(**kwargs: Any) -> AbstractAsyncContextManager[AgentPair]:
        return open_agent_pair(tmp_path / "pair", **kwargs)

    return factory


@pytest.fixture
async def agent_pair(tmp_path: Path) -> AsyncIterator[AgentPair]:
    """alice and bob over loopback mTLS, a simulated link, a `recording` sink "rec" each."""
    sides = {"sinks": {"rec": {"type": "recording"}}}
    async with open_agent_pair(tmp_path / "pair", alice=sides, bob=sides) as pair:
        yield pair
