"""The built-in `file` and `exec` sinks and the `memory` and `keydir` sources against the
contracts."""

from __future__ import annotations

import base64
import contextlib
import math
import os
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

import qkdagent.builtin.file_sink as file_sink_module
from qkdagent import KeyMeta, Link, PluginContext, Secret, fileutil
from qkdagent.builtin import file_spares
from qkdagent.builtin.exec_sink import ExecSink
from qkdagent.builtin.file_sink import FileSink
from qkdagent.errors import Misconfigured, SinkError
from qkdagent.options import Options
from qkdagent.testing import (
    KeyDirSource,
    MemorySource,
    SinkContract,
    SourceContract,
    build_component,
)

LINK = Link("contract", "alice", "bob", True)


def _ctx(tmp_path: Path) -> PluginContext:
    return PluginContext("alice", tmp_path / "state")


def _file_sink(tmp_path: Path, **options: object) -> FileSink:
    opts = Options({"path": str(tmp_path / "{peer}.key"), **options}, where="sinks.f")
    sink = FileSink("f", opts, _ctx(tmp_path))
    opts.finish()
    return sink


class TestFileSink(SinkContract):
    sink_class = FileSink

    @pytest.fixture
    def sink_options(self, tmp_path: Path) -> dict[str, object]:
        return {"path": str(tmp_path / "{peer}.key")}

    @pytest.fixture
    def read_back(self, tmp_path: Path):
        async def read(link: Link) -> bytes | None:
            path = tmp_path / f"{link.peer}.key"
            return base64.b64decode(path.read_bytes()) if path.exists() else None

        return read


@pytest.mark.parametrize(("fmt", "newline"), [("base64", False), ("hex", True), ("raw", False)])
async def test_file_formats_and_mode(tmp_path: Path, fmt: str, newline: bool) -> None:
    sink = _file_sink(tmp_path, format=fmt, newline=newline)
    secret = Secret(os.urandom(32))
    await sink.install(LINK, secret, KeyMeta(1, ("k",), "file", time.time()))
    data = (tmp_path / "bob.key").read_bytes()
    expected = {
        "base64": base64.b64encode(secret.reveal()),
        "hex": secret.reveal().hex().encode() + b"\n",
        "raw": secret.reveal(),
    }[fmt]
    assert data == expected
    assert stat.S_IMODE((tmp_path / "bob.key").stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bob.key")]  # no temp left


async def test_file_sink_erase_remove(tmp_path: Path) -> None:
    sink = _file_sink(tmp_path, on_erase="remove")
    await sink.install(LINK, Secret(os.urandom(32)), KeyMeta(1, ("k",), "file", 0))
    await sink.erase(LINK, "test")
    assert not (tmp_path / "bob.key").exists()


async def test_file_sink_creates_missing_directories_0700_only_when_asked(
    tmp_path: Path,
) -> None:
    meta = KeyMeta(1, ("k",), "file", 0)
    fixed = {"path": str(tmp_path / "a" / "b" / "bob.key")}
    plain = FileSink("f", Options(fixed, where="sinks.f"), _ctx(tmp_path))
    with pytest.raises(Misconfigured, match="does not exist"):
        await plain.prepare()
    assert not (tmp_path / "a").exists()
    old = os.umask(0o022)
    try:
        creating = FileSink(
            "f", Options({**fixed, "create_dirs": True}, where="sinks.f"), _ctx(tmp_path)
        )
        await creating.prepare()  # a fixed directory is made at start-up
        templated = _file_sink(tmp_path / "t" / "{link}", create_dirs=True)
        await templated.prepare()  # a templated one only once the link is known
        assert not (tmp_path / "t").exists()
        await templated.install(LINK, Secret(os.urandom(32)), meta)
    finally:
        os.umask(old)
    for directory in ("a", "a/b", "t", "t/contract"):
        assert stat.S_IMODE((tmp_path / directory).stat().st_mode) == 0o700, directory
    assert (tmp_path / "t" / "contract" / "bob.key").exists()


async def test_a_relative_file_sink_path_resolves_against_the_config_directory(
    tmp_path: Path,
) -> None:
    opts = Options({"path": "keys/bob.key", "create_dirs": True}, where="s", base_dir=tmp_path)
    sink = FileSink("f", opts, _ctx(tmp_path))
    await sink.prepare()
    await sink.install(LINK, Secret(os.urandom(32)), KeyMeta(1, ("k",), "file", 0))
    assert (tmp_path / "keys" / "bob.key").exists()


HOOK = """#!/bin/sh
# test hook: keeps stdin, argv and the environment for inspection
cat > "$OUT/stdin"
echo "$@" > "$OUT/argv"
env > "$OUT/env"
exit ${FAIL:-0}
"""


@pytest.fixture
def hook(tmp_path: Path) -> Path:
    path = tmp_path / "hook.sh"
    path.write_text(HOOK)
    path.chmod(0o700)
    (tmp_path / "out").mkdir()
    return path


def _exec_options(tmp_path: Path, hook: Path, **options: object) -> dict[str, object]:
    env = {"OUT": str(tmp_path / "out"), **options.pop("env", {})}  # type: ignore[dict-item]
    return {"type": "exec", "command": [str(hook), "arg1"], "env": env, **options}


def _exec_sink(tmp_path: Path, hook: Path, **options: object) -> ExecSink:
    table = _exec_options(tmp_path, hook, **options)
    return build_component(ExecSink, table, name="e", state_dir=tmp_path / "state")


class TestExecSink(SinkContract):
    sink_class = ExecSink

    @pytest.fixture
    def sink_options(self, tmp_path: Path, hook: Path) -> dict[str, object]:
        return _exec_options(tmp_path, hook)

    @pytest.fixture
    def read_back(self, tmp_path: Path):
        async def read(link: Link) -> bytes | None:
            path = tmp_path / "out" / "stdin"
            return base64.b64decode(path.read_bytes()) if path.exists() else None

        return read


async def test_exec_hook_gets_secret_on_stdin_only(tmp_path: Path, hook: Path) -> None:
    sink = _exec_sink(tmp_path, hook, format="hex")
    secret = Secret(os.urandom(32))
    await sink.install(LINK, secret, KeyMeta(7, ("id-1", "id-2"), "exec", time.time()))
    out = tmp_path / "out"
    assert (out / "stdin").read_text() == secret.reveal().hex() + "\n"
    env = (out / "env").read_text()
    argv = (out / "argv").read_text()
    for text in (env, argv):
        assert secret.reveal().hex() not in text
        assert base64.b64encode(secret.reveal()).decode() not in text
    assert "QKDAGENT_EPOCH=7" in env and "QKDAGENT_KEY_IDS=id-1,id-2" in env
    assert "QKDAGENT_ACTION=install" in env and "QKDAGENT_LINK=contract" in env
    assert argv.strip() == "arg1"


async def test_exec_failure_and_timeout_are_install_failures(tmp_path: Path, hook: Path) -> None:
    failing = _exec_sink(tmp_path, hook, env={"FAIL": "3"})
    with pytest.raises(SinkError, match="exited with 3"):
        await failing.install(LINK, Secret(os.urandom(32)), KeyMeta(1, ("k",), "exec", 0))
    slow_hook = tmp_path / "slow.sh"
    slow_hook.write_text("#!/bin/sh\nsleep 5\n")
    slow_hook.chmod(0o700)
    opts = Options({"command": [str(slow_hook)], "run_timeout": 0.2}, where="sinks.e")
    slow = ExecSink("e", opts, _ctx(tmp_path))
    with pytest.raises(SinkError, match="timed out"):
        await slow.install(LINK, Secret(os.urandom(32)), KeyMeta(1, ("k",), "exec", 0))


def test_exec_refuses_agent_variables_in_env(tmp_path: Path) -> None:
    from qkdagent.errors import ConfigError

    opts = Options({"command": [sys.executable], "env": {"QKDAGENT_EPOCH": "1"}}, where="sinks.e")
    with pytest.raises(ConfigError, match="QKDAGENT_EPOCH"):
        ExecSink("e", opts, _ctx(tmp_path))


class TestMemorySource(SourceContract):
    source_class = MemorySource

    @pytest.fixture
    def source_options(self) -> dict[str, object]:
        return {"pool": f"contract-{os.getpid()}-{time.monotonic_ns()}"}


class TestKeyDirSource(SourceContract):
    source_class = KeyDirSource

    @pytest.fixture
    def source_options(self, tmp_path: Path) -> dict[str, object]:
        return {"type": "keydir", "directory": str(tmp_path / "shared")}


# -- durability of the file sink ---------------------------------------------------------------


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths fsync'd (files and directories), in order, from any thread."""
    synced: list[str] = []
    real = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return synced


async def _synced(fsyncs: list[str], *paths: Path) -> None:
    with trio.fail_after(10):
        while not all(str(p) in fsyncs for p in paths):  # noqa: ASYNC110 - a worker thread
            await trio.sleep(0.005)


async def test_file_sink_without_its_task_installs_durably(
    tmp_path: Path, fsyncs: list[str]
) -> None:
    sink = _file_sink(tmp_path)
    await sink.install(LINK, Secret(os.urandom(32)), KeyMeta(1, ("k",), "file", 0))
    assert fsyncs and fsyncs[-1] == str(tmp_path)  # the directory, after the file's data
    assert any(p.startswith(str(tmp_path / ".bob.key.")) for p in fsyncs)


async def test_file_sink_task_makes_installs_durable_after_they_return(
    tmp_path: Path, fsyncs: list[str]
) -> None:
    sink = _file_sink(tmp_path)
    secret = Secret(os.urandom(32))
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        await sink.install(LINK, secret, KeyMeta(1, ("k",), "file", 0))
        # in place at once, for any reader; its fsync comes from the task
        assert base64.b64decode((tmp_path / "bob.key").read_bytes()) == secret.reveal()
        await _synced(fsyncs, tmp_path / "bob.key", tmp_path)
        nursery.cancel_scope.cancel()
    assert fsyncs.index(str(tmp_path / "bob.key")) < fsyncs.index(str(tmp_path))


def _spares(directory: Path) -> dict[str, int]:
    """The spare files in `directory`, by name, with their inodes."""
    prefix = fileutil.SPARE_PREFIX
    return {p.name: p.stat().st_ino for p in directory.iterdir() if p.name.startswith(prefix)}


def _held(directory: Path) -> list[str]:
    """What this process holds open of key files in `directory` no longer named (the files
    installs replaced)."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
    return [link for link in links if link == f"{directory / 'bob.key'} (deleted)"]


def _ready(sink: FileSink, directory: Path) -> int:
    """Spares the sink has ready for `directory` (made, and handed back by its task)."""
    return len(sink._spares._spares.get(directory, []))


async def _until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not condition():  # noqa: ASYNC110 - the sink's task works on a thread
            await trio.sleep(0.005)


async def test_file_sink_installs_through_spares_its_task_makes(tmp_path: Path) -> None:
    """The second install writes into a spare made by the task after the first, holding the
    file it replaced until the task closes it; the task's stop leaves nothing behind. A
    spare left by an earlier run is removed."""
    stale = tmp_path / f"{fileutil.SPARE_PREFIX}crashed.tmp"
    stale.write_bytes(b"")
    sink = _file_sink(tmp_path)
    key = tmp_path / "bob.key"
    secrets = [Secret(os.urandom(32)) for _ in range(3)]
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        await sink.install(LINK, secrets[0], KeyMeta(1, ("k",), "file", 0))  # none ready yet
        await _until(lambda: _ready(sink, tmp_path) == file_spares.SPARES_PER_DIRECTORY)
        assert len(_spares(tmp_path)) == file_spares.SPARES_PER_DIRECTORY
        assert not stale.exists()
        spares = set(_spares(tmp_path).values())
        for n in (1, 2):
            await sink.install(LINK, secrets[n], KeyMeta(n + 1, ("k",), "file", 0))
            assert base64.b64decode(key.read_bytes()) == secrets[n].reveal()
            assert key.stat().st_ino in spares and stat.S_IMODE(key.stat().st_mode) == 0o600
            spares.discard(key.stat().st_ino)
            assert _held(tmp_path) == [f"{key} (deleted)"]  # the previous key, until the task runs
            await _until(lambda: not _held(tmp_path))
            await _until(lambda: _ready(sink, tmp_path) == file_spares.SPARES_PER_DIRECTORY)
            spares |= set(_spares(tmp_path).values())
        nursery.cancel_scope.cancel()
    assert _spares(tmp_path) == {} and not _held(tmp_path)


async def test_an_erase_lets_go_of_every_replaced_file_first(tmp_path: Path) -> None:
    """Fail closed: once an erase returns, no earlier key of the sink is held in a file
    an install replaced (the task, which would close it later, is held up here)."""
    sink = _file_sink(tmp_path)
    await sink.install(LINK, Secret(os.urandom(32)), KeyMeta(1, ("k",), "file", 0))
    sink._spares.add({tmp_path: [fileutil.create_spare(tmp_path)]})
    sink._syncing = True  # as while its task runs, which does not get to close anything
    await sink.install(LINK, Secret(os.urandom(32)), KeyMeta(2, ("k",), "file", 0))
    assert _held(tmp_path) == [f"{tmp_path / 'bob.key'} (deleted)"]
    await sink.erase(LINK, "test")
    assert not _held(tmp_path)
    sink._syncing = False
    file_spares.discard(sink._spares.drain())


async def test_an_erase_during_a_task_pass_neither_waits_for_it_nor_leaves_a_key_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review findings: an erase could return while a pass of the task still held an
    earlier key (taken, to be closed after its fsyncs), and then it waited for those
    fsyncs. A pass closes what it takes at once; an erase closes the rest at once."""
    import threading

    sink = _file_sink(tmp_path)
    in_sync, go_on = threading.Event(), threading.Event()
    synced_after_erase: list[bool] = []
    real = file_sink_module.sync_written

    def stalled(paths: list[Path]) -> None:
        in_sync.set()
        go_on.wait(30)
        real(paths)

    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        await sink.install(LINK, Secret(os.urandom(32)), KeyMeta(1, ("k",), "file", 0))
        await _until(lambda: _ready(sink, tmp_path) == file_spares.SPARES_PER_DIRECTORY)
        monkeypatch.setattr(file_sink_module, "sync_written", stalled)
        await sink.install(LINK, Secret(os.urandom(32)), KeyMeta(2, ("k",), "file", 0))
        assert len(_held(tmp_path)) == 1
        await trio.to_thread.run_sync(in_sync.wait, 10)  # the pass is in its fsyncs ...
        assert not _held(tmp_path)  # ... having closed the file it took first
        await sink.install(LINK, Secret(os.urandom(32)), KeyMeta(3, ("k",), "file", 0))
        assert len(_held(tmp_path)) == 1
        await sink.erase(LINK, "test")
        synced_after_erase.append(go_on.is_set())
        assert not _held(tmp_path)
        go_on.set()
        nursery.cancel_scope.cancel()
    assert synced_after_erase == [False]  # the erase did not wait for the stalled pass


async def test_a_stalled_last_fsync_does_not_hold_up_the_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The task's last pass (its fsyncs) is bounded by FINAL_SYNC_TIMEOUT: a disk stalled for
    minutes (seen on this VM) must not hold up the agent's stop."""
    import threading

    monkeypatch.setattr(file_sink_module, "FINAL_SYNC_TIMEOUT", 0.2)
    monkeypatch.setattr(file_sink_module, "SYNC_DELAY", 3600.0)  # only the last pass syncs
    monkeypatch.setattr(file_sink_module, "SYNC_QUIET", 3600.0)
    sink = _file_sink(tmp_path)
    in_sync, go_on, finished = threading.Event(), threading.Event(), threading.Event()
    real = file_sink_module.sync_written

    def stalled(paths: list[Path]) -> None:
        in_sync.set()
        go_on.wait(120)
        real(paths)
        finished.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        monkeypatch.setattr(file_sink_module, "sync_written", stalled)
        await sink.install(LINK, Secret(os.urandom(32)), KeyMeta(1, ("k",), "file", 0))
        nursery.cancel_scope.cancel()
    stopped_before_the_fsync_ended = not finished.is_set()
    go_on.set()
    assert in_sync.is_set() and stopped_before_the_fsync_ended
    assert "not made durable within 0.2 s" in caplog.text
    assert (tmp_path / "bob.key").stat().st_mode & 0o777 == 0o600
    await trio.to_thread.run_sync(finished.wait, 10)  # the fsync still ends on its own


async def test_a_spare_taken_by_an_install_cancelled_after_the_task_stopped_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: an install cancelled together with the sink's task put its unused
    spare back into a pool the task's last pass had already emptied."""
    from qkdagent.inline import CACHE, loop_gate

    sink = _file_sink(tmp_path)
    sink._spares.add({tmp_path: [fileutil.create_spare(tmp_path)]})
    sink._syncing = True

    class Cancelled(BaseException):
        """Stands for trio's, which only trio raises."""

    async def stopped_then_cancelled(fn: Callable[[], object]) -> object:
        sink._syncing = False  # the task's last pass ran meanwhile
        raise Cancelled  # as the gate's check would, before the write

    monkeypatch.setattr(loop_gate(CACHE), "run", stopped_then_cancelled)
    with pytest.raises(Cancelled):
        await sink.install(LINK, Secret(os.urandom(32)), KeyMeta(1, ("k",), "file", 0))
    assert _spares(tmp_path) == {} and sink._spares.drain() == []


async def test_a_cancelled_install_loses_no_spare_and_no_held_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: an install cancelled around its write lost the spare it took (or the
    file it replaced): every spare on disk stays the pool's, every held file too."""
    import threading

    from qkdagent.inline import CACHE, loop_gate

    gate = loop_gate(CACHE)
    sink = _file_sink(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        await sink.install(LINK, Secret(os.urandom(32)), KeyMeta(1, ("k",), "file", 0))
        await _until(lambda: _ready(sink, tmp_path) == file_spares.SPARES_PER_DIRECTORY)
        for epoch in (2, 3):
            with trio.CancelScope() as scope:
                scope.cancel()  # before the write (the gate checks first) ...
                await sink.install(LINK, Secret(os.urandom(32)), KeyMeta(epoch, ("k",), "f", 0))
            assert _ready(sink, tmp_path) == len(_spares(tmp_path))
        with trio.CancelScope() as scope:  # ... and while it runs on a thread
            monkeypatch.setattr(gate, "_threaded_until", math.inf)
            started, go_on = threading.Event(), threading.Event()
            real = file_sink_module.write_via_spare

            def slow(spare: fileutil.Spare, target: Path, data: bytes) -> int | None:
                started.set()
                go_on.wait(120)
                return real(spare, target, data)

            monkeypatch.setattr(file_sink_module, "write_via_spare", slow)
            async with trio.open_nursery() as inner:
                inner.start_soon(
                    sink.install, LINK, Secret(os.urandom(32)), KeyMeta(4, ("k",), "f", 0)
                )
                await trio.to_thread.run_sync(started.wait, 5)
                scope.cancel()
                go_on.set()
        monkeypatch.setattr(gate, "_threaded_until", -1.0)
        assert _ready(sink, tmp_path) == len(_spares(tmp_path)) == 1  # one used, none lost
        assert len(_held(tmp_path)) == len(sink._spares._held) == 1  # the pool's, to close
        nursery.cancel_scope.cancel()
    assert not _held(tmp_path) and _spares(tmp_path) == {}


async def test_an_install_on_a_thread_across_the_task_stop_leaves_nothing_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: an install on a worker thread when the sink's task stopped for good
    added its replaced file to the pool after the task's last pass."""
    import threading

    from qkdagent.inline import CACHE, loop_gate

    sink = _file_sink(tmp_path)
    in_thread = threading.Event()
    go_on = threading.Event()
    real = file_sink_module.write_via_spare

    def slow(spare: fileutil.Spare, target: Path, data: bytes) -> int | None:
        in_thread.set()
        go_on.wait(120)
        return real(spare, target, data)

    gate = loop_gate(CACHE)
    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            await sink.install(LINK, Secret(os.urandom(32)), KeyMeta(1, ("k",), "file", 0))
            await _until(lambda: _ready(sink, tmp_path) == file_spares.SPARES_PER_DIRECTORY)
            monkeypatch.setattr(file_sink_module, "write_via_spare", slow)
            monkeypatch.setattr(gate, "_threaded_until", math.inf)  # calls go to threads
            outer.start_soon(sink.install, LINK, Secret(os.urandom(32)), KeyMeta(2, ("k",), "f", 0))
            await trio.to_thread.run_sync(in_thread.wait, 5)
            nursery.cancel_scope.cancel()  # the task stops while the install writes
        go_on.set()
    monkeypatch.setattr(gate, "_threaded_until", -1.0)
    assert not _held(tmp_path)
    file_spares.discard(sink._spares.drain())


async def test_file_sink_erase_is_durable_before_it_returns_even_with_its_task(
    tmp_path: Path, fsyncs: list[str]
) -> None:
    for on_erase in ("random", "remove"):
        sink = _file_sink(tmp_path, on_erase=on_erase)
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            (tmp_path / "bob.key").write_bytes(b"old")
            fsyncs.clear()
            await sink.erase(LINK, "test")
            assert fsyncs and fsyncs[-1] == str(tmp_path)  # before erase returned
            assert (
                not (tmp_path / "bob.key").exists() or (tmp_path / "bob.key").read_bytes() != b"old"
            )
            nursery.cancel_scope.cancel()


async def test_file_sink_task_syncs_what_is_left_when_cancelled(
    tmp_path: Path, fsyncs: list[str]
) -> None:
    sink = _file_sink(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        await sink.install(LINK, Secret(os.urandom(32)), KeyMeta(1, ("k",), "file", 0))
        nursery.cancel_scope.cancel()  # before the task got to run
    assert str(tmp_path / "bob.key") in fsyncs and fsyncs[-1] == str(tmp_path)
    # once the task is gone, installs are durable on their own again
    fsyncs.clear()
    await sink.install(LINK, Secret(os.urandom(32)), KeyMeta(2, ("k",), "file", 0))
    assert fsyncs and fsyncs[-1] == str(tmp_path)


async def test_file_sink_sync_failure_is_logged_and_the_task_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = os.fsync
    failing = [True]
    synced: list[str] = []

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if failing[0]:
            raise OSError(5, "Input/output error")
        synced.append(path)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    sink = _file_sink(tmp_path)
    secret = Secret(os.urandom(32))
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        await sink.install(LINK, secret, KeyMeta(1, ("k",), "file", 0))
        with trio.fail_after(10):
            while "could not be made durable" not in caplog.text:  # noqa: ASYNC110
                await trio.sleep(0.005)
        failing[0] = False
        await sink.install(LINK, secret, KeyMeta(2, ("k",), "file", 0))  # the task still runs
        await _synced(synced, tmp_path / "bob.key", tmp_path)  # and this one is synced
        nursery.cancel_scope.cancel()
    assert "Input/output error" in caplog.text
    assert secret.reveal().hex() not in caplog.text
    assert base64.b64encode(secret.reveal()).decode() not in caplog.text


async def test_an_install_under_way_when_the_task_stops_is_synced_by_the_install(
    tmp_path: Path, fsyncs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import math
    import threading

    import qkdagent.builtin.file_sink as file_sink
    from qkdagent.inline import CACHE, loop_gate

    started, release = threading.Event(), threading.Event()
    real_write = file_sink.write_secret_file

    def held_write(*args: object, **kwargs: object) -> None:  # a write the test lets finish
        started.set()
        release.wait(10)
        real_write(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(file_sink, "write_secret_file", held_write)
    loop_gate(CACHE)._threaded_until = math.inf  # writes go to a thread, as on a slow disk
    sink = _file_sink(tmp_path)
    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as tasks:
            await tasks.start(sink.run)
            meta = KeyMeta(1, ("k",), "file", 0)
            outer.start_soon(sink.install, LINK, Secret(os.urandom(32)), meta)
            await trio.to_thread.run_sync(started.wait, 10)
            tasks.cancel_scope.cancel()  # a reload stops the task while the write is under way
        assert not sink._syncing
        release.set()
    assert (tmp_path / "bob.key").exists()
    assert str(tmp_path / "bob.key") in fsyncs and fsyncs[-1] == str(tmp_path)


async def test_a_file_installed_again_during_its_sync_stays_owed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import qkdagent.builtin.file_sink as file_sink

    sink = _file_sink(tmp_path)
    path = tmp_path / "bob.key"
    sink._unsynced[path] = 1

    def sync_while_reinstalled(paths: list[Path]) -> None:
        sink._unsynced[path] = 2  # an install of the same file lands meanwhile

    monkeypatch.setattr(file_sink, "sync_written", sync_while_reinstalled)
    await sink._sync_unsynced()
    assert sink._unsynced == {path: 2}
    monkeypatch.setattr(file_sink, "sync_written", lambda paths: None)
    await sink._sync_unsynced()
    assert sink._unsynced == {}


def test_key_files_are_created_private_once_and_destroyed_zeroed(tmp_path: Path) -> None:
    from qkdagent import create_secret_file, destroy_file

    path = tmp_path / "block.key"
    create_secret_file(path, b"\x07" * 1000)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_bytes() == b"\x07" * 1000
    with pytest.raises(FileExistsError):
        create_secret_file(path, b"other")  # never over an existing file
    witness = tmp_path / "witness"
    os.link(path, witness)  # sees the same blocks after the unlink
    destroy_file(path)
    assert not path.exists() and witness.read_bytes() == bytes(1000)


async def test_no_spares_in_a_templated_directory(tmp_path: Path) -> None:
    """A directory of a link's own (`{link}` or `{peer}` in it) gets no spares: they would
    stay behind, and keep it from being removed, once the link is gone."""
    opts = Options({"path": str(tmp_path / "{peer}" / "key"), "create_dirs": True}, where="sinks.f")
    sink = FileSink("f", opts, _ctx(tmp_path))
    opts.finish()
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        for epoch in (1, 2, 3):
            await sink.install(LINK, Secret(os.urandom(32)), KeyMeta(epoch, ("k",), "f", 0))
            assert not sink._spares.has_work()  # no spare wanted, so no pass makes one
        assert sorted(p.name for p in (tmp_path / "bob").iterdir()) == ["key"]
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(30)  # a read that blocks the loop never lets trio's timer fire
async def test_keydir_reads_a_key_file_with_a_bound_and_never_a_fifo(tmp_path: Path) -> None:
    """The responder takes the file a key ID names: one that is not a small regular file (a
    FIFO would hang the read, a huge file fill memory) is a `SourceError`, and is gone."""
    from qkdagent.builtin.keydir import MAX_KEY_SIZE
    from qkdagent.errors import KeyNotFound, SourceError

    shared = tmp_path / "shared"
    source = KeyDirSource(
        "keys", Options({"directory": str(shared)}, where="sources.keys"), _ctx(tmp_path)
    )
    await source.prepare()
    os.mkfifo(shared / "fifo")
    (shared / "huge").write_bytes(b"k" * (MAX_KEY_SIZE + 1))
    (shared / "fits").write_bytes(b"k" * MAX_KEY_SIZE)
    (shared / "dir").mkdir()
    os.symlink(shared / "fits", shared / "link")
    with trio.fail_after(10):
        for name, what in (
            ("fifo", "not a regular file"),
            ("huge", "larger than"),
            ("dir", "not a regular file"),
            ("link", "not a regular file"),
        ):
            with pytest.raises(SourceError, match=what):
                await source.key_by_id(LINK, name)
    assert (await source.key_by_id(LINK, "fits")).value.reveal() == b"k" * MAX_KEY_SIZE
    assert os.listdir(shared) == []
    for name in ("nul\0name", "x" * 300):  # NUL, longer than a file name may be
        with pytest.raises(KeyNotFound):
            await source.key_by_id(LINK, name)


async def test_each_blocking_call_goes_through_the_gate_of_its_kind(tmp_path: Path) -> None:
    """Commits and new keydir keys fsync (DISK); a file install and taking a keydir key only
    reach the page cache (CACHE): a slow fsync must not send the latter to threads."""
    from qkdagent.inline import CACHE, DISK, loop_gate
    from qkdagent.state import StateStore

    disk, cache = loop_gate(DISK), loop_gate(CACHE)

    def counts() -> tuple[int, int]:
        return disk.inline_calls + disk.threaded_calls, cache.inline_calls + cache.threaded_calls

    store = StateStore(tmp_path / "state")
    try:
        before = counts()
        await store.run(store.create, "l", "bob", Secret(os.urandom(32)), Secret(os.urandom(32)))
        assert counts() == (before[0] + 1, before[1])
    finally:
        store.close()
    source = KeyDirSource(
        "keys", Options({"directory": str(tmp_path / "k")}, where="s.k"), _ctx(tmp_path)
    )
    await source.prepare()
    before = counts()
    key = await source.new_key(LINK)
    assert counts() == (before[0] + 1, before[1])
    await source.key_by_id(LINK, key.key_id)
    assert counts() == (before[0] + 1, before[1] + 1)
    sink = _file_sink(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)  # installs leave their fsync to the task: page cache only
        before = counts()
        await sink.install(LINK, Secret(os.urandom(32)), KeyMeta(1, ("k",), "file", 0))
        assert counts() == (before[0], before[1] + 1)
        nursery.cancel_scope.cancel()
