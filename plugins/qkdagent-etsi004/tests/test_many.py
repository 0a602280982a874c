"""Many applications at once on one module pair: each pair of applications gets its own key
stream, streams are kept apart, and no index (so no key) is handed out twice, also to concurrent
callers of one source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from qkdagent_etsi004 import codec
from qkdagent_etsi004.sim import Simulator, open_simulator
from qkdagent_etsi004.source import Etsi004Source

from qkdagent import Key, Link, Misconfigured
from qkdagent.testing import build_component

from .conftest import ALICE, BOB

PAIRS = 50
"""100 applications, 50 on each module."""
KEYS = 3


@pytest.fixture(scope="module")
def crowd_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("crowd-pki")


def crowd_modules() -> dict[str, list[str]]:
    return {
        "QKDM_A": [f"a{i}" for i in range(PAIRS)],
        "QKDM_B": [f"b{i}" for i in range(PAIRS)],
    }


def source(sim: Simulator, app: str, link: Link, tmp_path: Path, **extra: Any) -> Etsi004Source:
    table = sim.source_table(app, **extra)
    return build_component(
        Etsi004Source, table, name="qkd", links=(link,), agent=app, state_dir=tmp_path
    )


async def test_a_hundred_applications_get_streams_of_their_own(
    crowd_pki: Path, tmp_path: Path, transport: str
) -> None:
    got: dict[int, tuple[list[Key], list[Key]]] = {}
    made: list[Etsi004Source] = []
    responders: dict[int, Etsi004Source] = {}  # by pair: the tasks start in any order
    async with open_simulator(crowd_pki, modules=crowd_modules()) as sim:
        try:

            async def pair(i: int) -> None:
                a, b = f"a{i}", f"b{i}"
                to_b, to_a = Link("l", a, b, True), Link("l", b, a, False)
                initiator = source(sim, a, to_b, tmp_path, transport=transport, persistent=True)
                responder = source(sim, b, to_a, tmp_path, transport=transport, persistent=True)
                made.extend((initiator, responder))
                responders[i] = responder
                sent = [await initiator.new_key(to_b) for _ in range(KEYS)]
                read = [await responder.key_by_id(to_a, k.key_id) for k in reversed(sent)]
                got[i] = (sent, read[::-1])

            async with trio.open_nursery() as nursery:  # every pair at once
                for i in range(PAIRS):
                    nursery.start_soon(pair, i)
            # a responder cannot read another pair's stream: its KSID is held on its module
            stranger = Link("l", "b1", "a1", False)
            with pytest.raises(Misconfigured, match="status 5"):
                await responders[1].key_by_id(stranger, got[0][0][0].key_id)
            streams = {ksid: dict(s.apps) for ksid, s in sim.network.streams.items()}
            assert sum(server.accepted for server in sim.servers.values()) >= 2 * PAIRS
        finally:
            for made_source in made:
                await made_source.aclose()
    ksids = set()
    values = set()
    for i, (sent, read) in got.items():
        ids = [codec.parse_key_id(k.key_id) for k in sent]
        assert all(parsed is not None for parsed in ids)
        stream_ids = {parsed[0] for parsed in ids if parsed is not None}
        assert len(stream_ids) == 1, "one stream per application pair"
        ksid = stream_ids.pop()
        assert streams[ksid] == {"QKDM_A": f"a{i}", "QKDM_B": f"b{i}"}
        ksids.add(ksid)
        assert [parsed[1] for parsed in ids if parsed is not None] == list(range(KEYS))
        assert [k.value for k in read] == [k.value for k in sent]
        values.update(k.value.reveal() for k in sent)
    assert len(got) == PAIRS and len(ksids) == PAIRS
    assert len(values) == PAIRS * KEYS, "no key handed to two streams or two indices"


async def test_concurrent_calls_never_share_an_index(
    sim: Simulator, sources: Any, transport: str
) -> None:
    """64 rotations' worth of new_key at once on one source: one OPEN_CONNECT, 64 indices."""
    alice = await sources("alice", persistent=True)
    keys: list[Key] = []

    async def one() -> None:
        keys.append(await alice.new_key(ALICE))

    async with trio.open_nursery() as nursery:
        for _ in range(64):
            nursery.start_soon(one)
    parsed = [codec.parse_key_id(k.key_id) for k in keys]
    assert sorted(p[1] for p in parsed if p is not None) == list(range(64))
    assert len({p[0] for p in parsed if p is not None}) == 1
    assert sim.network.stats["open"] == 1
    assert len({k.value.reveal() for k in keys}) == 64
    bob = await sources("bob", persistent=True)
    for key in keys:
        assert (await bob.key_by_id(BOB, key.key_id)).value == key.value
