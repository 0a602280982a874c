"""Exchange sources (DESIGN v2 §3): the responder's answer travels MAC'd in the reply, the
initiator accepts it, and per-link source state commits with the epoch. Virtual time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import trio
import trio.testing

from qkdagent import hookimpl, protocol
from qkdagent.testing import Exchange, ManInTheMiddle, open_agent_pair
from qkdagent.testing.exchange import ExchangeSource
from tests.helpers import until

REC = {"rec": {"type": "recording"}}
LINK = {"interval": 10, "reject_after": 600, "jitter": 0, "backoff_max": 5}
SIDE = {"plugins": ["memory"], "sources": {"kem": {"type": "x25519-exchange"}}, "sinks": REC}


class _Plugin:
    @hookimpl
    def qkdagent_register_sources(self, register):  # type: ignore[no-untyped-def]
        register(ExchangeSource)


@pytest.fixture(autouse=True)
def _exchange(monkeypatch: pytest.MonkeyPatch) -> None:
    from qkdagent import plugins

    original = plugins.Plugins.load

    def load(self, names, group="qkdagent.plugins"):  # type: ignore[no-untyped-def]
        original(self, names, group=group)
        if "x25519-exchange" not in self.sources:
            self.add("x25519-exchange", _Plugin(), "test")

    monkeypatch.setattr(plugins.Plugins, "load", load)


def _state_files(pair, name: str) -> bytes:
    state = Path(pair.configs[name]["agent"]["state_dir"])
    return b"".join(p.read_bytes() for p in state.iterdir() if p.is_file())


async def test_answers_and_source_state_commit_with_each_epoch(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_agent_pair(tmp_path, alice=SIDE, bob=SIDE, link=LINK, local=True) as pair:
        await pair.wait_for_epoch(4, timeout=120)
        assert pair.secret("alice", "rec") == pair.secret("bob", "rec")
        alice = pair.alice.link("alice-bob").record
        bob = pair.bob.link("alice-bob").record
        given = pair.bob.components.sources["kem"].source.answers
        # The initiator keeps the responder's latest public key; the responder its private key.
        assert alice.source_state == {"kem": given[-1]}
        assert set(bob.source_state) == {"kem"} and len(bob.source_state["kem"]) == 32
        assert len(set(given)) == len(given) >= 4  # a fresh key pair every epoch


async def test_a_used_private_key_is_gone_once_its_epoch_commits(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_agent_pair(tmp_path, alice=SIDE, bob=SIDE, link=LINK, local=True) as pair:
        await pair.wait_for_epoch(2, timeout=120)
        used = pair.bob.link("alice-bob").record.source_state["kem"]
        assert used in _state_files(pair, "bob")
        await pair.wait_for_epoch(4, timeout=120)
        await pair.stop("bob")  # closes the store: the WAL checkpointed into the database
        assert used not in _state_files(pair, "bob")


async def test_a_resync_starts_the_exchange_again_from_no_state(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_agent_pair(tmp_path, alice=SIDE, bob=SIDE, link=LINK, local=True) as pair:
        await pair.wait_for_epoch(3, timeout=120)
        await pair.stop("bob")
        shutil.rmtree(pair.configs["bob"]["agent"]["state_dir"])
        await pair.start("bob")
        await pair.wait_for_epoch(5, timeout=120)
        assert pair.secret("alice", "rec") == pair.secret("bob", "rec")


async def test_a_tampered_answer_is_refused_by_the_reply_mac(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_agent_pair(tmp_path, alice=SIDE, bob=SIDE, link=LINK, local=True) as pair:
        await pair.wait_for_epoch(1, timeout=120)
        mitm = ManInTheMiddle.on(pair, "bob")
        tampered = 0

        async def swap_answer(exchange: Exchange) -> object:
            nonlocal tampered
            reply = await exchange.forward()
            if exchange.action != "rotate" or reply.status != 200 or tampered >= 2:
                return reply
            tampered += 1
            fields = json.loads(reply.body)
            fields["answers"] = [["kem", protocol.b64(b"\x09" * 32)]]  # the attacker's key
            return exchange.forged(200, protocol.canonical(fields))

        mitm.tamper = swap_answer
        epoch = pair.epoch("alice")
        await until(lambda: pair.epoch("alice") > epoch, 120)
        assert tampered == 2
        assert pair.alice.link("alice-bob").record.source_state["kem"] != b"\x09" * 32
        assert pair.secret("alice", "rec") == pair.secret("bob", "rec")


async def test_a_plain_source_refuses_an_answer(tmp_path: Path) -> None:
    from qkdagent.errors import SourceError
    from qkdagent.interfaces import Link, PluginContext
    from qkdagent.options import Options
    from qkdagent.testing import MemoryPool, MemorySource

    context = PluginContext("alice", tmp_path)
    source = MemorySource("m", Options({"pool": "p"}, where="sources.m"), context)
    link = Link("l", "alice", "bob", True)
    assert await source.accept_answer(link, b"", b"state") == b"state"
    with pytest.raises(SourceError, match="takes no answer"):
        await source.accept_answer(link, b"x", None)
    MemoryPool.named("p")


async def test_a_plain_sources_answer_check_sets_no_timeout_an_exchange_sources_does(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The base `accept_answer` never waits: its handle calls it without a timeout (a cancel
    scope on every rotation's path, for nothing), and it still refuses an answer. A source
    that overrides it is bounded by the source's timeout, as every other call."""
    from qkdagent.components import SourceHandle
    from qkdagent.errors import SourceError, SourceUnavailable
    from qkdagent.interfaces import Link, PluginContext
    from qkdagent.options import Options
    from qkdagent.testing import MemoryPool, MemorySource

    class Slow(MemorySource):
        async def accept_answer(self, link: Link, answer: bytes, state: bytes | None) -> bytes:
            await trio.sleep_forever()

    timeouts: list[float] = []
    real = trio.fail_after

    def recorded(seconds: float, **kwargs: bool) -> trio.CancelScope:
        timeouts.append(seconds)
        return real(seconds, **kwargs)

    monkeypatch.setattr(trio, "fail_after", recorded)
    context = PluginContext("alice", tmp_path)
    link = Link("l", "alice", "bob", True)

    def handle(cls: type[MemorySource]) -> SourceHandle:
        source = cls("m", Options({"pool": "p"}, where="m"), context)
        return SourceHandle("m", "memory", 7.0, source)

    plain = handle(MemorySource)
    assert await plain.accept_answer(link, b"", b"state") == b"state"
    with pytest.raises(SourceError, match="takes no answer"):
        await plain.accept_answer(link, b"x", None)
    assert timeouts == []
    with real(60), pytest.raises(SourceUnavailable, match="accept_answer timed out after 7 s"):
        await handle(Slow).accept_answer(link, b"", None)
    assert timeouts == [7.0]
    on_instance = handle(MemorySource)  # overridden on the instance: still the source's own
    on_instance.source.accept_answer = Slow.accept_answer.__get__(on_instance.source)  # type: ignore[method-assign]
    with real(60), pytest.raises(SourceUnavailable, match="accept_answer timed out after 7 s"):
        await on_instance.accept_answer(link, b"", None)
    assert timeouts == [7.0, 7.0]
    MemoryPool.named("p")
