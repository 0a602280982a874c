"""Benchmark the strongswan-ppk sink against two real charons (root, namespaces, libipsec).

Prints:
1. PPK install latency over VICI (sink.install, no reauth): median and p99, plus the raw
   `load-shared` round trip for comparison;
2. install + reauthentication time (responder side, make-before-break), median and p99;
3. two charons with N connections (default 500) between them, each with its own PPK: total
   wall time and CPU of a whole rotation of all N links, both sides timed as the core runs them
   per link (the initiator's install, then the responder's install with its reauthentication):
   first the initial PPKs, then a rotation with reauthentication of all N IKE SAs. The two
   sides' sinks run in this one process, so "agents CPU" is the sum of both agents' CPU.

Usage: python bench/bench_ppk.py [--installs 2000] [--rotations 30] [--conns 500]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from qkdagent_strongswan import StrongswanPpkSink

from qkdagent import KeyMeta, Link, Options, PluginContext, Secret

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test bed
from testbed import CONN, PPK_ID, Charon, ConnSpec, Testbed, wait_until


def make_sink(charon: Charon, tmp: Path, name: str = "ppk", **options: Any) -> StrongswanPpkSink:
    table: dict[str, Any] = {
        "socket": str(charon.vici_path),
        "ppk_id": PPK_ID,
        "ike": CONN,
        "strongswan_conf": str(charon.strongswan_conf),
        "reauth_timeout": 30,
    }
    table.update(options)
    opts = Options(table, where=f"sinks.{name}")
    sink = StrongswanPpkSink(name, opts, PluginContext("bench", tmp))
    opts.finish()
    return sink


def meta(epoch: int) -> KeyMeta:
    return KeyMeta(epoch, (f"k{epoch}",), "ppk", time.time())


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def line(label: str, values: list[float]) -> None:
    ms = [v * 1000 for v in values]
    print(
        f"{label:<44} n={len(ms):<5} median={statistics.median(ms):8.3f} ms  "
        f"p99={pct(ms, 0.99):8.3f} ms  max={max(ms):8.3f} ms"
    )


async def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


async def bench_latency(installs: int, rotations: int) -> None:
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    with Testbed.open([ConnSpec(CONN, PPK_ID)], [ConnSpec(CONN, PPK_ID)]) as bed:
        alice = make_sink(bed.a, tmp)
        bob = make_sink(bed.b, tmp)
        await alice.prepare()
        await bob.prepare()
        ini, resp = Link("ab", "alice", "bob", True), Link("ab", "bob", "alice", False)

        session = bed.a.session()
        raw = []
        for _ in range(installs):
            data = os.urandom(32)
            start = time.perf_counter()
            session.load_shared({"id": "bench-raw", "type": "PPK", "data": data, "owners": ["x"]})
            raw.append(time.perf_counter() - start)
        session.transport.close()
        line("raw vici load-shared (blocking, no trio)", raw)

        lat = []
        for epoch in range(1, installs + 1):
            secret = Secret.random()
            lat.append(await timed(lambda s=secret, e=epoch: alice.install(ini, s, meta(e))))
        line("sink.install (trio -> worker thread -> VICI)", lat)

        await bob.install(resp, Secret(b"\0" * 32), meta(0))  # no SA yet: no reauth
        secret = Secret.random()
        await alice.install(ini, secret, meta(installs + 1))
        await bob.install(resp, secret, meta(installs + 1))
        assert await trio.to_thread.run_sync(bed.a.initiate, CONN)
        reauth, total = [], []
        for epoch in range(installs + 2, installs + 2 + rotations):
            secret = Secret.random()
            start = time.perf_counter()
            await alice.install(ini, secret, meta(epoch))
            reauth.append(await timed(lambda s=secret, e=epoch: bob.install(resp, s, meta(e))))
            total.append(time.perf_counter() - start)
        line("responder install + reauth (new SA up)", reauth)
        line("rotation: both installs + reauth", total)
        await alice.aclose()
        await bob.aclose()


async def bench_many(count: int, parallel: int) -> None:
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    specs = [ConnSpec(f"c{i}", f"qkd-c{i}", index=i + 1) for i in range(count)]
    started = time.perf_counter()
    with Testbed.open(specs, specs, retransmit_tries=3) as bed:
        print(
            f"\n{count} connections: testbed with swanctl --load-all up in "
            f"{time.perf_counter() - started:.2f} s"
        )
        # one sink per gateway serves every link: templates name the PPK_ID and connection
        links = [Link(f"c{i}", "alice", "bob", True) for i in range(count)]
        rlinks = [Link(f"c{i}", "bob", "alice", False) for i in range(count)]
        a_sink = make_sink(bed.a, tmp, ppk_id="qkd-{link}", ike="{link}", vici_timeout=60)
        b_sink = make_sink(bed.b, tmp, ppk_id="qkd-{link}", ike="{link}", vici_timeout=60)
        limiter = trio.CapacityLimiter(parallel)

        async def run_all(fn: Callable[[int], Any]) -> tuple[float, float, float, float]:
            """Wall time, agents' CPU, charon a CPU, charon b CPU of running fn(i) for all i."""
            cpu0, a0, b0 = time.process_time(), bed.a.cpu_seconds(), bed.b.cpu_seconds()
            start = time.perf_counter()

            async def one(i: int) -> None:
                async with limiter:
                    await fn(i)

            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(one, i)
            wall = time.perf_counter() - start
            agent = time.process_time() - cpu0
            return wall, agent, bed.a.cpu_seconds() - a0, bed.b.cpu_seconds() - b0

        async def rotate(i: int, epoch: int, secret: Secret) -> None:
            await a_sink.install(links[i], secret, meta(epoch))
            await b_sink.install(rlinks[i], secret, meta(epoch))

        secrets = [Secret.random() for _ in range(count)]
        wall, agents_cpu, a_cpu, b_cpu = await run_all(lambda i: rotate(i, 1, secrets[i]))
        print(
            f"first PPKs for {count} links, both sides ({parallel} links in flight, no IKE SA "
            f"yet): total {wall:.3f} s, agents CPU {agents_cpu:.3f} s, charon CPU "
            f"{a_cpu:.3f} s (a) + {b_cpu:.3f} s (b)"
        )

        start = time.perf_counter()
        # in batches: 500 simultaneous IKE_SA_INITs overrun 2 cores and charon gives up on some
        for first in range(0, count, 50):
            batch = range(first, min(count, first + 50))
            bed.a.initiate_nowait([f"c{i}" for i in batch])
            wait_until(
                lambda n=batch.stop: (
                    sum(sa.get("state") == "ESTABLISHED" for sa in bed.a.sas()) >= n
                ),
                60,
                "not every IKE SA came up",
                step=0.1,
            )
        print(f"initial IKE SAs for {count} connections up in {time.perf_counter() - start:.2f} s")

        secrets = [Secret.random() for _ in range(count)]
        wall, agents_cpu, a_cpu, b_cpu = await run_all(lambda i: rotate(i, 2, secrets[i]))
        ppk_sas = sum(
            1 for sa in bed.b.sas() if sa.get("ppk") == "yes" and sa.get("state") == "ESTABLISHED"
        )
        print(
            f"rotate {count} links, both sides, with reauthentication ({parallel} links in "
            f"flight): total {wall:.3f} s, agents CPU {agents_cpu:.3f} s, charon CPU "
            f"{b_cpu:.3f} s (b, reauthenticating) + {a_cpu:.3f} s (a); "
            f"IKE SAs with PPK afterwards: {ppk_sas}"
        )
        await a_sink.aclose()
        await b_sink.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--installs", type=int, default=2000)
    parser.add_argument("--rotations", type=int, default=30)
    parser.add_argument("--conns", type=int, default=500)
    parser.add_argument("--parallel", type=int, default=16)
    args = parser.parse_args()
    print(f"strongswan-ppk benchmark on {os.cpu_count()} cores")
    trio.run(bench_latency, args.installs, args.rotations)
    if args.conns:
        trio.run(bench_many, args.conns, args.parallel)


if __name__ == "__main__":
    main()
