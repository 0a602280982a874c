"""The test kit's component helpers build and run a component the way the agent does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from qkdagent import ConfigError, KeyMeta, Link, Secret, Sink
from qkdagent.builtin.file_sink import FileSink
from qkdagent.testing import MemorySource, build_component, running

LINK = Link("ab", "alice", "bob", True)


def test_build_component_reads_the_table_as_the_config_loader_does(tmp_path: Path) -> None:
    sink = build_component(
        FileSink, {"type": "file", "path": str(tmp_path / "k")}, name="psk", links=(LINK,)
    )
    assert (sink.name, sink.links) == ("psk", (LINK,))
    assert sink.context.agent_name == "alice" and sink.context.state_dir.is_dir()
    with pytest.raises(ConfigError, match=r"^sinks\.psk\.colour: "):
        build_component(FileSink, {"path": str(tmp_path / "k"), "colour": 1}, name="psk")
    with pytest.raises(ConfigError, match=r"^sources\.m\.key_size: "):
        build_component(MemorySource, {"key_size": 1}, name="m", state_dir=tmp_path)
    with pytest.raises(ValueError, match="'exec', but FileSink is 'file'"):
        build_component(FileSink, {"type": "exec", "path": str(tmp_path / "k")})


class Lifecycle(Sink):
    type_name = "lifecycle"
    log: list[str]

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.log = []
        self.fail_prepare = False

    async def prepare(self) -> None:
        self.log.append(f"prepare links={len(self.links)}")
        if self.fail_prepare:
            raise RuntimeError("prepare failed")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.log.append("run")
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            self.log.append("run cancelled")

    async def install(self, link: Link, secret: Secret, meta: KeyMeta) -> None:
        self.log.append("install")

    async def erase(self, link: Link, reason: str) -> None:
        self.log.append("erase")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()  # a checkpoint: shielded from the cancelled test scope
        self.log.append("aclose")


async def test_running_prepares_runs_cancels_then_closes(tmp_path: Path) -> None:
    sink = build_component(Lifecycle, {}, links=(LINK,), state_dir=tmp_path)
    async with running(sink):
        await sink.install(LINK, Secret.random(32), KeyMeta(1, ("k",), "x", 0.0))
    assert sink.log == ["prepare links=1", "run", "install", "run cancelled", "aclose"]


async def test_running_closes_a_component_whose_prepare_failed(tmp_path: Path) -> None:
    first = build_component(Lifecycle, {}, name="a", state_dir=tmp_path)
    second = build_component(Lifecycle, {}, name="b", state_dir=tmp_path)
    first.fail_prepare = True
    with pytest.raises(RuntimeError, match="prepare failed"):
        async with running(first, second):
            raise AssertionError("not reached")
    assert first.log == ["prepare links=0", "aclose"]
    assert second.log == ["aclose"]  # never prepared, closed all the same


async def test_running_closes_even_when_the_test_is_cancelled(tmp_path: Path) -> None:
    sink = build_component(Lifecycle, {}, state_dir=tmp_path)
    with trio.CancelScope() as scope:
        async with running(sink):
            scope.cancel()
            await trio.sleep_forever()
    assert sink.log[-2:] == ["run cancelled", "aclose"]


async def test_an_error_in_the_body_propagates_unwrapped(tmp_path: Path) -> None:
    sink = build_component(Lifecycle, {}, state_dir=tmp_path)
    with pytest.raises(KeyError):
        async with running(sink):
            raise KeyError("from the test")
    assert sink.log[-1] == "aclose"


def test_a_components_temporary_state_dir_is_removed_at_exit(tmp_path: Path) -> None:
    """Without a `state_dir`, `build_component` makes one that goes when the process ends
    (a full test run used to leave hundreds in /tmp)."""
    script = (
        "from qkdagent.builtin.file_sink import FileSink\n"
        "from qkdagent.testing import build_component\n"
        f"sink = build_component(FileSink, {{'path': {str(tmp_path / 'psk')!r}}})\n"
        "print(sink.context.state_dir)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    made = Path(out.stdout.strip())
    assert made.name.startswith("qkdagent-test-")
    assert not made.exists()
