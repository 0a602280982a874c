"""The PKCS#11 worker: a job whose caller gave up is undone once it succeeds (no token needed);
each agent's state (worker, open tokens) lives in its own stash."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from qkdagent_hsm import Pkcs11Sink
from qkdagent_hsm.state import HSM
from qkdagent_hsm.worker import Worker, in_worker

from qkdagent import PluginContext
from qkdagent.testing import build_component


@pytest.fixture
def worker() -> Iterator[Worker]:
    worker = Worker()
    yield worker
    worker.close()


async def drain_worker(worker: Worker) -> None:
    """Everything queued on the worker so far (undo jobs included) has run."""
    for _ in range(2):  # an undo is queued when its job ends, behind the first marker at worst
        await worker.run(lambda: None)


async def abandon(
    worker: Worker,
    job_result: object,
    fail: bool,
    undo: Callable[[object], object],
    close: bool = False,
) -> None:
    started, release = threading.Event(), threading.Event()

    def job() -> object:
        started.set()
        release.wait(10)
        if fail:
            raise RuntimeError("the token refused")
        return job_result

    async with trio.open_nursery() as nursery:

        async def caller(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
            with trio.CancelScope() as scope:
                task_status.started(scope)
                await worker.run(job, undo=undo)
                raise AssertionError("the caller was cancelled, so it never gets here")

        scope = await nursery.start(caller)
        assert await trio.to_thread.run_sync(started.wait, 10)  # it runs: it cannot be dropped
        scope.cancel()
    if close:
        worker.close()
        release.set()
        await trio.to_thread.run_sync(worker._executor.shutdown, True)  # its thread has ended
        return
    release.set()
    await drain_worker(worker)


async def test_an_abandoned_job_that_succeeds_is_undone(worker: Worker) -> None:
    undone: list[object] = []
    await abandon(worker, "session", fail=False, undo=undone.append)
    assert undone == ["session"]


async def test_an_abandoned_job_that_fails_has_nothing_to_undo(
    worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    undone: list[object] = []
    with caplog.at_level(logging.DEBUG):
        await abandon(worker, "session", fail=True, undo=undone.append)
    assert undone == []
    assert not caplog.records  # nothing went wrong quietly in a done-callback either


async def test_a_failing_undo_is_logged_by_type_only(
    worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    def undo(result: object) -> None:
        raise ValueError(f"cannot close {result}")

    with caplog.at_level(logging.WARNING, logger="qkdagent_hsm.worker"):
        await abandon(worker, "pin=1234", fail=False, undo=undo)
    assert "undoing an abandoned PKCS#11 job failed: ValueError" in caplog.text
    assert "1234" not in caplog.text


async def test_a_job_that_was_waited_for_is_not_undone(worker: Worker) -> None:
    undone: list[object] = []
    assert await worker.run(lambda: "session", undo=undone.append) == "session"
    await drain_worker(worker)
    assert undone == []


async def test_an_abandoned_job_is_undone_on_the_worker_even_after_close(worker: Worker) -> None:
    """The last sink of an agent gave up on its prepare() and closed the worker meanwhile."""
    undone: list[tuple[object, bool]] = []
    await abandon(
        worker, "session", fail=False, undo=lambda r: undone.append((r, in_worker())), close=True
    )
    assert undone == [("session", True)]


def _sink(name: str, context: PluginContext) -> Pkcs11Sink:
    pin = context.state_dir / "pin"
    pin.write_text("1234\n")
    pin.chmod(0o600)
    table = {"token": "t", "pin": {"file": str(pin)}}
    return build_component(Pkcs11Sink, table, name=name, context=context)


def test_sinks_of_one_agent_share_its_state_and_two_agents_share_nothing(
    tmp_path: Path,
) -> None:
    alice, bob = PluginContext("alice", tmp_path), PluginContext("bob", tmp_path)
    a1, a2, b1 = _sink("a1", alice), _sink("a2", alice), _sink("b1", bob)
    assert a1._state is a2._state is alice.stash[HSM]
    assert b1._state is bob.stash[HSM] and b1._state is not a1._state
    try:
        assert a1.worker is a2.worker and a1.worker is not b1.worker
    finally:
        for state in (alice.stash[HSM], bob.stash[HSM]):
            state.worker.close()
