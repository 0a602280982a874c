"""Rotation cost of the `mlkem` source beside a memory-source link, in one run.

Prints, per link kind (memory only, pqc only, hybrid memory + pqc): CPU per rotation for the
whole agent pair (both sides, in-process network, virtual clock, so no waiting) and the wall
time per rotation; then the ML-KEM work alone per side (initiator: offer + accept_answer,
responder: answer). Usage: python3 bench/bench_rotation.py [--rotations N]
"""

from __future__ import annotations

import argparse
import base64
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import trio
import trio.testing
from qkdagent_pqc import kem
from qkdagent_pqc.source import MlkemSource

from qkdagent import Link, write_secret_file
from qkdagent.testing import build_component, open_agent_pair

LINK = {"interval": 10, "reject_after": 600, "jitter": 0, "backoff_max": 5}


def mlkem_tables(directory: Path, params: kem.ParameterSet) -> dict[str, dict[str, Any]]:
    directory.mkdir(parents=True, exist_ok=True)
    seeds, public = {}, {}
    for name in ("alice", "bob"):
        private = params.generate()
        seeds[name] = directory / f"{name}.mlkem"
        write_secret_file(seeds[name], base64.b64encode(private.private_bytes_raw()))
        public[name] = base64.b64encode(private.public_key().public_bytes_raw()).decode()
    return {
        name: {
            "type": "mlkem",
            "parameter_set": params.name,
            "private_key": {"file": str(seeds[name])},
            "peer_public_keys": {peer: public[peer]},
        }
        for name, peer in (("alice", "bob"), ("bob", "alice"))
    }


async def _pair_run(directory: Path, kind: str, rotations: int, params: kem.ParameterSet) -> None:
    pool = f"bench-{uuid.uuid4().hex[:8]}"
    pqc = mlkem_tables(directory, params)
    sides = {}
    for name in ("alice", "bob"):
        sources: dict[str, Any] = {}
        if kind in ("memory", "hybrid"):
            sources["kme"] = {"type": "memory", "pool": pool}
        if kind in ("pqc", "hybrid"):
            sources["pqc"] = pqc[name]
        sides[name] = {
            "plugins": ["pqc", "memory"],
            "sources": sources,
            "sinks": {"rec": {"type": "recording"}},
        }
    async with open_agent_pair(directory, **sides, link=LINK, local=True) as pair:
        await pair.wait_for_epoch(1, timeout=600)
        cpu, wall, first = time.process_time(), time.perf_counter(), pair.epoch("alice")
        await pair.wait_for_epoch(first + rotations, timeout=10 * rotations + 600)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        done = pair.epoch("alice") - first
        print(
            f"{kind:>7} {params.name if kind != 'memory' else '':>11}: {done} rotations, "
            f"{1000 * cpu / done:.3f} ms CPU and {1000 * wall / done:.3f} ms wall per rotation "
            "(both agents)"
        )


def _source_cost(params: kem.ParameterSet, count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tables = mlkem_tables(Path(tmp), params)
        alice = build_component(MlkemSource, tables["alice"], agent="alice")
        bob = build_component(MlkemSource, tables["bob"], agent="bob")
    a, b = Link("l", "alice", "bob", True), Link("l", "bob", "alice", False)

    async def run() -> tuple[float, float]:
        sent, kept, side = None, None, [0.0, 0.0]
        for _ in range(count):
            t = time.process_time()
            key = await alice.offer(a, sent)
            t2 = time.process_time()
            answered = await bob.answer(b, key.key_id, kept)
            t3 = time.process_time()
            sent = await alice.accept_answer(a, answered.answer, sent)
            t4 = time.process_time()
            kept = answered.state
            side[0] += (t2 - t) + (t4 - t3)
            side[1] += t3 - t2
        return side[0], side[1]

    initiator, responder = trio.run(run)
    print(
        f"ML-KEM work alone ({params.name}, {count} exchanges): initiator "
        f"{1e6 * initiator / count:.0f} µs, responder {1e6 * responder / count:.0f} µs CPU "
        "per rotation"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rotations", type=int, default=300)
    args = parser.parse_args()
    for name in kem.PARAMETER_SETS:
        _source_cost(kem.PARAMETER_SETS[name], 2000)
    default = kem.PARAMETER_SETS[kem.DEFAULT]
    with tempfile.TemporaryDirectory() as tmp:
        for n, kind in enumerate(("memory", "pqc", "hybrid", "memory")):

            async def one(kind: str = kind, n: int = n) -> None:
                await _pair_run(Path(tmp) / f"{kind}-{n}", kind, args.rotations, default)

            trio.run(one, clock=trio.testing.MockClock(autojump_threshold=0))


if __name__ == "__main__":
    main()
