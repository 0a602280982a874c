"""What a hop to a worker thread costs in CPU, against the same call run on the event loop.

    python contrib/bench/bench_thread_hop.py [--seconds 5] [--rate 250] [--loads 0.01,0.3]
        [--callers 4] [--dir /tmp] [--repeat 2] [--pin]

A trio loop is kept busy at a share of a core (`--loads`; an agent's loop at 10,000 links runs
at 0.1-0.3) by tasks burning small CPU slices, while `--callers` tasks make `--rate` calls a
second in all: a no-op, and an SQLite commit with its fsync (WAL, synchronous=FULL, in `--dir`).
Each call runs either on the loop, as `qkdagent.inline`'s gate runs it while calls are fast, or
through `trio.to_thread.run_sync`, as after a cooldown. The figure is the process's CPU (user
and system) per call, and the difference between the two: what a hop costs, the premise of the
gate's cooldowns. `--pin` runs the process on one CPU, so that no wake-up crosses CPUs.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import trio
from bench_core import cpu  # this directory: the script's own, first on sys.path

SLICE = 0.0001
"""Seconds of CPU each burst of the loop's background work takes."""
BURNERS = 20
"""Tasks sharing the background work (an agent's loop runs many short task steps)."""


class Commits:
    """A small durable SQLite commit, as a rotation's: one row replaced, the log fsync'd."""

    def __init__(self, directory: Path) -> None:
        self._db = sqlite3.connect(
            directory / "hop.db", isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
        self._lock = threading.Lock()  # one writer at a time, on whichever thread
        self._n = 0

    def commit(self) -> None:
        with self._lock:
            self._n += 1
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT OR REPLACE INTO t VALUES (?, ?)", (self._n % 1000, os.urandom(64))
            )
            self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()


def no_op() -> None:
    return None


async def burn(load: float) -> None:
    """Background CPU: bursts of `SLICE`, so that `BURNERS` of these keep the loop `load`
    busy."""
    pause = SLICE * (BURNERS / load - 1)
    x = 0
    while True:
        started = time.perf_counter()
        while time.perf_counter() - started < SLICE:
            x += sum(range(50))
        await trio.sleep(pause)


async def measure(
    call: Callable[[], None], hop: bool, load: float, seconds: float, rate: float, callers: int
) -> float:
    """CPU seconds per call of the whole process, the loop `load` busy meanwhile."""
    done = 0

    async def caller(end: float) -> None:
        nonlocal done
        period, due = callers / rate, trio.current_time()
        while trio.current_time() < end:
            if hop:
                await trio.to_thread.run_sync(call)
            else:
                call()
            done += 1
            due += period
            await trio.sleep_until(due)

    async with trio.open_nursery() as background:
        for _ in range(BURNERS):
            background.start_soon(burn, load)
        await trio.sleep(1)  # the background settled, the thread cache warm from the last run
        cpu0 = cpu()
        end = trio.current_time() + seconds
        async with trio.open_nursery() as calls:
            for _ in range(callers):
                calls.start_soon(caller, end)
        cpu1 = cpu()
        background.cancel_scope.cancel()
    return (cpu1 - cpu0) / max(done, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=250.0, help="calls a second, in all")
    parser.add_argument("--callers", type=int, default=4)
    parser.add_argument("--loads", default="0.01,0.3", help="shares of a core the loop burns")
    parser.add_argument("--dir", default=None, help="where the SQLite file goes (fsyncs)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each, alternating")
    parser.add_argument("--pin", action="store_true", help="run on one CPU only")
    args = parser.parse_args()
    loads = [float(x) for x in args.loads.split(",")]
    if not all(0 < load < 1 for load in loads) or args.rate <= 0 or args.callers < 1:
        parser.error("loads must be between 0 and 1, rate and callers positive")
    if args.pin:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    cpus = sorted(os.sched_getaffinity(0))
    print(
        f"{args.rate:.0f} calls/s from {args.callers} callers, {args.seconds:.0f} s per run, "
        f"{args.repeat} run(s) each (median), CPUs {cpus}"
    )
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        commits = Commits(Path(tmp))
        try:
            for name, call in (("no-op", no_op), ("SQLite commit", commits.commit)):
                for load in loads:
                    per_call: dict[bool, list[float]] = {False: [], True: []}
                    for _ in range(args.repeat):
                        for hop in (False, True):
                            per_call[hop].append(
                                trio.run(
                                    measure,
                                    call,
                                    hop,
                                    load,
                                    args.seconds,
                                    args.rate,
                                    args.callers,
                                )
                            )
                    here = statistics.median(per_call[False]) * 1e6
                    there = statistics.median(per_call[True]) * 1e6
                    print(
                        f"  {name:<13} loop {load:.2f} busy: process CPU per call {here:6.0f} us "
                        f"on the loop, {there:6.0f} us through a thread: a hop costs "
                        f"{there - here:4.0f} us"
                    )
        finally:
            commits.close()
    print(
        "  (per call: the loop's background work shared out over the calls, the same both "
        "ways; the difference is the hop)"
    )


if __name__ == "__main__":
    main()
