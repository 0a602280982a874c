#!/usr/bin/env python3
"""GET_KEY/s on one persistent connection and with a connection per call, OPEN_CONNECT/s, per
dialect: the `etsi004` source against the in-process simulator over loopback mutual TLS (client
and module share one Python process, so the figures are what one core does for both sides).
Rates are per second of the process's CPU time unless `--wall`: the machine this runs on is
shared, and CPU time is what a core free of neighbours would spend.

    python3 plugins/qkdagent-etsi004/bench/bench_qkdm.py [--seconds 1] [--rounds 3]
    python3 plugins/qkdagent-etsi004/bench/bench_qkdm.py --baseline bb5ea1e

`--baseline REV` measures the plugin's code at git revision REV too, in the same run: rounds
alternate between REV (a child process on `git archive` of REV's src/, the working tree is not
touched) and the current code, and the medians are printed side by side, so a busy machine
weighs on both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from qkdagent import Link

ALICE = Link("l", "alice", "bob", True)
PLUGIN = Path(__file__).resolve().parents[1]
WALL = False


async def rate(seconds: float, call: Callable[[], Awaitable[object]]) -> float:
    """Calls per second of this process's CPU time (user + system): on a machine shared with
    other work the wall clock measures the neighbours too; `--wall` measures it instead."""
    clock = time.perf_counter if WALL else time.process_time
    n, start, wall = 0, clock(), time.perf_counter()
    while time.perf_counter() - wall < seconds:
        await call()
        n += 1
    return n / (clock() - start)


async def measure(seconds: float) -> dict[str, float]:
    from qkdagent_etsi004 import codec
    from qkdagent_etsi004.codec import QoS
    from qkdagent_etsi004.sim import open_qkdm_pair
    from qkdagent_etsi004.source import Etsi004Source

    from qkdagent.testing import build_component

    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        async with open_qkdm_pair(Path(tmp), rate_bps=4e9) as sim:
            for transport in ("binary-v2", "binary-v1"):
                for persistent in (True, False):
                    table = sim.source_table("alice", transport=transport, persistent=persistent)
                    source = build_component(Etsi004Source, table, links=(ALICE,), agent="alice")
                    await source.prepare()
                    await source.new_key(ALICE)
                    mode = "one connection" if persistent else "connection per call"
                    figures[f"{transport} GET_KEY/s ({mode})"] = await rate(
                        seconds if persistent else seconds / 2,
                        lambda s=source: s.new_key(ALICE),  # type: ignore[misc]
                    )
                    if persistent:
                        request = codec.OpenConnectRequest("qkd://alice", "qkd://bob", QoS(32))
                        service = codec.Service.OPEN_CONNECT_RESPONSE
                        figures[f"{transport} OPEN_CONNECT/s (one connection)"] = await rate(
                            seconds,
                            lambda s=source, q=request, v=service: s._call(q, v),  # type: ignore[misc]
                        )
                    await source.aclose()
    return figures


def baseline_tree(rev: str, into: Path) -> Path:
    """REV's copy of this plugin's src/ (git archive; nothing in the working tree changes)."""
    root = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], cwd=PLUGIN, capture_output=True, text=True
    ).stdout.strip()
    src = PLUGIN.relative_to(root) / "src"
    archive = subprocess.run(
        ["git", "archive", "--format=tar", rev, str(src)], cwd=root, capture_output=True
    )
    if archive.returncode:
        sys.exit(f"git archive {rev}: {archive.stderr.decode().strip()}")
    tar = into / "src.tar"
    tar.write_bytes(archive.stdout)
    with tarfile.open(tar) as opened:
        opened.extractall(into, filter="data")
    return into / src


def run_baseline(src: Path, seconds: float) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), *sys.path])}
    child = subprocess.run(
        [sys.executable, __file__, "--seconds", str(seconds), "--json", *(["--wall"] * WALL)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    figures: dict[str, float] = json.loads(child.stdout)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=1.0, help="per figure and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", metavar="REV", help="also measure the code at REV")
    parser.add_argument("--wall", action="store_true", help="per wall-clock second instead")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global WALL
    WALL = args.wall
    if args.json:  # a child measuring one round (of the baseline)
        print(json.dumps(trio.run(measure, args.seconds)))
        return
    now: dict[str, list[float]] = {}
    before: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = baseline_tree(args.baseline, Path(tmp)) if args.baseline else None
        for _ in range(args.rounds):
            if src is not None:
                for key, value in run_baseline(src, args.seconds).items():
                    before.setdefault(key, []).append(value)
            for key, value in trio.run(measure, args.seconds).items():
                now.setdefault(key, []).append(value)
    unit = "wall-clock" if WALL else "CPU (user+system)"
    print(
        f"per {unit} second, median of {args.rounds} rounds of {args.seconds} s, loopback "
        "mutual TLS, source and module in one process"
    )
    for key, values in now.items():
        figure = statistics.median(values)
        if key in before:
            old = statistics.median(before[key])
            print(f"{key:48} {old:8.0f} at {args.baseline} -> {figure:8.0f} ({figure / old:.2f}x)")
        else:
            print(f"{key:48} {figure:8.0f}")


if __name__ == "__main__":
    main()
