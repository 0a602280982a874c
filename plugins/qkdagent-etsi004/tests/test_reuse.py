"""Connection reuse (`persistent = "auto"`, true, false) against simulated modules that keep
connections and modules that close them after each answer (the ETSI reference module's way), a
module that drops connections between requests, and one that executes a request and closes
without answering: a request is written once and never resent.

Modules that close after each answer run under trio's mock clock standing still, so "the module
closed the connection before the next request" never depends on how fast the machine is; the
re-probe interval is crossed by jumping that clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from qkdagent_etsi004 import cli, codec
from qkdagent_etsi004.network import ModuleNetwork
from qkdagent_etsi004.reuse import (
    REPROBE_AFTER,
    Learned,
    Persistence,
    ReusePolicy,
    parse_persistent,
)
from qkdagent_etsi004.server import ModuleServer, server_ssl_context
from qkdagent_etsi004.sim import SimSettings, Simulator, open_simulator
from qkdagent_etsi004.source import Etsi004Source

from qkdagent import ConfigError, SourceUnavailable
from qkdagent.testing import build_component

from .conftest import ALICE, BOB, MODULES
from .test_cli import parse

# -- the pure policy --------------------------------------------------------------------


def test_policy_auto_keeps_until_a_close_then_looks_again_after_the_interval() -> None:
    policy = ReusePolicy(Persistence.AUTO, reprobe_after=300)
    assert policy.keep(0) and policy.learned is Learned.UNKNOWN
    assert policy.saw_close(10) is True and policy.saw_close(11) is False
    assert not policy.keep(11) and not policy.keep(310.9)
    assert policy.keep(311)  # look again: the next answer's connection is kept
    assert policy.saw_reuse() is True and policy.keep(312) and policy.saw_reuse() is False


@pytest.mark.parametrize(("mode", "kept"), [(Persistence.ALWAYS, True), (Persistence.NEVER, False)])
def test_policy_explicit_modes_ignore_what_was_seen(mode: Persistence, kept: bool) -> None:
    policy = ReusePolicy(mode)
    policy.saw_close(0)
    assert policy.keep(1) is kept and policy.learned is Learned.CLOSES
    policy.saw_reuse()
    assert policy.keep(2) is kept


BAD_VALUES: list[object] = ["yes", "Auto", 1, 0, None, []]


@pytest.mark.parametrize(
    ("value", "mode"),
    [(True, Persistence.ALWAYS), (False, Persistence.NEVER), ("auto", Persistence.AUTO)]
    + [(v, None) for v in BAD_VALUES],
)
def test_the_persistent_option(value: object, mode: Persistence | None) -> None:
    assert parse_persistent(value) is mode


def test_persistent_defaults_and_bad_values(tmp_path: Path) -> None:
    table = {"module": "127.0.0.1:1", "cert": "c", "key": "k", "ca": "a"}

    def built(**extra: Any) -> Etsi004Source:
        return build_component(
            Etsi004Source, {**table, **extra}, links=(ALICE,), agent="alice", state_dir=tmp_path
        )

    assert built().reuse.mode is Persistence.AUTO
    assert built(transport="binary-v1").reuse.mode is Persistence.ALWAYS
    assert built(transport="binary-v1", persistent="auto").reuse.mode is Persistence.AUTO
    with pytest.raises(ConfigError, match="persistent"):
        built(persistent="sometimes")


def test_the_simulator_flag_and_its_ready_file_entry() -> None:
    assert cli.settings_from(parse("--close-after-request")).close_after_request is True
    assert cli.settings_from(parse()).close_after_request is False


# -- against the simulator ----------------------------------------------------------------


@asynccontextmanager
async def simulator(pki: Path, *, closes: bool) -> AsyncIterator[Simulator]:
    settings = SimSettings(modules=MODULES, close_after_request=closes)
    async with open_simulator(pki, settings) as sim:
        assert all(m["keeps_connections"] is not closes for m in sim.describe())
        yield sim


async def prepared(
    sim: Simulator, tmp_path: Path, app: str, transport: str, **options: Any
) -> Etsi004Source:
    table = sim.source_table(app, transport=transport, **options)
    link = ALICE if app == "alice" else BOB
    source = build_component(
        Etsi004Source, table, name="qkd", links=(link,), agent=app, state_dir=tmp_path
    )
    await source.prepare()
    return source


async def rotate(sim: Simulator, alice: Etsi004Source, bob: Etsi004Source, n: int) -> None:
    """`n` keys from alice, each read by bob: the same bytes on both sides."""
    for _ in range(n):
        key = await alice.new_key(ALICE)
        assert (await bob.key_by_id(BOB, key.key_id)).value == key.value


@pytest.mark.parametrize("persistent", ["auto", True, False])
async def test_module_that_keeps_connections(
    pki: Path, tmp_path: Path, transport: str, persistent: Any
) -> None:
    async with simulator(pki, closes=False) as sim:
        alice = await prepared(sim, tmp_path, "alice", transport, persistent=persistent)
        bob = await prepared(sim, tmp_path, "bob", transport, persistent=persistent)
        try:
            a, b = sim.servers["QKDM_A"], sim.servers["QKDM_B"]
            before = (a.accepted, b.accepted)
            await rotate(sim, alice, bob, 5)
            # alice: OPEN_CONNECT + 5 GET_KEY; bob: 5 x (OPEN_CONNECT once, GET_KEY)
            connections = (a.accepted - before[0], b.accepted - before[1])
            assert connections == ((1, 1) if persistent is not False else (6, 6))
            assert alice.module_keeps_connections is (None if persistent is False else True)
            assert sim.network.stats["get_key"] == 10  # nothing sent twice
        finally:
            await alice.aclose()
            await bob.aclose()


@pytest.mark.parametrize("persistent", ["auto", True, False])
async def test_module_that_closes_after_each_request(
    pki: Path, tmp_path: Path, transport: str, persistent: Any, mock_clock: Any
) -> None:
    """Every request reaches the module on its own connection and is answered: a closed kept
    connection is found out and replaced before anything is written to it."""
    async with simulator(pki, closes=True) as sim:
        alice = await prepared(sim, tmp_path, "alice", transport, persistent=persistent)
        bob = await prepared(sim, tmp_path, "bob", transport, persistent=persistent)
        try:
            a = sim.servers["QKDM_A"]
            before = a.accepted
            await rotate(sim, alice, bob, 5)
            assert a.accepted - before == 6
            assert sim.network.stats["get_key"] == 10
            assert sim.network.stats["open"] == 2  # bob's stream opened once, as alice's
            assert alice.module_keeps_connections is (None if persistent is False else False)
            # auto has stopped keeping connections (the module's would only be closed again)
            assert alice.reuse.keep(trio.current_time()) is (persistent is True)
            assert (alice._conn is None) is (persistent is not True)
        finally:
            await alice.aclose()
            await bob.aclose()


async def test_auto_looks_again_after_the_interval(
    pki: Path, tmp_path: Path, mock_clock: Any
) -> None:
    async with simulator(pki, closes=True) as sim:
        alice = await prepared(sim, tmp_path, "alice", "binary-v2")
        try:
            await alice.new_key(ALICE)
            assert alice.module_keeps_connections is False and alice._conn is None
            await alice.new_key(ALICE)
            assert alice._conn is None  # a connection per request: not kept
            mock_clock.jump(REPROBE_AFTER)
            await alice.new_key(ALICE)
            assert alice._conn is not None  # kept to look again
            before = sim.network.stats["get_key"]
            await alice.new_key(ALICE)  # found closed before writing: no failed attempt
            assert sim.network.stats["get_key"] == before + 1
            assert alice._conn is None and alice.module_keeps_connections is False
        finally:
            await alice.aclose()


async def test_module_closing_between_requests(
    pki: Path, tmp_path: Path, transport: str, mock_clock: Any
) -> None:
    """A module that keeps connections drops them (an idle timeout, say) between two requests:
    no failed attempt; auto takes a connection per request for a while, then keeps one again."""
    mock_clock.rate = 1.0  # real time passes (the wait for a close ends), jumps on top
    async with simulator(pki, closes=False) as sim:
        alice = await prepared(sim, tmp_path, "alice", transport, persistent="auto")
        bob = await prepared(sim, tmp_path, "bob", transport, persistent="auto")
        try:
            await rotate(sim, alice, bob, 2)
            assert alice.module_keeps_connections is True
            a = sim.servers["QKDM_A"]
            a.disconnect()
            await trio.testing.wait_all_tasks_blocked()  # the module's side is closed
            before, gets = a.accepted, sim.network.stats["get_key"]
            await rotate(sim, alice, bob, 2)
            assert sim.network.stats["get_key"] == gets + 4
            assert a.accepted - before == 2 and alice.module_keeps_connections is False
            mock_clock.jump(REPROBE_AFTER)
            before = a.accepted
            await rotate(sim, alice, bob, 3)
            assert a.accepted - before == 1 and alice.module_keeps_connections is True
        finally:
            await alice.aclose()
            await bob.aclose()


# -- a module that executes a request and closes without answering ----------------------


class Swallower(ModuleServer):
    """Executes every request; while `swallow`, closes the connection instead of answering
    a GET_KEY (the answer is lost: the module's state has changed, the client cannot know)."""

    swallow = False

    async def _answer(self, dialect: Any, app: str, request: codec.Message) -> codec.Message:
        answer = await super()._answer(dialect, app, request)
        if self.swallow and isinstance(request, codec.GetKeyRequest):
            raise trio.BrokenResourceError  # ends the connection without an answer
        return answer


@pytest.fixture
async def swallower(pki: Path) -> AsyncIterator[tuple[Swallower, str]]:
    network = ModuleNetwork({"QKDM_A": ["alice"], "QKDM_B": ["bob"]}, [("QKDM_A", "QKDM_B")])
    context = server_ssl_context(pki / "QKDM_A.pem", pki / "QKDM_A.key", pki / "ca.pem")
    server = Swallower(network, "QKDM_A", context)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run)
        yield server, f"127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("persistent", ["auto", True, False])
async def test_a_request_the_module_may_have_executed_is_not_resent(
    swallower: tuple[Swallower, str],
    pki: Path,
    tmp_path: Path,
    transport: str,
    persistent: Any,
) -> None:
    server, address = swallower
    table = {
        "module": address,
        "cert": str(pki / "alice.pem"),
        "key": str(pki / "alice.key"),
        "ca": str(pki / "ca.pem"),
        "module_id": "QKDM_A",
        "transport": transport,
        "persistent": persistent,
    }
    alice = build_component(Etsi004Source, table, links=(ALICE,), agent="alice", state_dir=tmp_path)
    await alice.prepare()
    stats = server.network.stats
    try:
        for _ in range(2):
            await alice.new_key(ALICE)
        server.swallow = True
        gets, connections = stats["get_key"], server.accepted
        with pytest.raises(SourceUnavailable, match="without answering"):
            await alice.new_key(ALICE)
        assert stats["get_key"] == gets + 1  # executed once, never sent again
        assert server.accepted - connections == (0 if persistent is not False else 1)
        server.swallow = False
        key = await alice.new_key(ALICE)
        assert key.key_id.endswith(":3")  # index 2 may have been executed: never asked again
        assert stats["get_key"] == gets + 2
    finally:
        await alice.aclose()


async def test_a_responder_request_the_module_may_have_executed_is_not_resent(
    swallower: tuple[Swallower, str], pki: Path, tmp_path: Path
) -> None:
    server, address = swallower
    table = {
        "module": address,
        "cert": str(pki / "bob.pem"),
        "key": str(pki / "bob.key"),
        "ca": str(pki / "ca.pem"),
    }
    # bob's application is served by this module here (the swallower checks no placement)
    server.network.modules["QKDM_A"].add("bob")
    bob = build_component(Etsi004Source, table, links=(BOB,), agent="bob", state_dir=tmp_path)
    await bob.prepare()
    try:
        server.swallow = True
        ksid = bytes(range(1, 17))
        with pytest.raises(SourceUnavailable, match="without answering"):
            await bob.key_by_id(BOB, codec.key_id(ksid, 0))
        assert server.network.stats["get_key"] == 1
    finally:
        await bob.aclose()
