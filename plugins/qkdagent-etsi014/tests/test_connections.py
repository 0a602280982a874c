"""How many connections the source opens to its KME: a burst of key calls waits for the
`max_connections` it may hold, kept alive, rather than opening (and, past the idle pool,
closing) one per call: each a TLS handshake, and a KME may count its clients' connections
(issue 18)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from qkdagent_etsi014.sim import Simulator

from qkdagent import ConfigError, HttpClient, Link

from .conftest import make_source


async def _burst(sim: Simulator, tmp_path: Path, calls: int, **options: object) -> HttpClient:
    """`calls` Get key calls at once (one per link, all to SAE bob); the source's client."""
    links = tuple(Link(f"l{i}", "alice", "bob", True) for i in range(calls))
    source = make_source(sim, "alice", tmp_path, links=links, **options)
    await source.prepare()
    try:
        keys = []

        async def one(link: Link) -> None:
            keys.append(await source.new_key(link))

        async with trio.open_nursery() as nursery:
            for link in links:
                nursery.start_soon(one, link)
        assert len({key.key_id for key in keys}) == calls  # every call got its own key
        client = source._client
        assert isinstance(client, HttpClient)
        return client
    finally:
        await source.aclose()


async def test_a_burst_of_key_calls_shares_the_connections_allowed(
    sim: Simulator, tmp_path: Path
) -> None:
    client = await _burst(sim, tmp_path, 16, max_connections=2)
    assert 1 <= client.connections_made <= 2  # (prepare's Get status opened the first)
    assert sim.apps["KME_A"].stats["keys"] == 16


async def test_by_default_eight_connections_at_most(sim: Simulator, tmp_path: Path) -> None:
    client = await _burst(sim, tmp_path, 24)
    assert client.max_per_origin == client.max_idle == 8
    assert 1 <= client.connections_made <= 8


@pytest.mark.parametrize("value", [0, 257, "8", 1.5])
async def test_max_connections_is_checked(sim: Simulator, tmp_path: Path, value: object) -> None:
    with pytest.raises(ConfigError, match="max_connections"):
        make_source(sim, "alice", tmp_path, max_connections=value)
