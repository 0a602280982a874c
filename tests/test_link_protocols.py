"""Links run by a plugin's peer protocol (DESIGN v2 §3, `qkdagent_register_link_protocols`).

A small test protocol, `lockstep`, passes key IDs between two in-process agents over trio
channels and chains each secret on the last (its state). The tests check what the core keeps
for such a link: durable commit before install, key IDs used once, the expiry erase, restarts
of a failing protocol, state across a restart, a fresh chain when the protocol changes, the
`insecure` opt-in and its warnings, and that the native peer API does not serve the link.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from qkdagent import ForeignLink, LinkProtocol, Options, PluginContext, Secret, hookimpl
from qkdagent.cli import main
from qkdagent.config import parse_config
from qkdagent.errors import ConfigError, KeyReuseError, ProtocolError, SourceError
from qkdagent.identity import PeerIdentity
from qkdagent.lifecycle import load_components
from qkdagent.testing import config_toml, open_agent_pair, pair_configs
from qkdagent.testing.agents import AgentPair

from .helpers import until

LINK = "alice-bob"


class _Wire:
    def __init__(self) -> None:
        self.key_ids, self.key_ids_in = trio.open_memory_channel[str](0)
        self.acks, self.acks_in = trio.open_memory_channel[None](0)


WIRES: dict[str, _Wire] = {}
LINKS: dict[str, ForeignLink] = {}
"""agent name -> the ForeignLink its protocol was given (tests drive it directly)."""
FAILURES: list[str] = []


def chained(state: bytes | None, key: bytes) -> bytes:
    return hashlib.sha256((state or b"lockstep v0") + key).digest()


class Lockstep(LinkProtocol):
    """The initiator sends each key ID to the responder, which commits and acknowledges; then
    the initiator commits. No authentication at all (like quPSKd's protocol)."""

    protocol_name = "lockstep"

    def __init__(self, name: str, options: Options, context: PluginContext) -> None:
        super().__init__(name, options, context)
        self.wire = options.string("wire")
        self.drive = options.boolean("drive", True)
        self.exchanges = 0

    async def run(
        self, link: ForeignLink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        wire = WIRES.setdefault(self.wire, _Wire())
        LINKS[self.context.agent_name] = link
        if FAILURES and FAILURES[0] == self.context.agent_name:
            FAILURES.pop(0)
            raise ValueError("psk=00112233 in a protocol bug")
        task_status.started()
        if not self.drive:
            await trio.sleep_forever()
        if link.link.initiator:
            while True:
                await trio.sleep(link.interval)
                started = trio.current_time()
                key = await link.new_key()
                await wire.key_ids.send(key.key_id)
                await wire.acks_in.receive()
                state = chained(link.state, key.value.reveal())
                await link.commit(Secret(state), [key.key_id], state=state, started=started)
                self.exchanges += 1
        else:
            async for key_id in wire.key_ids_in:
                key = await link.key_by_id(key_id)
                state = chained(link.state, key.value.reveal())
                await link.commit(Secret(state), [key_id], state=state)
                self.exchanges += 1
                await wire.acks.send(None)

    def describe(self) -> dict[str, Any]:
        return {"exchanges": self.exchanges, "protocol": "overridden?"}


class _Plugin:
    @hookimpl
    def qkdagent_register_link_protocols(self, register):  # type: ignore[no-untyped-def]
        register(Lockstep)


@pytest.fixture(autouse=True)
def _lockstep(monkeypatch: pytest.MonkeyPatch) -> None:
    from qkdagent import plugins

    original = plugins.Plugins.load

    def load(self, names, group="qkdagent.plugins"):  # type: ignore[no-untyped-def]
        original(self, names, group=group)
        if "lockstep" not in self.link_protocols:
            self.add("lockstep", _Plugin(), "test")

    monkeypatch.setattr(plugins.Plugins, "load", load)
    WIRES.clear()
    LINKS.clear()
    FAILURES.clear()


SINKS = {"sinks": {"psk": {"type": "recording"}}}


def lockstep(wire: str = "w", **extra: Any) -> dict[str, Any]:
    return {"protocol": "lockstep", "insecure": True, "wire": wire, "interval": 10, **extra}


def recorded(pair: AgentPair, name: str) -> Any:
    return pair.sink(name, "psk")


async def test_a_foreign_protocol_rotates_both_sides_through_the_cores_sinks_and_state(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_agent_pair(
        tmp_path, alice=SINKS, bob=SINKS, link=lockstep(), local=True
    ) as pair:
        await pair.wait_for_epoch(3, timeout=100)
        assert pair.secret("alice", "psk").reveal() == pair.secret("bob", "psk").reveal()
        alice, bob = recorded(pair, "alice"), recorded(pair, "bob")
        assert [r.epoch for r in alice.installs][-3:] == [1, 2, 3]
        assert alice.installs[-1].fingerprint == bob.installs[-1].fingerprint
        status = pair.alice.describe()["links"][0]
        assert status["protocol"] == "lockstep" and status["insecure"] is True
        assert status["exchanges"] >= 3  # the protocol's own field, merged
        metrics = pair.alice.metrics.exposition().decode()
        assert 'qkdagent_link_insecure{link="alice-bob",protocol="lockstep"} 1.0' in metrics
        # the state a restart reads back is the one committed with the epoch
        epoch, state = pair.epoch("bob"), LINKS["bob"].state
        await pair.stop("bob")
        await pair.start("bob")
        await until(lambda: LINKS["bob"] is not None and pair.epoch("bob") == epoch)
        assert LINKS["bob"].state == state and not LINKS["bob"].erased
        await pair.wait_for_epoch(epoch + 2, timeout=100)
        assert pair.secret("alice", "psk").reveal() == pair.secret("bob", "psk").reveal()


async def test_a_key_id_is_committed_once_and_a_reuse_changes_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    link = lockstep(drive=False)
    async with open_agent_pair(tmp_path, alice=SINKS, bob=SINKS, link=link, local=True) as pair:
        await until(lambda: "alice" in LINKS)
        alice = LINKS["alice"]
        key = await alice.new_key()
        assert await alice.commit(Secret(b"k" * 32), [key.key_id]) == 1
        with pytest.raises(KeyReuseError):
            await alice.commit(Secret(b"j" * 32), [key.key_id])
        assert alice.epoch == 1 and pair.secret("alice", "psk").reveal() == b"k" * 32
        with pytest.raises(SourceError, match="already used"):
            await alice.key_by_id(key.key_id)
        with pytest.raises(SourceError, match="one key ID per source"):
            await alice.commit(Secret(b"j" * 32), ["a", "b"])


async def test_nothing_committed_within_reject_after_erases_the_sinks(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    link = lockstep(drive=False, reject_after=30)
    async with open_agent_pair(tmp_path, alice=SINKS, bob=SINKS, link=link, local=True) as pair:
        await until(lambda: "alice" in LINKS)
        alice = LINKS["alice"]
        key = await alice.new_key()
        await alice.commit(Secret(b"k" * 32), [key.key_id])
        assert not alice.erased
        sink = recorded(pair, "alice")
        erasures = len(sink.erasures)
        await trio.sleep(31)
        assert alice.erased and len(sink.erasures) == erasures + 1
        assert sink.erasures[-1][2] == "reject_after"
        assert pair.alice.describe()["links"][0]["erased"] == "reject_after"
        # the protocol may fail closed itself as well
        key = await alice.new_key()
        await alice.commit(Secret(b"m" * 32), [key.key_id])
        await alice.erase("protocol-expiry")
        assert alice.erased and sink.erasures[-1][2] == "protocol-expiry"


async def test_a_failing_protocol_is_restarted_and_reported_by_type_only(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    FAILURES.append("alice")
    async with open_agent_pair(
        tmp_path, alice=SINKS, bob=SINKS, link=lockstep(), local=True
    ) as pair:
        await pair.wait_for_epoch(2, timeout=100)
        assert "protocol 'lockstep' stopped: ValueError" in caplog.text
        assert "00112233" not in caplog.text
        assert pair.secret("alice", "psk").reveal() == pair.secret("bob", "psk").reveal()


async def test_the_native_peer_api_does_not_serve_a_foreign_link(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    link = lockstep(drive=False)
    async with open_agent_pair(tmp_path, alice=SINKS, bob=SINKS, link=link, local=True) as pair:
        await until(lambda: "bob" in LINKS)
        for identity in ("alice", "mallory"):
            with pytest.raises(ProtocolError) as refused:
                await pair.bob._handle_peer(LINK, "rotate", b"{}", PeerIdentity(dns=(identity,)))
            # the answer of an unknown link to anyone (no foreign link admits a peer)
            assert refused.value.status == 403
            # and no refusal allowance of a link the peer API serves
            assert not pair.bob._serves(PeerIdentity(dns=(identity,)), LINK)


def test_a_native_links_peer_is_served_that_link_only(tmp_path: Path) -> None:
    """What the peer API's refusal allowances are keyed on: the certificate named by a
    native link's `peer_identity` (default the peer's name), for that link only."""
    from qkdagent.agent import Agent

    config = pair_configs(tmp_path, link={"peer_identity": "alice.example"})["bob"]
    bob = Agent(parse_config(config))
    assert bob._serves(PeerIdentity(dns=("alice.example",)), LINK)
    assert not bob._serves(PeerIdentity(dns=("alice",)), LINK)
    assert not bob._serves(PeerIdentity(dns=("alice.example",)), "another-link")


def _configs(tmp_path: Path, **link: Any) -> dict[str, Any]:
    return pair_configs(tmp_path, alice=SINKS, bob=SINKS, link=link)


def test_an_unauthenticated_protocol_needs_insecure_true(tmp_path: Path) -> None:
    config = _configs(tmp_path, protocol="lockstep", wire="w")["alice"]
    with pytest.raises(ConfigError, match="insecure.*does not authenticate its peer"):
        load_components(parse_config(config))


@pytest.mark.parametrize(
    ("link", "problem"),
    [
        ({"protocol": "nonesuch", "insecure": True}, "unknown link protocol 'nonesuch'"),
        ({"protocol": "lockstep", "insecure": True}, "wire.*is required"),
        ({"protocol": "lockstep", "insecure": True, "wire": "w", "x": 1}, "x.*not a known"),
    ],
)
def test_protocol_options_are_validated_by_the_protocol(
    tmp_path: Path, link: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_components(parse_config(_configs(tmp_path, **link)["alice"]))


def test_native_only_settings_are_refused_on_a_foreign_link(tmp_path: Path) -> None:
    config = _configs(tmp_path, **lockstep())["alice"]
    config["links"][LINK]["peer_identity"] = "bob"
    with pytest.raises(ConfigError, match="peer_identity.*belongs to the native protocol"):
        parse_config(config)


def test_check_prints_the_insecure_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "alice.toml"
    path.write_text(config_toml(_configs(tmp_path, **lockstep())["alice"]))
    assert main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "protocol lockstep" in out
    assert "WARNING: link alice-bob: protocol 'lockstep' does not authenticate its peer" in out


async def test_switching_protocols_by_reload_starts_a_fresh_chain_and_warns(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with open_agent_pair(
        tmp_path, alice=SINKS, bob=SINKS, link=lockstep(), local=True
    ) as pair:
        await pair.wait_for_epoch(2, timeout=100)
        caplog.clear()
        # an unrelated reload repeats the warning for the link that stays insecure
        for name in ("alice", "bob"):
            config = copy.deepcopy(pair.configs[name])
            config["links"][LINK]["interval"] = 11
            pair.configs[name] = config
            await pair.agents[name].reload(parse_config(config))
        assert caplog.text.count("does not authenticate its peer") == 2
        await pair.wait_for_epoch(3, timeout=100)
        # back to the native protocol: both sides start again from the bootstrap secret
        native = pair_configs(tmp_path / "native", alice=SINKS, bob=SINKS)
        for name in ("bob", "alice"):
            config = copy.deepcopy(pair.configs[name])
            config["links"][LINK] = {
                **native[name]["links"][LINK],
                "peer_url": f"https://{pair.configs[config['links'][LINK]['peer']]['agent']['listen']}",
            }
            config["links"][LINK]["bootstrap"] = native["alice"]["links"][LINK]["bootstrap"]
            pair.configs[name] = config
            await pair.agents[name].reload(parse_config(config))
        assert pair.epoch("alice") == 0 and pair.epoch("bob") == 0  # a fresh native chain
        await pair.wait_for_epoch(1, timeout=200)
        assert pair.alice.describe()["links"][0]["protocol"] == "native"
        assert pair.secret("alice", "psk").reveal() == pair.secret("bob", "psk").reveal()
        metrics = pair.alice.metrics.exposition().decode()
        assert "qkdagent_link_insecure{" not in metrics.replace("# HELP", "").replace("# TYPE", "")


async def test_an_agent_with_only_foreign_links_needs_no_tls_and_serves_no_peer_api(
    tmp_path: Path,
) -> None:
    link = lockstep(interval=0.2)
    async with open_agent_pair(tmp_path, alice=SINKS, bob=SINKS, link=link, start=False) as pair:
        for name in ("bob", "alice"):
            del pair.configs[name]["agent"]["tls"]
            await pair.start(name)
        await pair.wait_for_epoch(2)
        assert pair.alice.peer_urls == [] and pair.bob.peer_urls == []
        assert pair.secret("alice", "psk").reveal() == pair.secret("bob", "psk").reveal()


def test_a_native_link_still_needs_the_agent_tls_files(tmp_path: Path) -> None:
    config = pair_configs(tmp_path, alice=SINKS, bob=SINKS)["alice"]
    del config["agent"]["tls"]
    with pytest.raises(ConfigError, match="agent.tls.*link 'alice-bob' uses qkdagent's own"):
        parse_config(config)


async def test_a_bug_in_the_cores_timer_restarts_the_whole_foreign_link(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qkdagent.link import BaseLink

    original, broken = BaseLink.timer_loop, [1]

    async def timer_loop(self: BaseLink) -> None:
        if broken and self.protocol == "lockstep":
            broken.pop()
            raise KeyError("a bug")
        await original(self)

    monkeypatch.setattr(BaseLink, "timer_loop", timer_loop)
    link = lockstep()
    async with open_agent_pair(tmp_path, alice=SINKS, bob=SINKS, link=link, local=True) as pair:
        await pair.wait_for_epoch(2, timeout=200)  # the link ran again after the failed run
        assert not broken
        assert pair.secret("alice", "psk").reveal() == pair.secret("bob", "psk").reveal()


async def test_an_erase_the_protocol_asked_for_survives_a_restart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The protocol gave the key up (quPSKd's expiry) before reject_after: a restart within
    reject_after must not put it back."""
    link = lockstep(drive=False, reject_after=300)
    async with open_agent_pair(tmp_path, alice=SINKS, bob=SINKS, link=link, local=True) as pair:
        await until(lambda: "alice" in LINKS)
        key = await LINKS["alice"].new_key()
        await LINKS["alice"].commit(Secret(b"k" * 32), [key.key_id], state=b"chain")
        await LINKS["alice"].erase("protocol-expiry")
        await pair.stop("alice")
        del LINKS["alice"]
        await pair.start("alice")
        await until(lambda: "alice" in LINKS)
        alice = LINKS["alice"]
        assert alice.erased and alice.epoch == 1 and alice.state == b"chain"
        sink = recorded(pair, "alice")
        assert sink.installs == [] and sink.erasures[-1][2] == "reject_after"
        # a new commit makes the link live again, and a restart then keeps its key
        key = await alice.new_key()
        await alice.commit(Secret(b"m" * 32), [key.key_id], state=b"chain2")
        await pair.stop("alice")
        await pair.start("alice")
        await until(lambda: recorded(pair, "alice").installs != [])
        assert [r.epoch for r in recorded(pair, "alice").installs] == [2]


async def test_an_erase_the_store_cannot_record_still_erases_the_sinks(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The protocol gives its key up but the durable erased mark fails (a full disk): the
    sinks are erased all the same (fail closed), and the protocol sees the error."""
    link = lockstep(drive=False, reject_after=300)
    async with open_agent_pair(tmp_path, alice=SINKS, bob=SINKS, link=link, local=True) as pair:
        await until(lambda: "alice" in LINKS)
        alice = LINKS["alice"]
        key = await alice.new_key()
        await alice.commit(Secret(b"k" * 32), [key.key_id], state=b"chain")
        sink = recorded(pair, "alice")
        erasures = len(sink.erasures)

        def full(*args: object) -> None:
            raise OSError("disk full")

        store = alice.env.store  # type: ignore[attr-defined]
        monkeypatch.setattr(store, "set_source_state", full)
        with pytest.raises(OSError, match="disk full"):
            await alice.erase("protocol-expiry")
        assert alice.erased
        assert len(sink.erasures) == erasures + 1 and sink.erasures[-1][2] == "protocol-expiry"


async def test_stopping_a_foreign_link_lets_an_expiry_erase_finish(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    slow = {"sinks": {"psk": {"type": "recording", "erase_delay": 5}}}
    link = lockstep(drive=False, reject_after=30)
    async with open_agent_pair(tmp_path, alice=slow, bob=SINKS, link=link, local=True) as pair:
        await until(lambda: "alice" in LINKS)
        key = await LINKS["alice"].new_key()
        started = trio.current_time()
        await LINKS["alice"].commit(Secret(b"k" * 32), [key.key_id])
        sink = recorded(pair, "alice")
        await trio.sleep(started + 31 - trio.current_time())  # the expiry erase is under way
        assert [r for r in sink.erasures if r[2] == "reject_after"] == []
        await pair.stop("alice")  # SIGTERM now: the erase still completes
        assert [r[2] for r in sink.erasures][-1] == "reject_after"


async def test_a_reload_adding_a_native_link_to_an_agent_without_tls_is_refused(
    tmp_path: Path,
) -> None:
    from qkdagent.errors import ReloadFailed

    link = lockstep(interval=0.2)
    async with open_agent_pair(tmp_path, alice=SINKS, bob=SINKS, link=link, start=False) as pair:
        for name in ("bob", "alice"):
            del pair.configs[name]["agent"]["tls"]
            await pair.start(name)
        native = pair_configs(tmp_path / "native", alice=SINKS, bob=SINKS)["alice"]
        config = copy.deepcopy(pair.configs["alice"])
        config["agent"]["tls"] = native["agent"]["tls"]  # valid now, but only after a restart
        config["links"]["second"] = native["links"][LINK]
        with pytest.raises(ReloadFailed, match="started without \\[agent.tls\\]"):
            await pair.alice.reload(parse_config(config))
        assert set(pair.alice.links) == {LINK}
