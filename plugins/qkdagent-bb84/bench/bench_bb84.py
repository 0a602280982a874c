"""Benchmark of the simulated BB84 link: prints figures, asserts nothing.

    python3 bench/bench_bb84.py [--quick]

1. Quantum phase: simulated pulses per second (honest link, with decoys).
2. Cascade alone (reconciliation through the authenticated channel, no verification) at
   n = 10^4, 10^5, 10^6 and Q = 1, 2, 5 %, 10^6 bits per batch (100, 10, 1 frames sharing
   round trips): Mbit/s, efficiency f, round trips per batch, frames left with errors (which
   verification then discards).
3. End to end (decoy BB84, Lim et al. 2014 finite-key length, n = 10^6 sifted bits per block):
   secret key rate per pulse and in bit/s of simulation, QBER, f, at 10, 25, 50 km.
Baseline named in the issue: the seed module's BB84 runs at 54 qubits/s.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from qkdagent_bb84.cascade import cascade_frames, warm
from qkdagent_bb84.channel import Channel
from qkdagent_bb84.engine import Settings, run_block
from qkdagent_bb84.finitekey import h
from qkdagent_bb84.physics import Physics, simulate

SEED_MODULE_QUBITS_PER_S = 54.0


def quantum_phase(pulses: int) -> float:
    rng = np.random.default_rng(1)
    simulate(Physics(), 1 << 16, rng)  # warm-up
    start = time.perf_counter()
    done = 0
    while done < pulses:
        done += simulate(Physics(), 1 << 22, rng).pulses
    return done / (time.perf_counter() - start)


def reconciliation(
    n: int, q: float, algorithm: str, batches: int, batch: int
) -> tuple[float, float, float, int]:
    """Reconcile `batches` x `batch` frames of n bits (each batch's frames share round trips)
    through the HMAC-authenticated channel; permutations warmed first (built once per n)."""
    rng = np.random.default_rng(n + int(q * 1000))
    warm(n, algorithm)
    seconds = 0.0
    fs, rounds, failures = [], [], 0
    for _ in range(batches):
        alice = rng.integers(0, 2, (batch, n), dtype=np.uint8)
        bob = alice ^ (rng.random((batch, n)) < q).astype(np.uint8)
        actual = float(np.mean(alice != bob))
        channel = Channel.shared(b"bench-auth-key-of-32-bytes......")
        start = time.perf_counter()
        result = cascade_frames(alice, bob, actual, algorithm, channel)
        seconds += time.perf_counter() - start
        failures += int(np.count_nonzero((result.keys != alice).any(axis=1)))
        errors = np.count_nonzero(alice != bob, axis=1) / n
        fs.extend(result.disclosed / (n * np.array([h(e) for e in errors])))
        rounds.append(result.rounds)
    return n * batch * batches / seconds / 1e6, float(np.mean(fs)), float(np.mean(rounds)), failures


def main() -> None:
    quick = "--quick" in sys.argv
    rate = quantum_phase(1 << 24 if quick else 1 << 26)
    print(
        f"quantum phase: {rate / 1e6:.1f} M pulses/s "
        f"({rate / SEED_MODULE_QUBITS_PER_S:,.0f} x the seed module's 54 qubits/s)"
    )
    print("\nCascade (reconciliation only), one core:")
    print(
        f"{'algorithm':9} {'n':>8} {'batch':>5} {'Q':>5} {'Mbit/s':>7} {'f':>6} {'rounds':>7} "
        f"{'FER (before verification)':>26}"
    )
    runs = [(a, n, 10**6 // n) for a in ("original", "yanetal") for n in (10**4, 10**5, 10**6)]
    runs.append(("yanetal", 10**4, 1000))  # 10^7 bits per batch: more frames per round trip
    for algorithm, n, batch in runs:
        batches = 2 if quick else 6
        for q in (0.01, 0.02, 0.05):
            mbit, f, rounds, failures = reconciliation(n, q, algorithm, batches, batch)
            print(
                f"{algorithm:9} {n:>8} {batch:>5} {q:>5.2f} {mbit:>7.2f} {f:>6.3f} "
                f"{rounds:>7.0f} {failures:>12}/{batch * batches}"
            )
    print("\nEnd to end, decoy BB84, n = 10^6 sifted key bits per block:")
    print(
        f"{'km':>4} {'status':28} {'pulses':>11} {'QBER':>7} {'f':>6} {'key bits':>9} "
        f"{'bit/pulse':>10} {'key bit/s':>10} {'pulses/s':>10}"
    )
    for km in (10, 25, 50):
        settings = Settings(physics=Physics(distance_km=km), block_bits=10**6, chunk_pulses=1 << 23)
        start = time.perf_counter()
        r = run_block(settings, km)
        seconds = time.perf_counter() - start
        print(
            f"{km:>4} {r.status:28} {r.pulses:>11} {r.qber_estimate:>7.4f} {r.f:>6.3f} "
            f"{r.key_bits:>9} {r.key_bits / r.pulses:>10.2e} {r.key_bits / seconds:>10.0f} "
            f"{r.pulses / seconds:>10.0f}"
        )


if __name__ == "__main__":
    main()
