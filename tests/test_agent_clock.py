"""The running agent pair under trio's virtual clock (in-process transport, no sockets)."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from qkdagent.config import parse_config
from qkdagent.errors import StartupError
from qkdagent.testing import MemoryPool, RecordingSink, open_agent_pair

DAY = 24 * 3600
REC = {"sinks": {"rec": {"type": "recording"}}}


def _sinks(pair, name: str, **options) -> None:
    pair.configs[name]["sinks"]["rec"].update(options)


def _pool(pair) -> MemoryPool:
    return MemoryPool.named(pair.configs["alice"]["sources"]["sim"]["pool"])


async def test_a_day_of_rotations_has_the_expected_count_and_spacing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    link = {"interval": 120, "reject_after": 180, "jitter": 0}
    async with open_agent_pair(tmp_path, alice=REC, bob=REC, link=link, local=True) as pair:
        start = trio.current_time()
        await trio.sleep(DAY - 1)  # rotations at 0, 120, ..., DAY - 120
        alice = pair.sink("alice", "rec").installs
        bob = pair.sink("bob", "rec").installs
    assert len(alice) == DAY // 120
    times = [r.time - start for r in alice]
    assert times[0] < 1
    assert all(b - a == pytest.approx(120, abs=1e-6) for a, b in itertools.pairwise(times))
    assert [r.fingerprint for r in alice] == [r.fingerprint for r in bob]
    assert [r.epoch for r in bob] == list(range(1, len(alice) + 1))
    for name in ("alice", "bob"):  # the start-up erase came first, and only once
        assert pair.sink(name, "rec").calls[:3] == ["erase:startup", "install:1", "install:2"]
        assert [c for c in pair.sink(name, "rec").calls if c.startswith("erase")] == [
            "erase:startup"
        ]


async def test_jitter_spreads_rotations_within_bounds(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    link = {"interval": 120, "reject_after": 180, "jitter": 0.1}
    async with open_agent_pair(tmp_path, alice=REC, bob=REC, link=link, local=True) as pair:
        await trio.sleep(DAY)
        installs = pair.sink("alice", "rec").installs
    gaps = [b.time - a.time for a, b in itertools.pairwise(installs)]
    assert all(108 - 1e-6 <= g <= 120 + 1e-6 for g in gaps)
    assert len(set(round(g, 3) for g in gaps)) > 10  # really jittered
    assert DAY // 120 < len(installs) <= DAY // 108 + 1


async def test_reject_after_erases_when_the_source_is_down(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    link = {"interval": 120, "reject_after": 180, "jitter": 0}
    async with open_agent_pair(tmp_path, alice=REC, bob=REC, link=link, local=True) as pair:
        await pair.wait_for_epoch(1)
        committed = trio.current_time()
        good = pair.secret("alice", "rec")
        _pool(pair).down = True
        await trio.sleep(179)
        for name in ("alice", "bob"):
            assert pair.sink(name, "rec").current["alice-bob"] == good
            assert len(pair.sink(name, "rec").erasures) == 1  # start-up only
        await trio.sleep(2)
        for name in ("alice", "bob"):
            sink = pair.sink(name, "rec")
            when, _, reason = sink.erasures[-1]
            assert reason == "reject_after"
            assert when - committed == pytest.approx(180, abs=0.01)
            assert sink.current["alice-bob"] != good
        status = pair.alice.link("alice-bob").describe()
        assert status["erased"] == "reject_after" and "source" in status["last_error"]
        _pool(pair).down = False
        await trio.sleep(31)  # backoff is capped at 30 s: the link recovers by itself
        assert pair.epoch("alice") == pair.epoch("bob") == 2
        assert pair.sink("bob", "rec").current["alice-bob"] == pair.secret("bob", "rec")


async def test_reject_after_erases_when_the_peer_is_down(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    link = {"interval": 120, "reject_after": 180, "jitter": 0}
    async with open_agent_pair(tmp_path, alice=REC, bob=REC, link=link, local=True) as pair:
        await pair.wait_for_epoch(1)
        committed = trio.current_time()
        await pair.stop("bob")
        await trio.sleep(181)
        sink = pair.sink("alice", "rec")
        when, _, reason = sink.erasures[-1]
        assert reason == "reject_after"
        assert when - committed == pytest.approx(180, abs=0.01)
        assert sink.current["alice-bob"] != pair.secret("alice", "rec")
        assert "peer" in pair.alice.link("alice-bob").describe()["last_error"]


async def test_shutdown_drains_an_inflight_rotation(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    slow = {"sinks": {"rec": {"type": "recording", "delay": 5}}}
    link = {"interval": 120, "reject_after": 180, "jitter": 0}
    async with open_agent_pair(tmp_path, alice=slow, bob=REC, link=link, local=True) as pair:
        await pair.wait_for_epoch(1)
        while not pair.sink("alice", "rec").installs:  # noqa: ASYNC110 - virtual time
            await trio.sleep(0.5)
        # epoch 1 finished installing at t=5: rotation 2 starts at 125 and installs until 130
        await trio.sleep(121)
        stopping = trio.current_time()
        await pair.stop("alice")
        assert trio.current_time() - stopping == pytest.approx(4, abs=0.1)
        assert [r.epoch for r in pair.sink("alice", "rec").installs] == [1, 2]


async def test_shutdown_drains_a_commit_the_responder_is_installing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    slow = {"sinks": {"rec": {"type": "recording", "delay": 5}}}
    link = {"interval": 120, "reject_after": 180, "jitter": 0}
    async with open_agent_pair(tmp_path, alice=REC, bob=slow, link=link, local=True) as pair:
        await pair.wait_for_epoch(1)
        while not pair.sink("bob", "rec").installs:  # noqa: ASYNC110 - virtual time
            await trio.sleep(0.5)
        start = trio.current_time()
        while pair.epoch("bob") < 2:  # noqa: ASYNC110 - virtual time
            await trio.sleep(0.5)
        # bob committed epoch 2 and is installing it (5 s) inside the commit request
        assert [r.epoch for r in pair.sink("bob", "rec").installs] == [1]
        stopping = trio.current_time()
        await pair.stop("bob")
        assert 3 < trio.current_time() - stopping <= 5
        assert [r.epoch for r in pair.sink("bob", "rec").installs] == [1, 2]
        assert trio.current_time() - start > 100


async def test_shutdown_is_bounded_by_drain_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    stuck = {
        "sinks": {"rec": {"type": "recording", "delay": 500, "timeout": 600}},
        "agent": {"drain_timeout": 10},
    }
    link = {"interval": 1000, "reject_after": 2000, "jitter": 0}
    async with open_agent_pair(tmp_path, alice=stuck, bob=REC, link=link, local=True) as pair:
        await trio.sleep(1)  # the first rotation is stuck installing
        stopping = trio.current_time()
        await pair.stop("alice")
        assert trio.current_time() - stopping == pytest.approx(10, abs=0.1)


@pytest.mark.parametrize("side, method", [("alice", "new_key"), ("bob", "key_by_id")])
async def test_a_source_that_raises_fails_one_rotation_not_the_agent(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, side: str, method: str
) -> None:
    """A plugin bug (any exception, its message possibly quoting key material) is a source
    error for that rotation: logged by type only, retried with backoff, the agent keeps going."""
    link = {"interval": 120, "reject_after": 600, "jitter": 0}
    async with open_agent_pair(tmp_path, alice=REC, bob=REC, link=link, local=True) as pair:
        await pair.wait_for_epoch(1)
        source = pair.agents[side].components.sources["sim"].source
        real = getattr(source, method)
        calls = 0

        async def broken(*args: object) -> object:
            nonlocal calls
            calls += 1
            if calls <= 2:
                raise ValueError("leaky plugin message 0123456789abcdef")
            return await real(*args)

        setattr(source, method, broken)
        runtime = pair.agents[side].link("alice-bob")
        # (alice's first call may be a prefetch, whose failure the rotation then reports)
        while runtime.status.last_error is None:  # noqa: ASYNC110 - virtual time
            await trio.sleep(0.1)
        status = runtime.describe()
        assert pair.epoch("alice") == pair.epoch("bob") == 1
        assert "ValueError" in status["last_error"] and "leaky" not in status["last_error"]
        await trio.sleep(60)  # backoff, then the source works again
        assert calls > 2
        assert pair.epoch("alice") == pair.epoch("bob") >= 2
        assert pair.sink("bob", "rec").current["alice-bob"] == pair.secret("bob", "rec")


async def test_json_log_lines_carry_link_and_epoch_fields(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    import json
    import logging

    from qkdagent.logsetup import JsonFormatter

    caplog.set_level(logging.INFO)
    link = {"interval": 120, "reject_after": 180, "jitter": 0}
    async with open_agent_pair(tmp_path, alice=REC, bob=REC, link=link, local=True) as pair:
        await pair.wait_for_epoch(1)
        _pool(pair).down = True
        await trio.sleep(125)
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records]
    committed = [d for d in lines if "committed" in d["msg"]]
    failed = [d for d in lines if "rotation failed" in d["msg"]]
    assert {(d["link"], d["epoch"]) for d in committed} == {("alice-bob", 1)}
    assert all(d["duration_ms"] >= 0 for d in committed)
    assert failed and all(d["stage"] == "source" and d["epoch"] == 1 for d in failed)


async def test_committed_lines_say_which_part_of_the_rotation_took_its_time(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Epoch 2 with a delay in each part that can take one (virtual time): bob's source 0.25 s
    and the `rotate`'s way to him 0.7 s (both in alice's `reply`), alice's store 0.3 s, her
    sink 2 s, the `commit`'s way 0.4 s (her `ack`), bob's sink 3 s. Each side's line charges
    each to its part, the parts add up to the duration, and bob acknowledged before his
    install (alice's `ack` holds none of it; his line has the `ack` part)."""
    import json
    import logging

    from qkdagent.logsetup import JsonFormatter
    from qkdagent.testing.hostile import Exchange, ManInTheMiddle

    caplog.set_level(logging.INFO)
    link = {"interval": 120, "reject_after": 180, "jitter": 0}
    alice = {"sinks": {"rec": {"type": "recording", "delay": 2}}}
    bob = {"sinks": {"rec": {"type": "recording", "delay": 3}}}
    async with open_agent_pair(tmp_path, alice=alice, bob=bob, link=link, local=True) as pair:
        await pair.wait_for_epoch(1)
        store = pair.agents["alice"].link("alice-bob").env.store
        real_run = store.run

        async def slow_run(*args: Any, **kwargs: Any) -> Any:
            await trio.sleep(0.3)
            return await real_run(*args, **kwargs)

        store.run = slow_run
        _pool(pair).delay = 0.25
        delays = {"rotate": 0.7, "commit": 0.4}

        async def slow_way(exchange: Exchange) -> Any:
            await trio.sleep(delays.get(exchange.action, 0.0))
            return await exchange.forward()

        ManInTheMiddle.on(pair, "bob").tamper = slow_way
        await pair.wait_for_epoch(2, timeout=300)
        await trio.sleep(5)  # bob's install ends after alice's rotation
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records]
    committed = {
        d["msg"].split("(")[1].split(")")[0]: d
        for d in lines
        if "committed" in d["msg"] and d["epoch"] == 2
    }
    mine, theirs = committed["initiator"]["parts_ms"], committed["responder"]["parts_ms"]
    assert list(mine) == ["keys", "reply", "check", "derive", "store", "install", "ack"]
    assert list(theirs) == ["store", "ack", "install"]
    for line in committed.values():
        assert sum(line["parts_ms"].values()) == pytest.approx(line["duration_ms"], abs=0.01)
    expected = {"keys": 0, "reply": 950, "check": 0, "derive": 0, "store": 300, "install": 2000}
    for part, ms in {**expected, "ack": 400}.items():
        assert ms <= mine[part] < ms + 50, (part, mine)
    for part, ms in {"store": 0, "ack": 0, "install": 3000}.items():
        assert ms <= theirs[part] < ms + 50, (part, theirs)
    text = committed["initiator"]["msg"]
    assert f"(keys {mine['keys']:.1f} + reply {mine['reply']:.1f} + check" in text
    assert text.endswith(f"install {mine['install']:.1f} + ack {mine['ack']:.1f} ms)")


async def test_both_sides_responder_is_named_when_nothing_arrives(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    side = {**REC, "link": {"role": "responder"}}
    link = {"interval": 120, "reject_after": 180, "jitter": 0}
    async with open_agent_pair(tmp_path, alice=side, bob=side, link=link, local=True) as pair:
        await trio.sleep(181)
        for name in ("alice", "bob"):
            status = pair.agents[name].link("alice-bob").describe()
            assert status["epoch"] == 0 and status["role"] == "responder"
            assert "configured as the initiator" in status["last_error"]
            assert pair.sink(name, "rec").calls == ["erase:startup"]


async def test_components_are_prepared_together(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    slow = {
        "sinks": {
            f"rec{i}": {"type": "recording", "prepare_delay": 3, "label": f"rec{i}"}
            for i in range(3)
        }
    }
    same_labels = {
        "sinks": {f"rec{i}": {"type": "recording", "label": f"rec{i}"} for i in range(3)}
    }
    started = trio.current_time()
    async with open_agent_pair(tmp_path, alice=slow, bob=same_labels, local=True) as pair:
        assert trio.current_time() - started == pytest.approx(3, abs=0.5)  # not 9
        await pair.wait_for_epoch(1)


async def test_the_first_failed_component_in_config_order_is_reported(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    broken = {
        "sinks": {
            "late": {
                "type": "recording",
                "label": "late",
                "prepare_delay": 5,
                "prepare_error": "late broke",
            },
            "early": {"type": "recording", "label": "early", "prepare_error": "early broke"},
        }
    }
    with pytest.raises(ExceptionGroup) as failed:
        async with open_agent_pair(tmp_path, alice=broken, bob=REC, local=True):
            pass
    assert failed.group_contains(StartupError, match="^sink 'late': recording sink 'late'")
    assert not failed.group_contains(StartupError, match="early")


async def test_a_refused_reload_closes_the_components_it_prepared(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[str] = []

    async def record_close(self: RecordingSink) -> None:
        closed.append(self.name)

    monkeypatch.setattr(RecordingSink, "aclose", record_close)
    async with open_agent_pair(tmp_path, alice=REC, bob=REC, local=True) as pair:
        await pair.wait_for_epoch(1)
        config = copy.deepcopy(pair.configs["alice"])
        config["sinks"]["ok"] = {"type": "recording", "label": "ok"}
        config["sinks"]["bad"] = {"type": "recording", "label": "bad", "prepare_error": "no"}
        config["links"]["alice-bob"]["sinks"] += ["ok", "bad"]
        with pytest.raises(StartupError, match="^sink 'bad': recording sink 'bad': no$"):
            await pair.alice.reload(parse_config(config))
        assert sorted(closed) == ["bad", "ok"]  # not "rec": the running config is kept
        assert list(pair.alice.components.sinks) == ["rec"]
        await pair.wait_for_epoch(2, timeout=200)  # the link still rotates


async def test_used_key_ids_kept_reaches_the_store_and_a_crowded_state_disk_is_warned_of(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`[agent] used_key_ids_kept` is the store's retention; at start, and at a reload that
    adds links, the agent warns when the used key IDs would take more than half the room the
    state has (free space, given here, and the state file)."""
    from qkdagent import agent as agent_module
    from qkdagent.state import used_ids_footprint

    one = used_ids_footprint([("alice-bob", ["sim"])], 100_000)  # ~18 MB
    monkeypatch.setattr(agent_module, "disk_free", lambda path: 3 * one)
    crowded = "used_key_ids_kept), against"

    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records if crowded in r.getMessage()]

    alice = {**REC, "agent": {"used_key_ids_kept": 10**6}}  # 10 times bob's default
    with caplog.at_level("WARNING", logger="qkdagent.agent"):
        async with open_agent_pair(tmp_path, alice=alice, bob=REC, local=True) as pair:
            await pair.wait_for_epoch(1)
            assert pair.alice.store.keep_used_ids == 10**6
            assert pair.bob.store.keep_used_ids == 100_000
            assert len(warned()) == 1 and "1,000,000" in warned()[0]  # alice's, not bob's

            # bob's one link fits in the room; with a second, it does not
            held = pair.bob.store.path.stat().st_size
            assert 2 * one <= 3 * one + held < 2 * (2 * one)
            caplog.clear()
            config = copy.deepcopy(pair.configs["bob"])
            config["links"]["alice-carol"] = {
                **config["links"]["alice-bob"],
                "peer": "carol",
                "peer_url": "https://carol:1",
            }
            await pair.bob.reload(parse_config(config))
            assert len(warned()) == 1 and "100,000" in warned()[0]
