"""How many connections the source opens to its KME: a burst of key calls waits for the
`max_connections` it may hold, kept alive, rather than opening (and, past the idle pool,
closing) one per call: each a TLS handshake, and a KME may count its clients' connections
(issue 18). A call's deadline starts once it has its connection."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from qkdagent_etsi014.app import Quirks
from qkdagent_etsi014.sim import SimSettings, Simulator, open_simulator

from qkdagent import ConfigError, HttpClient, Link

from .conftest import KMES, make_source


async def _burst(sim: Simulator, tmp_path: Path, calls: int, **options: object) -> HttpClient:
    """`calls` Get key calls at once (one per link, all to SAE bob), each a request of its own
    (`max_keys_per_call = 1`, unless given); the source's client."""
    links = tuple(Link(f"l{i}", "alice", "bob", True) for i in range(calls))
    options.setdefault("max_keys_per_call", 1)
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
    assert client.connections_made == 2  # prepare's Get status's, and one more
    assert sim.apps["KME_A"].stats["keys"] == 16


async def test_by_default_sixteen_connections_at_most(sim: Simulator, tmp_path: Path) -> None:
    client = await _burst(sim, tmp_path, 24)
    assert client.max_per_origin == client.max_idle == 16
    assert client.timeout is None  # each call bounds itself: no backstop ends one sent
    assert client.connections_made == 16


async def test_calls_that_wait_behind_a_slow_kme_still_get_their_keys(
    pki: Path, tmp_path: Path
) -> None:
    """A KME answering each call after 0.3 s, one connection allowed, four calls at once:
    the last waits 0.9 s, past the 0.7 s its exchange may take and past `request_timeout`
    (0.5 s) of waiting. The exchange's deadline starts once it has the connection, and a
    wait too long is a refused connect (nothing sent), retried: every call gets its key, and
    the KME hands out no key that is lost (the reviewer's burst of 64 against a 1.1 s KME
    lost 8 of them while the deadline counted the wait)."""
    settings = SimSettings(kmes=KMES, rate_bps=0.0, quirks=Quirks(delay=0.3))
    async with open_simulator(pki, settings) as sim:
        client = await _burst(
            sim, tmp_path, 4, max_connections=1, connect_timeout=0.2, request_timeout=0.5
        )
        assert client.connections_made == 1
        assert sim.apps["KME_A"].stats["keys"] == 4


@pytest.mark.parametrize("value", [0, 257, "8", 1.5])
async def test_max_connections_is_checked(sim: Simulator, tmp_path: Path, value: object) -> None:
    with pytest.raises(ConfigError, match="max_connections"):
        make_source(sim, "alice", tmp_path, max_connections=value)
