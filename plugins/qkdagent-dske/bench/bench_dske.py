"""Keys per second through 5 hubs with k = 3 on loopback, latency p50/p99, PSRD bytes per
256-bit key, and CPU per key measured separately for the hubs and the clients.

Each hub is its own `qkdagent dske-hub` process (mutual TLS, durable state in a temporary
directory, started with --ready-file); both clients (alice the initiator, bob the responder)
run in this process. Hub CPU comes from /proc/PID/stat (utime + stime of the five hub
processes), client CPU from `os.times()`, both over the measured keys only (the
warm-up keys register, fetch PSRD and open the connections).

    python3 plugins/qkdagent-dske/bench/bench_dske.py [--keys 3000] [--parallel 256]
        [--no-batch]      # one request per share, as against dske-python's hubs
        [--profile DIR]   # py-spy record -f raw of one hub and of the clients, into DIR

`--parallel` is the number of keys in flight at once: one agent pair with that many links
rotating together (the batching coalesces their requests per hub).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from qkdagent_dske.source import DskeSource

from qkdagent import Link, write_test_pki
from qkdagent.testing import build_component, running

ALICE = Link("l", "alice", "bob", True)
BOB = Link("l", "bob", "alice", False)
HUBS = ["hank", "helen", "hilary", "holly", "hugo"]
TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> tuple[float, float]:
    """utime and stime of a process in seconds (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def start_hubs(path: Path) -> tuple[list[subprocess.Popen[bytes]], dict[str, int]]:
    pki = path / "pki"
    procs, ready = [], {}
    for hub in HUBS:
        ready[hub] = path / f"{hub}.port"
        argv = [
            sys.executable, "-m", "qkdagent", "dske-hub", "--name", hub,
            "--state", str(path / hub), "--cert", str(pki / f"{hub}.pem"),
            "--key", str(pki / f"{hub}.key"), "--ca", str(pki / "ca.pem"),
            "--ready-file", str(ready[hub]),
        ]  # fmt: skip
        procs.append(subprocess.Popen(argv, stderr=subprocess.DEVNULL))
    deadline = time.monotonic() + 30
    while not all(f.exists() for f in ready.values()):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise SystemExit("the hubs did not start")
        time.sleep(0.05)
    return procs, {hub: int(f.read_text()) for hub, f in ready.items()}


def hub_table(path: Path, ports: dict[str, int], agent: str) -> dict[str, dict[str, str]]:
    pki = path / "pki"
    return {
        hub: {
            "url": f"https://127.0.0.1:{port}/{hub}",
            "ca": str(pki / "ca.pem"),
            "cert": str(pki / f"{agent}.pem"),
            "key": str(pki / f"{agent}.key"),
        }
        for hub, port in ports.items()
    }


def py_spy(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes]:
    argv = ["py-spy", "record", "-f", "raw", "-r", "200", "--gil", "--pid", str(pid)]
    argv += ["-d", str(max(1, int(seconds))), "-o", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def measure(path: Path, ports: dict[str, int], pids: list[int], args: argparse.Namespace):
    sources = [
        build_component(
            DskeSource,
            {
                "hubs": hub_table(path, ports, agent),
                "k": 3,
                "refill_every": 3600,
                "batch": args.batch,
            },
            name="dske",
            agent=agent,
            state_dir=path / agent,
        )
        for agent in ("alice", "bob")
    ]
    alice, bob = sources
    async with running(alice, bob):

        def free() -> int:
            return sum(s.psrd.free(h, o) for s in sources for h in HUBS for o in ("client", "hub"))

        latencies: list[float] = []

        async def run_keys(count: int) -> None:
            todo = iter(range(count))

            async def worker() -> None:
                for _ in todo:
                    t0 = time.perf_counter()
                    key = await alice.new_key(ALICE)
                    same = await bob.key_by_id(BOB, key.key_id)
                    assert same.value == key.value
                    latencies.append(time.perf_counter() - t0)

            async with trio.open_nursery() as nursery:
                for _ in range(args.parallel):
                    nursery.start_soon(worker)

        await run_keys(max(args.parallel * 2, 16))  # warm-up: connections, first blocks
        latencies.clear()
        spies = []
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            seconds = args.keys / 40
            spies = [
                py_spy(pids[0], args.profile / "hub.txt", seconds),
                py_spy(os.getpid(), args.profile / "clients.txt", seconds),
            ]
            await trio.sleep(1.0)  # py-spy attaches

        def requests() -> int:
            return sum(alice.batches_sent.values()) + sum(bob.batches_sent.values())

        before_free, before_requests = free(), requests()
        hub0 = [proc_cpu(p) for p in pids]
        cpu0, t0 = os.times(), time.perf_counter()
        await run_keys(args.keys)
        elapsed, cpu1 = time.perf_counter() - t0, os.times()
        cpu = (cpu1.user - cpu0.user, cpu1.system - cpu0.system)
        hub1 = [proc_cpu(p) for p in pids]
        hub_user = sum(b[0] - a[0] for a, b in zip(hub0, hub1, strict=True))
        hub_sys = sum(b[1] - a[1] for a, b in zip(hub0, hub1, strict=True))
        used = before_free - free()
        batches = requests() - before_requests
        for spy in spies:
            spy.wait()
    return elapsed, cpu, (hub_user, hub_sys), used, batches, sorted(latencies)


def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        write_test_pki(path / "pki", [*HUBS, "alice", "bob"])
        procs, ports = start_hubs(path)
        try:
            pids = [p.pid for p in procs]
            measured = trio.run(measure, path, ports, pids, args)
            elapsed, cpu, hub_cpu, used, batches, latencies = measured
        finally:
            for proc in procs:
                proc.terminate()
            codes = [proc.wait(10) for proc in procs]
    keys = args.keys
    cores = os.cpu_count()
    mode = "batches" if args.batch else "one request per share"
    print(
        f"keys: {keys}, parallel: {args.parallel}, hubs: 5 processes, k: 3, cores: {cores}, {mode}"
    )
    print(f"keys/s: {keys / elapsed:.1f}")
    print(f"latency p50: {latencies[len(latencies) // 2] * 1e3:.1f} ms")
    print(f"latency p99: {latencies[int(len(latencies) * 0.99)] * 1e3:.1f} ms")
    print(f"PSRD bytes per key (both clients' view): {used / keys:.0f}")
    if args.batch:
        print(
            f"batch requests per key (all hubs, both sides): {batches / keys:.3f} "
            f"({keys * 10 / max(batches, 1):.1f} shares per batch)"
        )
    user, system = hub_cpu
    print(
        f"hub CPU per key (5 hubs together): {(user + system) / keys * 1e3:.2f} ms "
        f"(user {user / keys * 1e3:.2f}, system {system / keys * 1e3:.2f})"
    )
    user, system = cpu
    print(
        f"client CPU per key (initiator + responder): {(user + system) / keys * 1e3:.2f} ms "
        f"(user {user / keys * 1e3:.2f}, system {system / keys * 1e3:.2f})"
    )
    print(f"hub exit codes after SIGTERM: {codes}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=3000)
    parser.add_argument("--parallel", type=int, default=256)
    parser.add_argument("--no-batch", dest="batch", action="store_false")
    parser.add_argument("--profile", type=Path, help="write py-spy raw profiles here")
    logging.basicConfig(level=logging.WARNING)
    main(parser.parse_args())
