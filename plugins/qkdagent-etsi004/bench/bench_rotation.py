#!/usr/bin/env python3
"""Rotation latency of two agents through two simulated QKD modules (ETSI 004, binary v1 and
binary v2) beside the same two agents through two simulated KMEs (ETSI 014), in one run. Binary v2
runs with its default `persistent = "auto"` twice: against modules that keep connections and
against modules that close them after each answer (`close_after_request`, the ETSI reference
module's way), where auto falls back to a connection per request.

Each path: alice and bob are real agents (HTTPS with mutual TLS between them on loopback, `file`
sinks), each taking keys from its own module or KME over loopback mutual TLS; the link rotates
every `--interval` seconds. A rotation's latency is what the initiator's `after_rotation` hook
reports: from the start of the rotation to the last install on alice's side (key from her
module, bob's answer after he fetched the same key from his and installed it, alice's install).
The first rotation (connections and streams opened) is left out. Rounds alternate the paths, so
a busy machine weighs on all of them alike.

    python3 plugins/qkdagent-etsi004/bench/bench_rotation.py [--rotations 200] [--rounds 2]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from qkdagent_etsi004.sim import open_qkdm_pair
from qkdagent_etsi014.sim import open_kme_pair

import qkdagent
from qkdagent import RotationEvent
from qkdagent.testing import open_agent_pair

PATHS = ("binary-v2", "binary-v2 closing", "binary-v1", "etsi014")
LABELS = {
    "binary-v2": "004 binary-v2 auto, module keeps connections",
    "binary-v2 closing": "004 binary-v2 auto, module closes per request",
    "binary-v1": "004 binary-v1 (persistent)",
    "etsi014": "014 through kme-sim",
}


class Recorder:
    """An observer plugin: the initiator's rotation durations (seconds), epoch 2 on."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self.epochs = 0

    @qkdagent.hookimpl
    def qkdagent_after_rotation(self, event: RotationEvent) -> None:
        self.epochs = max(self.epochs, event.epoch)
        if event.initiator and event.epoch > 1:
            self.durations.append(event.duration)


@asynccontextmanager
async def tables(path: str, directory: Path) -> AsyncIterator[Callable[[str], dict[str, Any]]]:
    """The `[sources.qkd]` table per agent, its simulators running."""
    if path == "etsi014":
        async with open_kme_pair(directory / "kme", rate_bps=1e7) as kme:
            yield lambda app: kme.source_table(app)
    else:
        transport, _, closing = path.partition(" ")
        async with open_qkdm_pair(
            directory / "qkdm", rate_bps=1e7, close_after_request=bool(closing)
        ) as qkdm:
            yield lambda app: qkdm.source_table(app, transport=transport)


async def one_path(
    path: str, directory: Path, rotations: int, interval: float
) -> tuple[list[float], float]:
    """The initiator's rotation durations and the process CPU seconds they took (epoch 2 on)."""
    opened: AbstractAsyncContextManager[Callable[[str], dict[str, Any]]] = tables(path, directory)
    async with opened as table:
        sides = {
            app: {
                "plugins": ["etsi014" if path == "etsi014" else "etsi004", "file"],
                "sources": {"qkd": table(app)},
                "sinks": {"psk": {"type": "file", "path": str(directory / f"{app}.psk")}},
            }
            for app in ("alice", "bob")
        }
        link = {"interval": interval, "jitter": 0, "reject_after": 600}
        async with open_agent_pair(
            directory / "agents", alice=sides["alice"], bob=sides["bob"], link=link
        ) as pair:
            recorder = Recorder()
            pair.alice.plugins.add("bench-recorder", recorder, "bench")
            await pair.wait_for_epoch(1, timeout=60)
            start = time.process_time()
            await pair.wait_for_epoch(rotations + 1, timeout=60 + 2 * rotations * interval)
            cpu = time.process_time() - start
        secrets = {(directory / f"{app}.psk").read_bytes() for app in ("alice", "bob")}
        if len(secrets) != 1:
            raise SystemExit(f"{path}: the two file sinks differ")
    return recorder.durations, cpu


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(rotations: int, rounds: int, interval: float) -> None:
    durations: dict[str, list[float]] = {p: [] for p in PATHS}
    cpu: dict[str, float] = dict.fromkeys(PATHS, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(rounds):
            order = PATHS if n % 2 == 0 else tuple(reversed(PATHS))
            for path in order:
                where = Path(tmp) / f"{path.replace(' ', '-')}-{n}"
                got, used = await one_path(path, where, rotations // rounds, interval)
                cpu[path] += used
                durations[path] += got
    print(
        f"rotation latency, initiator's view, {rounds} rounds, link interval {interval} s, "
        "agents and simulators in one process over loopback mutual TLS, file sinks"
    )
    reference = statistics.median(durations["etsi014"])
    for path in PATHS:
        values = durations[path]
        p50 = statistics.median(values)
        print(
            f"{LABELS[path]:52} {len(values):4} rotations: p50 {p50 * 1e3:6.2f} ms, "
            f"p99 {percentile(values, 0.99) * 1e3:6.2f} ms, "
            f"max {max(values) * 1e3:6.2f} ms; p50 {p50 / reference:.2f}x the 014 path; "
            f"{cpu[path] / len(values) * 1e3:.2f} ms CPU per rotation (both agents)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rotations", type=int, default=200, help="per path")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.05, help="link interval, seconds")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the agents' shutdown warnings are not figures
    trio.run(main, args.rotations, args.rounds, args.interval)
