"""One thread for every PKCS#11 call in the process.

python-pkcs11 initialises modules without locking and releases the GIL around each call, and
SoftHSM crashes when several threads use it at once (LAB.md). A PKCS#11 module is also
process-global state (C_Initialize, the login state of a token), so the worker is process-wide
too: every sink instance of every agent in the process queues its jobs on the same thread, in
order. The trio thread only waits for a wake-up, never for the token.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import TypeVar

import trio

T = TypeVar("T")
log = logging.getLogger(__name__)

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_thread_ident: int | None = None


def _mark_thread() -> None:
    global _thread_ident
    _thread_ident = threading.get_ident()


def _get_executor() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="qkdagent-pkcs11", initializer=_mark_thread
            )
        return _executor


def in_worker() -> bool:
    """True when running on the PKCS#11 worker thread (token code asserts this)."""
    return threading.get_ident() == _thread_ident


async def run(fn: Callable[..., T], *args: object, undo: Callable[[T], object] | None = None) -> T:
    """Run `fn(*args)` on the worker thread and return its result (or raise its exception).

    Cancellation before the job starts drops it. Once it runs it cannot be interrupted (a PKCS#11
    call is not abortable); a cancelled caller stops waiting and the job finishes on its own, and
    later jobs queue behind it, so token operations never interleave. `undo(result)` is then
    queued on the worker once the abandoned job has succeeded, so a result nobody receives (an
    open session, say) is not leaked.
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    trio_token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: Future[T]) -> None:
        try:
            trio_token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass

    future = _get_executor().submit(fn, *args)
    future.add_done_callback(wake)
    try:
        await done.wait()
    except BaseException:
        if not future.cancel() and undo is not None:
            future.add_done_callback(partial(_undo_abandoned, undo))
        raise
    return future.result()


def _undo_abandoned(undo: Callable[[T], object], future: Future[T]) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    result = future.result()

    def run_undo() -> None:
        try:
            undo(result)
        except Exception as exc:  # nobody waits for this job: say so, by type only
            log.warning("undoing an abandoned PKCS#11 job failed: %s", type(exc).__name__)

    try:
        _get_executor().submit(run_undo)
    except RuntimeError:  # the executor is shut down (interpreter exit): nothing to undo on
        log.warning("could not undo an abandoned PKCS#11 job: the worker has stopped")


def run_blocking(fn: Callable[..., T], *args: object) -> T:
    """Synchronous variant for code outside trio (benchmarks, fixtures)."""
    return _get_executor().submit(fn, *args).result()
