"""Secret, Options, protocol parsing and plugin loading."""

from __future__ import annotations

import importlib.metadata as md
import itertools
import math
import pickle
import uuid
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from qkdagent import Key, Secret, Sink, decimal, hookimpl, protocol
from qkdagent.errors import ConfigError, PluginError, ProtocolError
from qkdagent.inline import InlineGate
from qkdagent.options import Options
from qkdagent.plugins import Plugins
from tests.helpers import ScheduleCount


def test_secret_never_shows_its_bytes() -> None:
    secret = Secret(b"\x01" * 32)
    for text in (
        repr(secret),
        str(secret),
        f"{secret}",
        f"{secret!r:>40}",
        repr(Key("id", secret)),
    ):
        assert "01" * 4 not in text and "AQEB" not in text
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    with pytest.raises(TypeError):
        hash(secret)
    assert secret == Secret(b"\x01" * 32) and secret != Secret(b"\x02" * 32)
    secret.wipe()
    assert secret.reveal() == bytes(32)


@pytest.mark.parametrize("key_id", ["", "a\nb", "x" * 4097, 5])  # 4096: MAX_KEY_ID_ANY
def test_bad_key_ids_are_refused(key_id: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        Key(key_id, Secret(b"k" * 32))  # type: ignore[arg-type]


def test_options_types_ranges_and_unknown_keys(tmp_path: Path) -> None:
    opts = Options({"a": 1, "b": "x", "c": True, "d": 1.5}, where="sinks.s", file="f.toml")
    assert opts.integer("a", min=1) == 1
    assert opts.string("b", choices=("x", "y")) == "x"
    assert opts.boolean("c") is True
    assert opts.number("d", positive=True) == 1.5
    assert opts.integer("missing", 7) == 7
    opts.finish()
    bad = Options({"a": True, "z": 1}, where="sinks.s", file="f.toml")
    with pytest.raises(
        ConfigError, match=r"^f\.toml: sinks\.s\.a: must be an integer, not a boolean"
    ):
        bad.integer("a")
    with pytest.raises(ConfigError, match="sinks.s.z: is not a known option here"):
        bad.finish()
    with pytest.raises(ConfigError, match="must be at most 3"):
        Options({"n": 4}, where="x").integer("n", max=3)


def test_options_secret_from_file(tmp_path: Path) -> None:
    path = tmp_path / "pin"
    path.write_text("1234\n")
    path.chmod(0o600)
    warnings: list[str] = []
    opts = Options({"pin": {"file": str(path)}}, where="sinks.h", warn=warnings.append)
    pin = opts.secret("pin")
    assert pin.reveal() == b"1234" and not warnings
    path.chmod(0o640)
    Options({"pin": {"file": str(path)}}, where="sinks.h", warn=warnings.append).secret("pin")
    assert warnings and "readable by group or others" in warnings[0]
    with pytest.raises(ConfigError, match="cannot read secret file"):
        Options({"pin": {"file": str(tmp_path / "none")}}, where="s").secret("pin")
    with pytest.raises(ConfigError, match='must be {file = "PATH"} or {env = "NAME"}'):
        Options({"pin": {"path": "x"}}, where="s").secret("pin")


def _msg(**change: object) -> bytes:
    fields: dict = dict(
        link="l",
        sender="a",
        receiver="b",
        epoch=1,
        auth_key=Secret(b"k" * 32),
        keys=[["s", "id"]],
        labels=[],
        nonce=b"n" * 32,
    )
    fields.update(change)
    return protocol.build("rotate", **fields)


def test_protocol_roundtrip_and_mac() -> None:
    message = protocol.parse(_msg(), expect=("rotate",))
    assert message.keys == (("s", "id"),) and message.epoch == 1
    assert protocol.verify_mac(message, Secret(b"k" * 32))
    assert not protocol.verify_mac(message, Secret(b"K" * 32))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\xff\xfe", "not valid JSON"),
        (b'"x"', "JSON object"),
        (b'{"kind": "nope"}', "unexpected message kind"),
        (_msg(epoch=0), "positive integer"),
        (_msg(keys=[]), "1-16 source keys"),
        (_msg(keys=[["s", ""]]), "bad key ID"),
        (_msg(keys=[["s", "x" * 4097]]), "longer than 4096 bytes"),  # per source: rules
        (_msg(keys=[["s"]]), "[source, key_id]"),
        (_msg(nonce=b"short"), "must decode to 32 bytes"),
        (_msg(link="x" * 200), "1-128 characters"),
        (_msg().replace(b'"v":1', b'"v":2'), "unsupported protocol version"),
        (b"{" + b" " * (65 * 1024) + b"}", "larger than"),
    ],
)
def test_protocol_refuses_malformed_messages(body: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message.replace("[", r"\[").replace("]", r"\]")):
        protocol.parse(body, expect=("rotate",))


class _Sink(Sink):
    type_name = "twin"

    async def install(self, link, secret, meta):
        pass

    async def erase(self, link, reason):
        pass


class _Other(_Sink):
    pass


def _plugin(cls: type) -> object:
    @hookimpl
    def qkdagent_register_sinks(register):
        register(cls)

    return SimpleNamespace(qkdagent_register_sinks=qkdagent_register_sinks)


def test_duplicate_type_names_name_both_distributions() -> None:
    plugins = Plugins()
    plugins.add("one", _plugin(_Sink), "qkdagent-one")
    with pytest.raises(
        PluginError, match="'twin' is registered by both qkdagent-one and qkdagent-two"
    ):
        plugins.add("two", _plugin(_Other), "qkdagent-two")


def test_plugin_that_fails_to_import_names_its_distribution(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broken = md.EntryPoint("broken", "qkdagent_no_such_module_xyz", "qkdagent.plugins")
    monkeypatch.setattr("qkdagent.plugins.installed", lambda group="": {"broken": broken})
    with pytest.raises(
        PluginError, match="plugin 'broken' from .* failed to import: ModuleNotFound"
    ):
        Plugins().load(["broken"])


def test_registering_a_non_sink_is_refused() -> None:
    with pytest.raises(PluginError, match="not a"):
        Plugins().add("bad", _plugin(dict), "qkdagent-bad")


def test_unconfigured_plugins_are_not_imported() -> None:
    import sys

    plugins = Plugins()
    plugins.load(["file"])
    assert "qkdagent.builtin.file_sink" in sys.modules
    assert set(plugins.loaded) == {"file"}
    assert "exec" not in plugins.loaded and "twin" not in plugins.sinks


def test_json_logs_are_one_object_per_line() -> None:
    import json
    import logging

    from qkdagent.logsetup import JsonFormatter

    record = logging.LogRecord("qkdagent.link", logging.INFO, "x", 1, "epoch %d", (5,), None)
    data = json.loads(JsonFormatter().format(record))
    assert (
        data["msg"] == "epoch 5" and data["level"] == "info" and data["logger"] == "qkdagent.link"
    )
    assert data["ts"].endswith("Z")
    import datetime

    stamp = datetime.datetime.fromisoformat(data["ts"]).timestamp()  # microseconds
    assert abs(stamp - record.created) < 2e-6 and len(data["ts"].split(".")[1]) == 7


async def test_state_files_are_private(tmp_path: Path) -> None:
    import stat

    from qkdagent.state import StateStore

    store = StateStore(tmp_path / "state")
    await store.run(store.create, "l", "peer", Secret(b"c" * 32), Secret(b"a" * 32))
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    for path in (tmp_path / "state").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    store.close()


@pytest.mark.parametrize("grouped", [True, False], ids=["group-commit", "inline"])
async def test_superseded_keys_leave_every_state_file_after_commit(
    tmp_path: Path, grouped: bool
) -> None:
    """Forward secrecy on disk: soon after epoch n+1 commits (the agent's background
    checkpoint, within SCRUB_DELAY; inline stores at once), epoch n's chain key and outputs
    are in no file of the state dir, the write-ahead log included, with the store still open."""
    from qkdagent.state import SCRUB_DELAY, StateStore

    state = tmp_path / "state"
    store = StateStore(state, threaded=grouped)
    history: list[list[bytes]] = []

    def on_disk() -> bytes:
        return b"".join(p.read_bytes() for p in state.iterdir() if p.is_file())

    def lingering() -> bool:
        return any(value in on_disk() for older in history[:-1] for value in older)

    async with trio.open_nursery() as nursery:
        if grouped:
            await nursery.start(store.scrub_log)
        await store.run(store.create, "l", "peer", Secret.random(), Secret.random())
        for epoch in range(1, 6):
            chain, auth, out = Secret.random(), Secret.random(), Secret.random()
            history.append([chain.reveal(), auth.reveal(), out.reveal()])
            await store.run(
                partial(
                    store.commit,
                    "l",
                    epoch=epoch,
                    chain_key=chain,
                    auth_key=auth,
                    key_ids=(("src", f"id-{epoch}"),),
                    outputs={"sink": out},
                )
            )
        if grouped:
            assert lingering()  # the log still has them right after the commit ...
            with trio.fail_after(SCRUB_DELAY + 10):  # ... until the background checkpoint
                while lingering():  # noqa: ASYNC110 - polls files another thread writes
                    await trio.sleep(0.02)
        assert not lingering()
        assert all(value in on_disk() for value in history[-1])  # the scan does see keys
        nursery.cancel_scope.cancel()
    store.close()


async def test_only_a_batch_of_non_durable_writes_commits_without_an_fsync(tmp_path: Path) -> None:
    """`durable=False` lowers `synchronous` for its own batch only: FULL (2) is back for the
    next write, and a batch that also holds a durable write is durable whole."""
    from qkdagent.state import StateStore

    store = StateStore(tmp_path / "state")

    def mode() -> int:
        return int(store._db.execute("PRAGMA synchronous").fetchone()[0])

    await store.run(store.create, "l", "peer", Secret.random(), Secret.random())
    assert await store.run(mode) == 2
    assert await store.run(mode, durable=False) == 1  # NORMAL: no fsync at its commit
    assert mode() == 2 and await store.run(mode) == 2
    seen: list[tuple[bool, int]] = []

    async def queue(durable: bool) -> None:
        seen.append((durable, await store.run(mode, durable=durable)))

    async with trio.open_nursery() as nursery:
        async with store._batch_lock:  # a batch under way: both calls queue for the next
            nursery.start_soon(queue, False)
            nursery.start_soon(queue, True)
            await trio.testing.wait_all_tasks_blocked()
            assert len(store._queue) == 2
    assert sorted(seen) == [(False, 2), (True, 2)]
    store.close()


def test_peer_error_text_cannot_forge_log_lines() -> None:
    from qkdagent.text import printable

    forged = "bad\nWARNING qkdagent.link: link x: committed epoch 99\x1b[2J" + "y" * 500
    text = printable(forged)
    assert "\n" not in text and "\x1b" not in text and len(text) == 200
    assert text.startswith("bad?WARNING")


def test_a_component_is_named_once_in_an_error() -> None:
    from qkdagent.errors import SourceUnavailable, named

    assert named("source", "kme", SourceUnavailable("KME down")) == "source 'kme': KME down"
    already = SourceUnavailable("source 'kme': hub h1 is down")
    assert named("source", "kme", already) == "source 'kme': hub h1 is down"
    other = SourceUnavailable("source 'kme2': x")  # another component's name is kept apart
    assert named("source", "kme", other) == "source 'kme': source 'kme2': x"


def test_checkpoint_waits_for_a_pause_in_commits_but_never_past_scrub_delay() -> None:
    from functools import partial as bind

    from qkdagent.settle import settle_time
    from qkdagent.state import SCRUB_DELAY, SCRUB_MIN_GAP, SCRUB_QUIET

    scrub_time = bind(settle_time, quiet=SCRUB_QUIET, min_gap=SCRUB_MIN_GAP)

    latest = 100.0 + SCRUB_DELAY  # the first unscrubbed commit was at 100
    # one rotation's commits, then quiet: the checkpoint follows the pause, not SCRUB_DELAY
    assert scrub_time(100.005, -math.inf, latest) == pytest.approx(100.005 + SCRUB_QUIET)
    assert scrub_time(100.005, -math.inf, latest) < latest
    # a checkpoint just ran: steady traffic waits SCRUB_MIN_GAP to share the next one
    assert scrub_time(100.0, 99.99, latest) == pytest.approx(99.99 + SCRUB_MIN_GAP)
    # commits that never pause: SCRUB_DELAY bounds the wait all the same
    assert scrub_time(100.0 + SCRUB_DELAY - 0.001, -math.inf, latest) == latest


class _Writes:
    """A store whose writes all come "soon" after one another (`ALONE_AFTER`: an hour),
    on a gate that keeps them on the loop however slow this machine's disk is, and the
    writes that ran."""

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from qkdagent import state

        monkeypatch.setattr(state, "ALONE_AFTER", 3600.0)
        self.store = state.StateStore(path)
        self.store.gate = InlineGate(limit=math.inf, budget=math.inf, stall=math.inf)
        self.ran: list[str] = []

    def write(self, tag: str) -> str:
        self.ran.append(tag)
        return tag


def test_a_lone_write_runs_at_once_and_a_cancelled_one_never(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing under way or queued, after a quiet spell (`ALONE_AFTER`), a write commits
    inline without yielding to other tasks (a pass of the event loop on each of a rotation's
    commits); a caller already cancelled raises before writing anything. A write soon after
    another goes through the lock, where writes runnable together group: that is its one
    schedule point."""
    writes = _Writes(tmp_path / "s", monkeypatch)
    store, write = writes.store, writes.write

    async def main() -> None:
        with trio.CancelScope() as scope:  # a quiet store: the path that runs at once
            scope.cancel()
            await store.run(write, "cancelled")
        assert scope.cancelled_caught
        with ScheduleCount() as count:  # still quiet: nothing was written
            assert await store.run(write, "lone") == "lone"
        assert count.points == 0
        with ScheduleCount() as count:
            assert await store.run(write, "soon") == "soon"
        assert count.points == 1  # taking the lock; no second pass after the commit

    trio.run(main)
    store.close()
    assert writes.ran == ["lone", "soon"]


def test_a_write_without_fsync_after_one_lone_write_runs_at_once_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The responder's commit follows its pending epoch's write by a few milliseconds on every
    rotation: a write that needs no fsync, after a single lone write, commits at once (the
    pass of the loop to gather others would find none). One more, or one that must fsync, is
    a burst's and goes through the lock."""
    writes = _Writes(tmp_path / "s", monkeypatch)
    store, write = writes.store, writes.write

    async def points(tag: str, *, durable: bool) -> int:
        with ScheduleCount() as count:
            assert await store.run(write, tag, durable=durable) == tag
        return count.points

    async def main() -> None:
        assert await points("pending", durable=True) == 0  # quiet: alone
        assert await points("commit", durable=False) == 0  # after one lone write: alone
        assert await points("third", durable=False) == 1  # two batches just now: the lock
        assert await points("durable", durable=True) == 1  # the lock, whatever came before

    trio.run(main)
    store.close()
    assert writes.ran == ["pending", "commit", "third", "durable"]

    writes = _Writes(tmp_path / "t", monkeypatch)
    store, write = writes.store, writes.write

    async def after_a_batch_of_two() -> None:
        async with trio.open_nursery() as nursery:
            await store._batch_lock.acquire()  # say, a checkpoint under way: both queue
            for tag in ("a", "b"):
                nursery.start_soon(store.run, write, tag)
            await trio.testing.wait_all_tasks_blocked()
            store._batch_lock.release()
        assert await points("after", durable=False) == 1  # a burst's: the lock

    trio.run(after_a_batch_of_two)
    store.close()
    assert sorted(writes.ran[:2]) == ["a", "b"] and writes.ran[2:] == ["after"]


def test_a_batch_taken_by_a_caller_cancelled_at_the_lock_still_runs_whole(tmp_path: Path) -> None:
    """The caller handed the lock takes every queued write; cancelled in that same tick, it
    must not drop the others' writes (they would return None as if committed)."""
    import trio.testing

    from qkdagent.state import StateStore

    store = StateStore(tmp_path / "s")
    ran: list[str] = []
    results: dict[str, object] = {}

    def write(tag: str) -> str:
        ran.append(tag)
        return tag

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await store._batch_lock.acquire()  # say, a checkpoint under way
            scope_b = trio.CancelScope()

            async def b() -> None:
                with scope_b:
                    results["b"] = await store.run(write, "b")

            async def c() -> None:
                results["c"] = await store.run(write, "c")

            nursery.start_soon(b)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(c)
            await trio.testing.wait_all_tasks_blocked()
            store._batch_lock.release()  # handed to b, which takes [b, c]
            scope_b.cancel()

    trio.run(main)
    store.close()
    assert sorted(ran) == ["b", "c"]
    assert results["c"] == "c"


def test_a_caller_cancelled_after_another_batch_took_its_write_gets_its_outcome(
    tmp_path: Path,
) -> None:
    """A write that a running batch holds happens whatever becomes of its caller, so the
    caller is told how it went (as when a thread has started), not Cancelled."""
    import trio.testing

    from qkdagent.state import StateStore

    store = StateStore(tmp_path / "s")
    results: dict[str, object] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await store._batch_lock.acquire()
            scope_c = trio.CancelScope()

            async def b() -> None:
                results["b"] = await store.run(lambda: "b")

            async def c() -> None:
                with scope_c:
                    results["c"] = await store.run(lambda: "c")
                    await trio.lowlevel.checkpoint()  # where the cancellation lands
                    results["after"] = True

            nursery.start_soon(b)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(c)
            await trio.testing.wait_all_tasks_blocked()
            store._batch_lock.release()  # handed to b, which takes [b, c] ...
            await trio.lowlevel.checkpoint()
            scope_c.cancel()  # ... while c still waits for the lock

    trio.run(main)
    store.close()
    assert results == {"b": "b", "c": "c"}


def test_the_checkpoint_bound_is_scrub_delay(tmp_path: Path) -> None:
    """DESIGN §5: the WAL is checkpointed within 0.2 s of a commit (Settle keeps the bound:
    tests/test_settle.py)."""
    from qkdagent.state import SCRUB_DELAY, StateStore

    store = StateStore(tmp_path / "s")
    assert SCRUB_DELAY <= 0.2
    assert store._scrub.bound == SCRUB_DELAY
    store.close()


def test_the_background_checkpoint_leaves_a_started_log_without_keys(tmp_path: Path) -> None:
    """After the checkpoint the log is laid down again, keyless padding started by a commit
    holding no key, so the next rotation's commit neither pays the log header's extra fsync
    nor extends the file (issue 18); superseded keys are gone from every file all the same,
    and the log holds none."""
    from qkdagent.state import SCRUB_DELAY, WAL_PAD_MIN, LinkRecord, Pending, StateStore

    state = tmp_path / "state"
    store = StateStore(state)
    wal = state / "state.db-wal"
    old, new, newer = Secret.random(), Secret.random(), Secret.random()

    def files() -> bytes:
        return b"".join(p.read_bytes() for p in state.iterdir() if p.is_file())

    def commit(epoch: int, chain_key: Secret) -> partial[LinkRecord]:
        """A responder's rotation as it reaches the store: the pending epoch with its key IDs
        marked used, then its commit with the sink outputs (about ten log pages)."""
        outputs = {"psk": Secret.random()}
        key_ids = (("src", f"id-{epoch}"),)
        pending = Pending(epoch, "rotate", b"d" * 32, key_ids, chain_key, Secret.random(),
                          Secret.random(), b"t" * 32, outputs, b"{}" * 200, 0.0)  # fmt: skip

        def both() -> LinkRecord:
            store.store_pending("l", pending, mark_used=True)
            return store.commit("l", epoch=epoch, chain_key=chain_key, auth_key=Secret.random(),
                                key_ids=key_ids, outputs=outputs)  # fmt: skip

        return partial(both)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.scrub_log)
            await store.run(store.create, "l", "peer", old, Secret.random())
            await store.run(commit(1, new))
            with trio.fail_after(SCRUB_DELAY + 10):
                while old.reveal() in files() or new.reveal() in wal.read_bytes():  # noqa: ASYNC110
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()  # (the checkpoint under way on its thread finishes)

    trio.run(main)
    padded = wal.stat().st_size
    assert padded >= WAL_PAD_MIN and new.reveal() not in wal.read_bytes()
    assert wal.read_bytes()[:4] in (b"\x37\x7f\x06\x82", b"\x37\x7f\x06\x83")  # started
    full = 2
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == full  # commits stay durable
    assert new.reveal() in files()  # the scan does see the current key (in the database)

    async def again() -> None:
        await store.run(commit(2, newer))

    trio.run(again)
    assert wal.stat().st_size == padded  # written over the padding, not appended
    assert newer.reveal() in wal.read_bytes()
    # the log holds the counter's frame and this commit's, nothing older
    _, frames, _ = store._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert 1 < frames < 10
    store.close()


def test_a_log_of_zeros_reads_as_empty_and_commits_over_it_survive_a_crash(
    tmp_path: Path,
) -> None:
    """The checkpoint writes zeros into the emptied log (issue 18): a copy of the files taken
    at any point after (what a crash leaves) opens with every commit made, the zeros read as
    no log at all, and a commit written over them is found."""
    import shutil

    from qkdagent.state import WAL_PAD_MIN, StateStore, _Job, _zero_empty_log

    state = tmp_path / "state"
    store = StateStore(state)
    store.create("l", "peer", Secret.random(), Secret.random())
    store.commit("l", epoch=1, chain_key=Secret.random(), auth_key=Secret.random(),
                 key_ids=(("src", "id-1"),), outputs={})  # fmt: skip

    def crash_copy(name: str) -> StateStore:
        copy = tmp_path / name
        copy.mkdir(mode=0o700)
        for file in ("state.db", "state.db-wal"):
            shutil.copy2(state / file, copy / file)
        return StateStore(copy)

    assert store._checkpoint()  # the log emptied...
    _zero_empty_log(state / "state.db-wal", WAL_PAD_MIN)  # ...and laid down again
    assert (state / "state.db-wal").read_bytes() == bytes(WAL_PAD_MIN)
    copy = crash_copy("zeros")
    record = copy.load("l")
    assert record is not None and record.epoch == 1
    copy.close()

    commit = partial(store.commit, "l", epoch=2, chain_key=Secret.random(),
                     auth_key=Secret.random(), key_ids=(("src", "id-2"),), outputs={},
                     mark_used=True)  # fmt: skip
    store._run_batch([_Job(commit, ())])  # as the agent commits: no checkpoint after it
    assert (state / "state.db-wal").stat().st_size == WAL_PAD_MIN  # written over the zeros
    copy = crash_copy("over-zeros")
    record = copy.load("l")
    assert record is not None and record.epoch == 2
    assert copy.is_used("l", "src", "id-2")
    copy.close()
    store.close()


def test_commits_like_the_last_checkpoints_never_extend_the_log(tmp_path: Path) -> None:
    """The zeros cover what the commits since the last checkpoint wrote, frame and log headers
    and the counter's frame included: the same commits again (well over `WAL_PAD_MIN`) write
    over them in place, cycle after cycle (first review of issue 18's zeros)."""
    from qkdagent.state import WAL_PAD_MIN, StateStore, _Job

    state = tmp_path / "state"
    store = StateStore(state)
    wal = state / "state.db-wal"
    links = [f"link-{n}" for n in range(6)]
    for name in links:
        store.create(name, "peer", Secret.random(), Secret.random())
    grown: list[bool] = []
    for cycle in range(1, 6):
        before = wal.stat().st_size
        for name in links:
            commit = partial(store.commit, name, epoch=cycle, chain_key=Secret.random(),
                             auth_key=Secret.random(), key_ids=(("src", f"{name}-{cycle}"),),
                             outputs={"psk": Secret.random(), "other": Secret.random()},
                             mark_used=True)  # fmt: skip
            store._run_batch([_Job(commit, ())])
        grown.append(wal.stat().st_size > before)
        assert wal.stat().st_size > WAL_PAD_MIN or cycle == 1  # more than the minimum
        store._checkpoint_and_warm()
    assert grown == [True, False, False, False, False]
    store.close()


def test_the_padding_of_earlier_versions_is_dropped_and_zeroed(tmp_path: Path) -> None:
    """A state file written by a version that padded the log through a table (`wal_pad`) loses
    that table when opened, its pages zeroed (`secure_delete`): nothing of it lingers."""
    import sqlite3

    from qkdagent.state import StateStore

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    marker = b"earlier-padding-" * 60  # (within one page)
    db = sqlite3.connect(state / "state.db", isolation_level=None)
    db.execute("CREATE TABLE wal_pad (id INTEGER PRIMARY KEY, pad BLOB NOT NULL)")
    db.execute("INSERT INTO wal_pad VALUES (1, ?)", (marker,))
    db.close()
    (state / "state.db").chmod(0o600)
    assert marker in (state / "state.db").read_bytes()
    store = StateStore(state)
    tables = {row[0] for row in store._db.execute("SELECT name FROM sqlite_master")}
    store.close()
    assert "wal_pad" not in tables
    assert marker[:32] not in b"".join(p.read_bytes() for p in state.iterdir() if p.is_file())


def test_only_an_empty_log_gets_zeros(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The zeros go only into a log the checkpoint emptied: never over frames SQLite wrote."""
    from qkdagent import state as state_module

    log = tmp_path / "log"
    log.write_bytes(b"frames")
    state_module._zero_empty_log(log, 4096)
    assert log.read_bytes() == b"frames"

    store = state_module.StateStore(tmp_path / "s")
    store.create("l", "peer", Secret.random(), Secret.random())
    zeroed: list[int] = []
    monkeypatch.setattr(state_module, "_zero_empty_log", lambda path, size: zeroed.append(size))
    monkeypatch.setattr(store, "_checkpoint", lambda: False)  # a checkpoint that did not finish
    store._checkpoint_and_warm()
    assert zeroed == []
    monkeypatch.undo()
    monkeypatch.setattr(state_module, "_zero_empty_log", lambda path, size: zeroed.append(size))
    store._checkpoint_and_warm()
    assert zeroed == [state_module.WAL_PAD_MIN]
    store.close()


@pytest.mark.parametrize(
    ("text", "digits", "value"),
    [
        ("0", 5, 0),
        ("65535", 5, 65535),
        ("007", 3, 7),
        ("123456", 5, None),  # too many digits for the caller
        ("", 5, None),
        ("\u00b2", 5, None),  # str.isdigit() passes it; int() refuses it
        ("\u0663", 5, None),  # an Arabic-Indic three: int() reads it, but it is not ASCII
        ("9" * 5000, 10_000, None),  # within the caller's bound, over int()'s
        ("-1", 5, None),
        (" 1", 5, None),
        ("1_0", 5, None),
    ],
)
def test_decimal_reads_only_bounded_ascii_digits(text: str, digits: int, value: int | None) -> None:
    assert decimal(text, digits) == value


def test_used_key_ids_are_remembered_up_to_the_retention_and_pruned_in_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each link keeps its last `keep_used_ids` (`[agent] used_key_ids_kept`) used IDs at
    least, and at most `USED_KEY_ID_PRUNE` more: a recent ID is still refused, an old one
    forgotten."""
    from qkdagent import state as state_module
    from qkdagent.errors import KeyReuseError

    monkeypatch.setattr(state_module, "USED_KEY_ID_PRUNE", 8)
    store = state_module.StateStore(tmp_path / "s", keep_used_ids=100)
    chain, auth = Secret.random(), Secret.random()
    store.create("a", "peer", chain, auth)
    store.create("b", "peer", chain, auth)
    kept: list[int] = []
    for epoch in range(1, 151):  # two IDs per commit
        ids = (("q", f"k{2 * epoch}"), ("r", f"k{2 * epoch + 1}"))
        store.commit("a", epoch=epoch, chain_key=chain, auth_key=auth, key_ids=ids,
                     outputs={}, mark_used=True)  # fmt: skip
        kept.append(store._db.execute("SELECT COUNT(*) FROM used_key_ids").fetchone()[0])
    assert 100 < max(kept) <= 100 + 8 and min(kept[50:]) >= 100  # pruned in steps
    assert kept[-1] < 2 * 150  # pruned at all
    assert not store.is_used("a", "q", "k2") and store.is_used("a", "r", "k301")
    assert all(store.is_used("a", "q" if i % 2 == 0 else "r", f"k{i}") for i in range(202, 302))
    with pytest.raises(KeyReuseError):
        store.commit("a", epoch=151, chain_key=chain, auth_key=auth, key_ids=(("q", "k250"),),
                     outputs={}, mark_used=True)  # fmt: skip
    with pytest.raises(KeyReuseError, match="another link"):  # lately used on "a"
        store.commit("b", epoch=1, chain_key=chain, auth_key=auth, key_ids=(("q", "k300"),),
                     outputs={}, mark_used=True)  # fmt: skip
    store.close()


def test_a_key_id_another_link_used_lately_is_refused_also_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: the used-key table's key is per link, so a source handing one key to
    two links had it used on both. The newest `RECENT_USED_IDS` IDs of every link are kept
    in memory (read back from the table at start) and refused on any other link."""
    from qkdagent import state as state_module
    from qkdagent.errors import KeyReuseError

    monkeypatch.setattr(state_module, "RECENT_USED_IDS", 5)
    chain, auth = Secret.random(), Secret.random()

    def mark(store: state_module.StateStore, link: str, epoch: int, key_id: str) -> None:
        store.commit(link, epoch=epoch, chain_key=chain, auth_key=auth,
                     key_ids=(("q", key_id),), outputs={}, mark_used=True)  # fmt: skip

    store = state_module.StateStore(tmp_path / "s")
    store.create("a", "peer", chain, auth)
    store.create("b", "peer", chain, auth)
    mark(store, "a", 1, "k1")
    with pytest.raises(KeyReuseError, match="used by another link"):
        mark(store, "b", 1, "k1")
    assert store.load("b").epoch == 0 and not store.is_used("b", "q", "k1")  # type: ignore[union-attr]
    mark(store, "b", 1, "k2")  # its own IDs are fine
    store.close()
    store = state_module.StateStore(tmp_path / "s")  # read back at start
    with pytest.raises(KeyReuseError, match="used by another link"):
        mark(store, "b", 2, "k1")
    for epoch in range(2, 7):  # five newer IDs push k1 out of the window
        mark(store, "a", epoch, f"n{epoch}")
    mark(store, "b", 2, "k1")
    store.close()


def test_a_lowered_retention_is_reached_in_bounded_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After `used_key_ids_kept` is lowered, each prune deletes at most
    `USED_KEY_ID_PRUNE_MAX` of the oldest IDs (not the old retention's worth in one commit),
    until the link is down to the new retention; the IDs it keeps are the newest."""
    from qkdagent import state as state_module
    from qkdagent.errors import KeyReuseError

    monkeypatch.setattr(state_module, "USED_KEY_ID_PRUNE", 8)
    monkeypatch.setattr(state_module, "USED_KEY_ID_PRUNE_MAX", 20)
    chain, auth = Secret.random(), Secret.random()

    def mark(store: state_module.StateStore, epoch: int) -> int:
        store.commit("a", epoch=epoch, chain_key=chain, auth_key=auth,
                     key_ids=(("q", f"k{epoch}"),), outputs={}, mark_used=True)  # fmt: skip
        return int(store._db.execute("SELECT COUNT(*) FROM used_key_ids").fetchone()[0])

    store = state_module.StateStore(tmp_path / "s", keep_used_ids=1000)
    store.create("a", "peer", chain, auth)
    counts = [mark(store, epoch) for epoch in range(1, 301)]
    assert counts[-1] == 300  # all kept under the first retention
    store.close()
    store = state_module.StateStore(tmp_path / "s", keep_used_ids=100)
    counts = [mark(store, epoch) for epoch in range(301, 501)]
    steps = [before - after + 1 for before, after in itertools.pairwise(counts)]
    assert max(steps) == 20  # a prune deletes the bound, no more
    assert counts[7] > 300 - 20  # not all of it in the first prune
    assert 100 <= counts[-1] <= 100 + 8
    assert not store.is_used("a", "q", "k300") and store.is_used("a", "q", "k401")
    with pytest.raises(KeyReuseError):
        mark(store, 450)
    store.close()


def test_the_used_ids_footprint_estimate_is_near_what_the_table_takes(tmp_path: Path) -> None:
    """`used_ids_footprint` against a real table of UUID key IDs (two links, two names and
    source lengths), and the warning it leads to only when it crowds the room."""
    from qkdagent import state as state_module

    store = state_module.StateStore(tmp_path / "s")
    links = [("alice-bob", ["kme"]), ("a-much-longer-link-name-0001", ["qkd-module-east"])]
    chain, auth = Secret.random(), Secret.random()
    for name, _ in links:
        store.create(name, "peer", chain, auth)
    store._checkpoint()
    before = store.path.stat().st_size
    keep = 3000
    for name, (source,) in links:
        for start in range(0, keep, 500):
            store.commit(name, epoch=start + 1, chain_key=chain, auth_key=auth,
                         key_ids=tuple((source, str(uuid.uuid4())) for _ in range(500)),
                         outputs={}, mark_used=True)  # fmt: skip
    store._checkpoint()
    grown = store.path.stat().st_size - before
    estimate = state_module.used_ids_footprint(links, keep)
    assert 0.75 * grown <= estimate <= 1.3 * grown
    store.close()
    warn = state_module.used_ids_room_warning
    assert warn(estimate, free=2 * estimate, held=0, keep=keep) is None
    message = warn(estimate, free=estimate, held=estimate // 2, keep=keep)
    assert message is not None and "used_key_ids_kept" in message and "3,000" in message


@pytest.mark.parametrize("arrival", ["behind-a-batch", "together", "one-after-another"])
def test_a_reused_key_id_in_a_group_commit_changes_nothing_and_the_others_commit(
    tmp_path: Path, arrival: str
) -> None:
    """Key reuse is refused by the used-key table's primary key: a rotation naming a new and
    a used key ID marks neither (its savepoint rolls back the insert made before the refusal),
    and the rotations sharing its group commit still commit. Writes that queue behind a batch
    under way, or that are runnable at once, share one commit (the first of a quiet store
    commits at once, alone); one written after another commits alone."""
    from qkdagent.errors import KeyReuseError
    from qkdagent.state import StateStore

    store = StateStore(tmp_path / "s")
    chain, auth = Secret.random(), Secret.random()
    store.create("a", "peer", chain, auth)
    store.create("b", "peer", chain, auth)
    store.create("c", "peer", chain, auth)
    store.commit("a", epoch=1, chain_key=chain, auth_key=auth, key_ids=(("q", "used"),),
                 outputs={}, mark_used=True)  # fmt: skip

    def commit(link: str, epoch: int, ids: tuple[tuple[str, str], ...]) -> partial[object]:
        keys = {"chain_key": Secret.random(), "auth_key": Secret.random()}
        return partial(store.commit, link, epoch=epoch, key_ids=ids, outputs={}, mark_used=True,
                       **keys)  # fmt: skip

    async def main() -> list[object]:
        results: list[object] = [None, None]

        async def one(i: int, job: partial[object]) -> None:
            try:
                results[i] = await store.run(job)
            except KeyReuseError as exc:
                results[i] = exc

        lock = store._batch_lock
        first = commit("a", 2, (("p", "new"), ("q", "used")))
        second = commit("b", 1, (("q", "fresh"),))
        if arrival == "one-after-another":
            await one(0, first)
            await one(1, second)
            return results
        async with trio.open_nursery() as nursery:
            if arrival == "behind-a-batch":
                await lock.acquire()
            else:  # three runnable at once: the first commits at once, the others together
                nursery.start_soon(store.run, commit("c", 1, (("q", "other"),)))
            nursery.start_soon(one, 0, first)
            nursery.start_soon(one, 1, second)
            if arrival == "behind-a-batch":
                await trio.testing.wait_all_tasks_blocked()
                lock.release()
        return results

    batches: list[int] = []
    run_batch = store._run_batch
    store._run_batch = lambda batch: (batches.append(len(batch)), run_batch(batch))[1]  # type: ignore[method-assign]
    refused, committed = trio.run(main)
    assert (
        batches == {"behind-a-batch": [2], "together": [1, 2], "one-after-another": [1, 1]}[arrival]
    )
    assert isinstance(refused, KeyReuseError) and "'used'" in str(refused)
    assert not isinstance(committed, Exception) and store.load("b").epoch == 1
    assert store.load("a").epoch == 1  # unchanged
    assert not store.is_used("a", "p", "new")  # the insert before the refusal rolled back
    assert store.is_used("a", "q", "used") and store.is_used("b", "q", "fresh")
    store.close()
