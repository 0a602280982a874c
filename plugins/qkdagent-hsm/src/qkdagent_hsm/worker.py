"""The thread on which one agent makes every PKCS#11 call.

python-pkcs11 initialises modules without locking and releases the GIL around each call, and
SoftHSM crashes when several threads use it at once (LAB.md). So each agent queues its sinks'
jobs on one thread of its own (held in its stash, see state.py), in order, and the trio thread
only waits for a wake-up, never for the token. A PKCS#11 module is process-global state
(C_Initialize), so jobs of the workers of two agents in one process (tests, the demo) still take
turns: `_CALLS` is the module's own one-caller-at-a-time rule, not shared plugin state.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import trio

T = TypeVar("T")
log = logging.getLogger(__name__)

_CALLS = threading.Lock()
"""Held by every job: at most one PKCS#11 call at a time in the process."""
_thread = threading.local()


def _mark_thread() -> None:
    _thread.pkcs11_worker = True


def in_worker() -> bool:
    """True when running on a PKCS#11 worker thread (token code asserts this)."""
    return getattr(_thread, "pkcs11_worker", False)


def _locked(fn: Callable[..., T], *args: object) -> T:
    with _CALLS:
        return fn(*args)


class Worker:
    """One thread; `close()` lets the jobs already queued finish, then the thread ends."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="qkdagent-pkcs11", initializer=_mark_thread
        )

    async def run(
        self, fn: Callable[..., T], *args: object, undo: Callable[[T], object] | None = None
    ) -> T:
        """Run `fn(*args)` on the worker thread and return its result (or raise its exception).

        Cancellation before the job starts drops it. Once it runs it cannot be interrupted (a
        PKCS#11 call is not abortable); a cancelled caller stops waiting and the job finishes on
        its own, and later jobs queue behind it, so token operations never interleave.
        `undo(result)` then runs on the worker once the abandoned job has succeeded, so a result
        nobody receives (an open session, say) is not leaked.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        trio_token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: Future[T]) -> None:
            try:
                trio_token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        future = self._executor.submit(_locked, fn, *args)
        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            if not future.cancel() and undo is not None:
                self._undo_when_done(future, undo)
            raise
        return future.result()

    def _undo_when_done(self, future: Future[T], undo: Callable[[T], object]) -> None:
        def on_done(finished: Future[T]) -> None:
            if in_worker():  # right after the job, on its thread: runs even after close()
                _undo_abandoned(undo, finished)
            else:  # it had finished already: we are on trio's thread, queue the undo as a job
                self._executor.submit(_undo_abandoned, undo, finished)

        future.add_done_callback(on_done)

    def run_blocking(self, fn: Callable[..., T], *args: object) -> T:
        """Synchronous variant for code outside trio (benchmarks, fixtures)."""
        return self._executor.submit(_locked, fn, *args).result()

    def close(self) -> None:
        """Stop taking jobs; the thread ends once the queued ones (and their undos) ran."""
        self._executor.shutdown(wait=False)


def _undo_abandoned(undo: Callable[[T], object], future: Future[T]) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    try:
        _locked(undo, future.result())
    except Exception as exc:  # nobody waits for this job: say so, by type only
        log.warning("undoing an abandoned PKCS#11 job failed: %s", type(exc).__name__)
