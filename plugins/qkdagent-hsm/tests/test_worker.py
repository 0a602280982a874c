"""The PKCS#11 worker: a job whose caller gave up is undone once it succeeds (no token needed)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pytest
import trio
from qkdagent_hsm import worker


async def drain_worker() -> None:
    """Everything queued on the worker so far (undo jobs included) has run."""
    for _ in range(2):  # an undo is queued when its job ends, behind the first marker at worst
        await worker.run(lambda: None)


async def abandon(job_result: object, fail: bool, undo: Callable[[object], object]) -> None:
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
    release.set()
    await drain_worker()


async def test_an_abandoned_job_that_succeeds_is_undone() -> None:
    undone: list[object] = []
    await abandon("session", fail=False, undo=undone.append)
    assert undone == ["session"]


async def test_an_abandoned_job_that_fails_has_nothing_to_undo(
    caplog: pytest.LogCaptureFixture,
) -> None:
    undone: list[object] = []
    with caplog.at_level(logging.DEBUG):
        await abandon("session", fail=True, undo=undone.append)
    assert undone == []
    assert not caplog.records  # nothing went wrong quietly in a done-callback either


async def test_a_failing_undo_is_logged_by_type_only(caplog: pytest.LogCaptureFixture) -> None:
    def undo(result: object) -> None:
        raise ValueError(f"cannot close {result}")

    with caplog.at_level(logging.WARNING, logger="qkdagent_hsm.worker"):
        await abandon("pin=1234", fail=False, undo=undo)
    assert "undoing an abandoned PKCS#11 job failed: ValueError" in caplog.text
    assert "1234" not in caplog.text


async def test_a_job_that_was_waited_for_is_not_undone() -> None:
    undone: list[object] = []
    assert await worker.run(lambda: "session", undo=undone.append) == "session"
    await drain_worker()
    assert undone == []
