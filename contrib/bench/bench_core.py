"""Core benchmark: rotation latency of one link, and an agent pair carrying many links.

    python contrib/bench/bench_core.py latency [--rotations 500]
    python contrib/bench/bench_core.py scale [--links 1,100,1000,10000] [--seconds 20]
    python contrib/bench/bench_core.py hold [--links 10000] [--interval 120] [--seconds 300]
    python contrib/bench/bench_core.py procs [--links 10000] [--interval 120] [--seconds 300]

`latency`, `scale` and `hold` run both agents in this process over real loopback HTTPS with
mutual TLS, with the in-memory source and recording sinks, state in a temp dir; CPU and peak
RSS are this process's (both agents together). `procs` runs each agent as its own
`qkdagent run` process (key source: the `keydir` test source on /dev/shm) and reports CPU and
peak RSS per agent. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from qkdagent.agent import Agent
from qkdagent.config import parse_config
from qkdagent.hookspecs import hookimpl
from qkdagent.plugins import Plugins
from qkdagent.testing import pair_configs
from qkdagent.testing.toml import config_toml

LINK = "alice-bob"


class Collector:
    def __init__(self) -> None:
        self.events: list[tuple[float, Any]] = []
        self.error_times: list[float] = []
        self.erasures: list[Any] = []

    @hookimpl
    def qkdagent_after_rotation(self, event: Any) -> None:
        self.events.append((trio.current_time(), event))

    @hookimpl
    def qkdagent_on_rotation_error(self, event: Any) -> None:
        self.error_times.append(trio.current_time())

    @hookimpl
    def qkdagent_after_erase(self, event: Any) -> None:
        if event.reason != "startup":
            self.erasures.append(event)


def configs(
    directory: Path, links: int, interval: float, jitter: float, parallel: int = 64
) -> dict[str, Any]:
    base = pair_configs(
        directory,
        alice={"sinks": {"rec": {"type": "recording"}}},
        bob={"sinks": {"rec": {"type": "recording"}}},
        link={"interval": interval, "jitter": jitter, "reject_after": max(interval * 1.5, 10)},
    )
    for config in base.values():
        config["agent"]["max_parallel_rotations"] = parallel
        template = config["links"].pop(LINK)
        for i in range(links):
            config["links"][f"link{i:05d}"] = dict(template)
    return base


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def run_pair(
    directory: Path, links: int, interval: float, jitter: float, seconds: float
) -> dict[str, Any]:
    cfg = configs(directory, links, interval, jitter)
    collector = Collector()
    stops = {"alice": trio.Event(), "bob": trio.Event()}
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        agents = {}
        for name in ("bob", "alice"):
            plugins = Plugins()
            if name == "alice":
                plugins.add("bench", collector, "bench")
            agent = Agent(parse_config(cfg[name]), plugins=plugins)
            await nursery.start(partial(agent.run, shutdown_trigger=stops[name].wait))
            agents[name] = agent
        ready = time.monotonic() - started
        cpu0, t0 = cpu(), trio.current_time()
        n0 = len(collector.events)
        await trio.sleep(seconds)
        cpu1, t1 = cpu(), trio.current_time()
        n1 = len(collector.events)
        stops["alice"].set()  # the initiator first, so shutdown causes no failed rotations
        with trio.move_on_after(30):
            while agents["alice"].links:  # noqa: ASYNC110
                await trio.sleep(0.05)
        stops["bob"].set()
    window = [e for t, e in collector.events if t0 <= t <= t1]
    per_link: dict[str, list[float]] = {}
    for t, e in collector.events:
        per_link.setdefault(e.link, []).append(t)
    max_gap = max(
        (b - a for times in per_link.values() for a, b in itertools.pairwise(times)),
        default=0.0,
    )
    rotations = n1 - n0
    return {
        "links": links,
        "startup_s": ready,
        "rotations": rotations,
        "rate": rotations / (t1 - t0),
        "cpu_core_fraction": (cpu1 - cpu0) / (t1 - t0),
        "cpu_ms_per_rotation": 1000 * (cpu1 - cpu0) / max(rotations, 1),
        "peak_rss_mb": peak_rss_mb(),
        "errors": sum(1 for t in collector.error_times if t0 <= t <= t1),
        "erasures": len(collector.erasures),
        "max_gap_s": max_gap,
        "durations": [e.duration for e in window],
        "links_rotated": len(per_link),
    }


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))] if values else float("nan")


def cmd_latency(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # interval long enough that rotations never overlap: measures one rotation end to end
        seconds = args.rotations * 0.05
        result = trio.run(run_pair, Path(tmp), 1, 0.05, 0.0, seconds)
    d = [x * 1000 for x in result["durations"]]
    print(f"one link, loopback mTLS, in-memory source: {len(d)} rotations")
    print(
        f"  start -> both sides installed: p50 {pct(d, 50):.2f} ms  p90 {pct(d, 90):.2f} ms  "
        f"p99 {pct(d, 99):.2f} ms  max {max(d):.2f} ms  (mean {statistics.mean(d):.2f})"
    )
    print(f"  CPU per rotation (both agents): {result['cpu_ms_per_rotation']:.2f} ms")


def cmd_scale(args: argparse.Namespace) -> None:
    print(f"agent pair, interval {args.interval} s, {args.seconds} s measured per size")
    print(
        f"{'links':>6} {'startup s':>9} {'rot/s':>8} {'CPU core':>8} {'CPU ms/rot':>10} "
        f"{'peak RSS MB':>11} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'erased':>6}"
    )
    for links in [int(x) for x in args.links.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            r = trio.run(run_pair, Path(tmp), links, args.interval, 0.1, args.seconds)
        d = [x * 1000 for x in r["durations"]]
        print(
            f"{links:>6} {r['startup_s']:>9.1f} {r['rate']:>8.1f} {r['cpu_core_fraction']:>8.2f} "
            f"{r['cpu_ms_per_rotation']:>10.2f} {r['peak_rss_mb']:>11.0f} {pct(d, 50):>7.1f} "
            f"{pct(d, 99):>7.1f} {r['errors']:>6} {r['erasures']:>6}",
            flush=True,
        )


def cmd_hold(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        r = trio.run(run_pair, Path(tmp), args.links, args.interval, 0.1, args.seconds)
    d = [x * 1000 for x in r["durations"]]
    print(f"{args.links} links at interval {args.interval} s, measured {args.seconds} s:")
    print(f"  startup (all links opened): {r['startup_s']:.1f} s")
    expected = args.links / args.interval / 0.95
    print(f"  rotations/s sustained: {r['rate']:.1f} (expected ≈ {expected:.1f})")
    print(
        f"  CPU: {r['cpu_core_fraction']:.2f} of a core "
        f"({r['cpu_ms_per_rotation']:.2f} ms/rotation, both agents)"
    )
    print(f"  peak RSS: {r['peak_rss_mb']:.0f} MB (both agents in one process)")
    print(f"  rotation latency p50 {pct(d, 50):.1f} ms, p99 {pct(d, 99):.1f} ms")
    deadline = max(args.interval * 1.5, 10)
    print(
        f"  errors {r['errors']}, reject_after erasures {r['erasures']}, largest gap between "
        f"a link's rotations {r['max_gap_s']:.1f} s (deadline {deadline:.0f} s)"
    )


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process, its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_mem_mb(pid: int) -> tuple[float, float]:
    """(peak RSS, current RSS) of a process in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmHWM:", "VmRSS:")):
            values[line[:5]] = int(line.split()[1]) / 1024
    return values.get("VmHWM", float("nan")), values.get("VmRSS", float("nan"))


def _status(url: str) -> dict[str, Any]:
    return httpx.get(url, timeout=60).json()


def cmd_procs(args: argparse.Namespace) -> None:
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    with tempfile.TemporaryDirectory(dir=shm) as keys, tempfile.TemporaryDirectory() as tmp:
        base = configs(Path(tmp), args.links, args.interval, 0.1, args.parallel)
        procs, status_urls = {}, {}
        for name in ("bob", "alice"):
            config = base[name]
            config["sources"] = {"sim": {"type": "keydir", "directory": keys}}
            config["agent"]["plugins"] = ["memory"]
            config["agent"]["log_format"] = "json"
            path = Path(tmp) / f"{name}.toml"
            path.write_text(config_toml(config))
            status_urls[name] = f"http://{config['agent']['status_listen']}/status"
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "qkdagent", "run", "-c", str(path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=open(Path(tmp) / f"{name}.log", "wb"),
            )
        try:
            started = time.monotonic()
            while True:
                time.sleep(1)
                try:
                    links = _status(status_urls["alice"])["links"]
                except (httpx.HTTPError, ValueError):
                    continue
                if len(links) == args.links and all(x["epoch"] >= 1 for x in links):
                    break
            startup = time.monotonic() - started
            cpu0 = {n: proc_cpu(p.pid) for n, p in procs.items()}
            first = _status(status_urls["alice"])["links"]
            epochs0 = sum(x["epoch"] for x in first)
            failures0 = sum(x["failures"] for x in first)
            t0 = time.monotonic()
            time.sleep(args.seconds)
            cpu1 = {n: proc_cpu(p.pid) for n, p in procs.items()}
            t1 = time.monotonic()
            final = {n: _status(u)["links"] for n, u in status_urls.items()}
            hwm = {n: proc_mem_mb(p.pid)[0] for n, p in procs.items()}
        finally:
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)
            for proc in procs.values():
                proc.wait(timeout=60)
    rotations = sum(x["epoch"] for x in final["alice"]) - epochs0
    rate = rotations / (t1 - t0)
    lat = [x["last_rotation_ms"] for x in final["alice"] if x["last_rotation_ms"] is not None]
    ages = [x["key_age"] for x in final["alice"] + final["bob"] if x["key_age"] is not None]
    print(
        f"{args.links} links, interval {args.interval} s, each agent its own process, "
        f"measured {args.seconds:.0f} s after all links' first rotation ({startup:.1f} s)"
    )
    print(
        f"  rotations/s sustained: {rate:.1f} (expected ≈ {args.links / args.interval / 0.95:.1f})"
    )
    for name in ("alice", "bob"):
        share = (cpu1[name] - cpu0[name]) / (t1 - t0)
        print(
            f"  {name:<5} ({'initiator' if name == 'alice' else 'responder'}): CPU {share:.2f} "
            f"of a core, {1000 * share / max(rate, 1e-9):.2f} ms/rotation, "
            f"peak RSS {hwm[name]:.0f} MB"
        )
    print(
        f"  latest rotation per link (initiator): p50 {pct(lat, 50):.1f} ms, "
        f"p99 {pct(lat, 99):.1f} ms"
    )
    failures = sum(x["failures"] for x in final["alice"]) - failures0
    erased = sum(1 for x in final["alice"] + final["bob"] if x["erased"])
    print(
        f"  failed attempts {failures}, links erased {erased}, oldest key {max(ages):.0f} s "
        f"(reject_after {max(args.interval * 1.5, 10):.0f} s)"
    )


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("latency")
    p.add_argument("--rotations", type=int, default=500)
    p = sub.add_parser("scale")
    p.add_argument("--links", default="1,100,1000,10000")
    p.add_argument("--interval", type=float, default=5.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p = sub.add_parser("hold")
    p.add_argument("--links", type=int, default=10000)
    p.add_argument("--interval", type=float, default=120.0)
    p.add_argument("--seconds", type=float, default=300.0)
    p = sub.add_parser("procs")
    p.add_argument("--parallel", type=int, default=64, help="[agent] max_parallel_rotations")
    p.add_argument("--links", type=int, default=10000)
    p.add_argument("--interval", type=float, default=120.0)
    p.add_argument("--seconds", type=float, default=300.0)
    args = parser.parse_args()
    commands = {"latency": cmd_latency, "scale": cmd_scale, "hold": cmd_hold, "procs": cmd_procs}
    commands[args.cmd](args)


if __name__ == "__main__":
    main()
