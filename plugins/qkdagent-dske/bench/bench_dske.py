"""Keys per second through 5 hubs with k = 3 on loopback (in one process), latency p50/p99,
PSRD bytes per 256-bit key, CPU per key (hubs and clients together: one process).

    python3 plugins/qkdagent-dske/bench/bench_dske.py [--keys 300] [--parallel 8]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import trio

from qkdagent import Link
from qkdagent.testing import build_component, running

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qkdagent_dske.source import DskeSource
from tests.hubs import hub_table, open_hubs

ALICE = Link("l", "alice", "bob", True)
BOB = Link("l", "bob", "alice", False)


async def main(keys: int, parallel: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        names = ["hank", "helen", "hilary", "holly", "hugo"]
        async with open_hubs(path, names) as (pki, hubs):
            sources = [
                build_component(
                    DskeSource,
                    {"hubs": hub_table(pki, hubs, agent), "k": 3, "refill_every": 3600},
                    name="dske",
                    agent=agent,
                    state_dir=path / agent,
                )
                for agent in ("alice", "bob")
            ]
            alice, bob = sources
            async with running(alice, bob):
                free = lambda: sum(  # noqa: E731
                    s.psrd.free(h, o) for s in sources for h in names for o in ("client", "hub")
                )
                before_free = free()
                latencies: list[float] = []
                todo = iter(range(keys))

                async def worker() -> None:
                    for _ in todo:
                        t0 = time.perf_counter()
                        key = await alice.new_key(ALICE)
                        same = await bob.key_by_id(BOB, key.key_id)
                        assert same.value == key.value
                        latencies.append(time.perf_counter() - t0)

                cpu0, t0 = time.process_time(), time.perf_counter()
                async with trio.open_nursery() as nursery:
                    for _ in range(parallel):
                        nursery.start_soon(worker)
                elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                used = before_free - free()
        latencies.sort()
        print(f"keys: {keys}, parallel: {parallel}, hubs: 5, k: 3")
        print(f"keys/s: {keys / elapsed:.1f}")
        print(f"latency p50: {latencies[len(latencies) // 2] * 1e3:.1f} ms")
        print(f"latency p99: {latencies[int(len(latencies) * 0.99)] * 1e3:.1f} ms")
        print(f"PSRD bytes per key (both clients' view): {used / keys:.0f}")
        print(f"CPU per key (hubs + clients, one process): {cpu / keys * 1e3:.2f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=300)
    parser.add_argument("--parallel", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    trio.run(main, args.keys, args.parallel)
