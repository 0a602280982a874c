"""The PKCS#11 worker: a job whose caller gave up is undone once it succeeds (no token needed)."""

from __future__ import annotations

import threading

import trio
from qkdagent_hsm import worker


async def drain_worker() -> None:
    """Everything queued on the worker so far (undo jobs included) has run."""
    for _ in range(2):  # an undo is queued when its job ends, behind the first marker at worst
        await worker.run(lambda: None)


async def abandon(job_result: object, fail: bool, undone: list[object]) -> None:
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
                await worker.run(job, undo=undone.append)
                raise AssertionError("the caller was cancelled, so it never gets here")

        scope = await nursery.start(caller)
        await trio.to_thread.run_sync(started.wait, 10)  # the job runs: it cannot be dropped
        scope.cancel()
    release.set()
    await drain_worker()


async def test_an_abandoned_job_that_succeeds_is_undone() -> None:
    undone: list[object] = []
    await abandon("session", fail=False, undone=undone)
    assert undone == ["session"]


async def test_an_abandoned_job_that_fails_has_nothing_to_undo() -> None:
    undone: list[object] = []
    await abandon("session", fail=True, undone=undone)
    assert undone == []


async def test_a_job_that_was_waited_for_is_not_undone() -> None:
    undone: list[object] = []
    assert await worker.run(lambda: "session", undo=undone.append) == "session"
    await drain_worker()
    assert undone == []
