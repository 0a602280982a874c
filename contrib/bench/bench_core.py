"""Core benchmark: rotation latency of one link, and an agent pair carrying many links.

    python contrib/bench/bench_core.py latency [--rotations 500] [--runs 3] [--in-situ]
        [--state-dir DIR] [--no-settle]
    python contrib/bench/bench_core.py scale [--links 1,100,1000,10000] [--seconds 20]
    python contrib/bench/bench_core.py hold [--links 10000] [--interval 120] [--seconds 300]
    python contrib/bench/bench_core.py procs [--links 10000] [--interval 120] [--seconds 300]
        [--runs 3]
    python contrib/bench/bench_core.py memory [--links 10000] [--side alice|bob] [--top 25]
    python contrib/bench/bench_core.py scrape [--links 10000] [--agent]

`latency`, `scale` and `hold` run both agents in this process over real loopback HTTPS with
mutual TLS, with the in-memory source and recording sinks, state in a temp dir, the garbage
collector set as `qkdagent run` sets it once ready; CPU and peak RSS are this process's (both
agents together). `procs` runs each agent as its own
`qkdagent run` process (key source: the `keydir` test source on /dev/shm, file sinks there
too) and reports per agent the time to ready (every link opened) and the RSS then, CPU per
rotation and RSS over the window; `--runs N` gives min/median/max. `memory` runs one agent in
this process under tracemalloc (its peer a process) and prints the top allocation sites in bytes
per link. `scrape` times one agent's `/metrics` body at N links (the samples a rotating link
has) against prometheus_client writing the same families (`generate_latest`), in one run;
with `--agent`, how long `/status` and `/metrics` hold a running agent's event loop, written in
one go and as the agent serves them (in pieces).
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
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
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from qkdagent.agent import Agent
from qkdagent.config import parse_config
from qkdagent.heap import settle_heap
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
    directory: Path,
    links: int,
    interval: float,
    jitter: float,
    seconds: float,
    settle: bool = True,
) -> dict[str, Any]:
    thresholds = gc.get_threshold()
    try:
        return await _run_pair(directory, links, interval, jitter, seconds, settle)
    finally:  # what this run froze is collected with the next run's start-up (`scale`)
        gc.unfreeze()
        gc.set_threshold(*thresholds)


async def _run_pair(
    directory: Path, links: int, interval: float, jitter: float, seconds: float, settle: bool
) -> dict[str, Any]:
    cfg = configs(directory, links, interval, jitter)
    collector = Collector()
    responder = Collector()  # bob's installs: a rotation ends when both sides installed
    stops = {"alice": trio.Event(), "bob": trio.Event()}
    ended = {"alice": trio.Event(), "bob": trio.Event()}
    started = time.monotonic()

    async def run(agent: Agent, name: str, task_status: trio.TaskStatus[Agent]) -> None:
        try:
            await agent.run(shutdown_trigger=stops[name].wait, task_status=task_status)
        finally:
            ended[name].set()

    async with trio.open_nursery() as nursery:
        agents = {}
        for name in ("bob", "alice"):
            plugins = Plugins()
            plugins.add("bench", collector if name == "alice" else responder, "bench")
            agent = Agent(parse_config(cfg[name]), plugins=plugins)
            await nursery.start(run, agent, name)
            agents[name] = agent
        ready = time.monotonic() - started
        if settle:  # as `qkdagent run` does once its agent is ready (qkdagent/heap.py)
            settle_heap()
        cpu0, t0 = cpu(), trio.current_time()
        n0 = len(collector.events)
        await trio.sleep(seconds)
        cpu1, t1 = cpu(), trio.current_time()
        n1 = len(collector.events)
        stops["alice"].set()  # the initiator first, so shutdown causes no failed rotations
        with trio.move_on_after(30):
            await ended["alice"].wait()
        stops["bob"].set()
    window = [(t, e) for t, e in collector.events if t0 <= t <= t1]
    # bob acknowledges alice's commit once durable and installs after: his event may come last
    installed = {(e.link, e.epoch): t for t, e in responder.events}
    durations = [
        max(t, installed[e.link, e.epoch]) - (t - e.duration)
        for t, e in window
        if (e.link, e.epoch) in installed
    ]
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
        "durations": durations,
        "unmatched": len(window) - len(durations),
        "links_rotated": len(per_link),
    }


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))] if values else float("nan")


class InSitu:
    """Times a few pure functions of the rotation's path as they run in it, to set beside the
    same calls repeated in a tight loop: how much slower the path's code runs once per rotation,
    among the rest of the path's code (caches and branch predictors cold), than warm
    (`--in-situ`)."""

    NAMES = (("protocol", "build"), ("protocol", "parse"), ("ratchet", "rotate"))

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}
        self.last: dict[str, tuple[Any, tuple[Any, ...], dict[str, Any]]] = {}
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> InSitu:
        for module_name, name in self.NAMES:
            module = importlib.import_module(f"qkdagent.{module_name}")
            original = getattr(module, name)
            self._saved.append((module, name, original))
            setattr(module, name, self._timed(f"{module_name}.{name}", original))
        return self

    def __exit__(self, *exc: object) -> None:
        for module, name, original in self._saved:
            setattr(module, name, original)

    def _timed(self, key: str, original: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds.setdefault(key, []).append(time.perf_counter() - started)
                self.last[key] = (original, args, kwargs)

        return timed

    def report(self) -> None:
        print("  in the path (median of its calls) against the last call repeated warm:")
        for key, values in self.seconds.items():
            original, args, kwargs = self.last[key]
            loops = 2000
            started = time.perf_counter()
            for _ in range(loops):
                original(*args, **kwargs)
            warm = (time.perf_counter() - started) / loops
            situ = statistics.median(values)
            print(
                f"    {key:18} {situ * 1e6:6.1f} us in the path, {warm * 1e6:6.1f} us warm "
                f"(x{situ / warm:.1f}, {len(values)} calls)"
            )


def storage_floor(directory: str | None, samples: int = 40) -> tuple[float, float]:
    """p50 seconds of an fdatasync of a small overwrite (two 1 KiB pieces, as a commit's log
    frames) in `directory`: after 50 ms without I/O (as at a rotation's start), and right after
    the previous one. Two such syncs are on each rotation's path; on a VM the first after a
    pause can cost several times the second (the host wakes its I/O path)."""
    idle: list[float] = []
    busy: list[float] = []
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        fd = os.open(os.path.join(tmp, "floor"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, bytes(32768), 0)
            os.fsync(fd)
            for i in range(2 * samples):
                pause = i % 2 == 0
                if pause:
                    time.sleep(0.05)
                os.pwrite(fd, os.urandom(1048), 100 + (i % 4) * 1048)
                os.pwrite(fd, os.urandom(1048), 5000 + (i % 4) * 1048)
                started = time.perf_counter()
                os.fdatasync(fd)
                (idle if pause else busy).append(time.perf_counter() - started)
        finally:
            os.close(fd)
    return statistics.median(idle), statistics.median(busy)


def cmd_latency(args: argparse.Namespace) -> None:
    runs = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(dir=args.state_dir) as tmp:
            # interval long enough that rotations never overlap: measures one rotation end to end
            seconds = args.rotations * 0.05
            with InSitu() if args.in_situ else contextlib.nullcontext() as timed:
                result = trio.run(run_pair, Path(tmp), 1, 0.05, 0.0, seconds, not args.no_settle)
        d = [x * 1000 for x in result["durations"]]
        runs.append((pct(d, 50), pct(d, 99), result["cpu_ms_per_rotation"]))
        print(f"one link, loopback mTLS, in-memory source: {len(d)} rotations (run {i + 1})")
        print(
            f"  start -> both sides installed: p50 {pct(d, 50):.2f} ms  p90 {pct(d, 90):.2f} ms  "
            f"p99 {pct(d, 99):.2f} ms  max {max(d):.2f} ms  (mean {statistics.mean(d):.2f})"
        )
        print(f"  CPU per rotation (both agents): {result['cpu_ms_per_rotation']:.2f} ms")
        if result["unmatched"]:
            print(f"  ({result['unmatched']} rotations left out: no install seen on the responder)")
        if timed is not None:
            timed.report()
    if len(runs) > 1:
        p50s, p99s, cpus = zip(*runs, strict=True)
        print(f"over {len(runs)} runs (min/median/max):")
        print(f"  p50 {_spread(list(p50s))} ms, p99 {_spread(list(p99s))} ms")
        print(f"  CPU per rotation (both agents) {_spread(list(cpus))} ms")
    idle, busy = storage_floor(args.state_dir)
    print(
        f"storage under {args.state_dir or tempfile.gettempdir()} (state files): fdatasync of "
        f"a small write p50 {idle * 1000:.3f} ms after 50 ms without I/O, {busy * 1000:.3f} ms "
        "right after another (two syncs are on each rotation's path)"
    )


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
    return sum(proc_cpu_split(pid))


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """CPU seconds of a process in user mode and in the kernel (its fsyncs' and sockets'
    work), its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def proc_mem_mb(pid: int) -> tuple[float, float]:
    """(peak RSS, current RSS) of a process in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmHWM:", "VmRSS:")):
            values[line[:5]] = int(line.split()[1]) / 1024
    return values.get("VmHWM", float("nan")), values.get("VmRSS", float("nan"))


def _status(url: str) -> dict[str, Any]:
    return httpx.get(url, timeout=60).json()


def _wait_ready(log: Path, proc: subprocess.Popen[bytes], started: float) -> tuple[float, float]:
    """Seconds from spawn until the agent logs "ready" (every link opened, its sinks in a
    defined state), and its RSS then (MB); read from its log, so the agent is not touched."""
    offset = 0
    while True:
        with open(log, "rb") as f:
            f.seek(max(0, offset - 20))  # the marker may straddle two reads
            data = f.read()
        if b" ready: " in data:
            return time.monotonic() - started, proc_mem_mb(proc.pid)[1]
        offset += len(data) - min(offset, 20)
        if proc.poll() is not None:
            raise SystemExit(f"bench: agent exited before it was ready (see {log})")
        time.sleep(0.05)


def process_configs(
    tmp: Path, keys: Path, out: Path, args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """The pair's configs for `procs` and `memory`: keydir source (on /dev/shm), file sinks
    (or recording ones, which keep every install), JSON logs."""
    base = configs(tmp, args.links, args.interval, 0.1, args.parallel)
    for name, config in base.items():
        config["sources"] = {"sim": {"type": "keydir", "directory": str(keys)}}
        if args.sink == "file":
            (out / name).mkdir()
            config["sinks"] = {"rec": {"type": "file", "path": str(out / name / "{link}.psk")}}
        config["agent"]["plugins"] = ["memory"]
        config["agent"]["log_format"] = "json"
        if getattr(args, "grid", None) is not None:
            for link in config["links"].values():
                link["grid"] = args.grid
    return base


def spawn(config: dict[str, Any], tmp: Path, name: str) -> subprocess.Popen[bytes]:
    path = tmp / f"{name}.toml"
    path.write_text(config_toml(config))
    return subprocess.Popen(
        [sys.executable, "-m", "qkdagent", "run", "-c", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / f"{name}.log", "wb"),
    )


@contextlib.contextmanager
def _process_pair(args: argparse.Namespace) -> Iterator[tuple[dict[str, dict[str, Any]], Path]]:
    """The `procs` pair's configs (`process_configs`: key files and sink files on /dev/shm)
    and the directory for their state and logs, all removed when the block ends."""
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    with (
        tempfile.TemporaryDirectory(dir=shm) as keys,
        tempfile.TemporaryDirectory(dir=shm) as out,
        tempfile.TemporaryDirectory() as tmp,
    ):
        yield process_configs(Path(tmp), Path(keys), Path(out), args), Path(tmp)


def procs_once(args: argparse.Namespace) -> dict[str, Any]:
    """One run of `procs`: two `qkdagent run` processes, N links; figures per agent."""
    with _process_pair(args) as (base, tmp):
        procs, status_urls, logs = {}, {}, {}
        started = time.monotonic()
        for name in ("bob", "alice"):
            status_urls[name] = f"http://{base[name]['agent']['status_listen']}/status"
            logs[name] = tmp / f"{name}.log"
            procs[name] = spawn(base[name], tmp, name)
        try:
            ready = {n: _wait_ready(logs[n], p, started) for n, p in procs.items()}
            while True:
                time.sleep(1)
                try:
                    links = _status(status_urls["alice"])["links"]
                except (httpx.HTTPError, ValueError):
                    continue
                if len(links) == args.links and all(x["epoch"] >= 1 for x in links):
                    break
            rotated = time.monotonic() - started
            # All links rotated at start-up; the window opens when the second round begins
            # (interval minus jitter later), so it holds rotations and not only the quiet gap:
            # once 1% of the links are on it (one link retried at start-up is not the round),
            # polled often enough for a round of a few seconds (a /status at 10,000 links is
            # not free: at most every 2 s).
            started_round = max(1, args.links // 100)
            while (
                sum(x["epoch"] >= 2 for x in _status(status_urls["alice"])["links"]) < started_round
            ):
                time.sleep(min(2.0, args.interval / 50))
            first = _status(status_urls["alice"])["links"]
            epochs0 = sum(x["epoch"] for x in first)
            failures0 = sum(x["failures"] for x in first)
            metrics_urls = {n: u.replace("/status", "/metrics") for n, u in status_urls.items()}
            scraped0 = {n: httpx.get(u, timeout=60).text for n, u in metrics_urls.items()}
            cpu0 = {n: proc_cpu_split(p.pid) for n, p in procs.items()}
            t0 = time.monotonic()
            time.sleep(args.seconds)
            cpu1 = {n: proc_cpu_split(p.pid) for n, p in procs.items()}
            t1 = time.monotonic()
            scraped1 = {n: httpx.get(u, timeout=60).text for n, u in metrics_urls.items()}
            batched0, batched1 = _batched(scraped0["bob"]), _batched(scraped1["bob"])
            blocking0 = {n: _blocking(text) for n, text in scraped0.items()}
            blocking1 = {n: _blocking(text) for n, text in scraped1.items()}
            mem = {n: proc_mem_mb(p.pid) for n, p in procs.items()}
            final = {n: _status(u)["links"] for n, u in status_urls.items()}
        finally:
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)
            for proc in procs.values():
                proc.wait(timeout=120)
    rotations = sum(x["epoch"] for x in final["alice"]) - epochs0
    rate = rotations / (t1 - t0)
    ages = [x["key_age"] for x in final["alice"] + final["bob"] if x["key_age"] is not None]
    return {
        "ready_s": {n: r[0] for n, r in ready.items()},
        "ready_rss_mb": {n: r[1] for n, r in ready.items()},
        "rotated_s": rotated,
        "rate": rate,
        "cpu_ms": {n: 1000 * (sum(cpu1[n]) - sum(cpu0[n])) / max(rotations, 1) for n in procs},
        "sys_ms": {n: 1000 * (cpu1[n][1] - cpu0[n][1]) / max(rotations, 1) for n in procs},
        "core": {n: (sum(cpu1[n]) - sum(cpu0[n])) / (t1 - t0) for n in procs},
        "peak_rss_mb": {n: m[0] for n, m in mem.items()},
        "rss_mb": {n: m[1] for n, m in mem.items()},
        "lat": [x["last_rotation_ms"] for x in final["alice"] if x["last_rotation_ms"]],
        "failures": sum(x["failures"] for x in final["alice"]) - failures0,
        "erased": sum(1 for x in final["alice"] + final["bob"] if x["erased"]),
        "oldest_key_s": max(ages),
        "batches": batched1[0] - batched0[0],
        "batched": batched1[1] - batched0[1],
        "blocking": {
            n: tuple(b - a for a, b in zip(blocking0[n], blocking1[n], strict=True)) for n in procs
        },
    }


def _samples(metrics: str, prefix: str) -> list[Sample]:
    """The samples of an agent's `/metrics` text whose names start with `prefix` (only those
    lines parsed: at 10,000 links the text holds every link's samples)."""
    lines = "\n".join(line for line in metrics.splitlines() if line.startswith(prefix))
    return [s for family in text_string_to_metric_families(lines) for s in family.samples]


def _batched(metrics: str) -> tuple[float, float]:
    """Batches and the requests they carried, received so far (the responder's metrics)."""
    found = {s.name: s.value for s in _samples(metrics, "qkdagent_peer_batche")}
    return (
        found.get("qkdagent_peer_batches_received_total", 0.0),
        found.get("qkdagent_peer_batched_requests_received_total", 0.0),
    )


def _blocking(metrics: str) -> tuple[float, float, float]:
    """An agent's short blocking calls so far (`inline.loop_gate`, every kind): on the event
    loop, on threads, and cooldowns that sent a kind to threads (each hop to a thread costs
    CPU: a run's figures move with them)."""
    found = {"loop": 0.0, "thread": 0.0, "cooldowns": 0.0}
    for s in _samples(metrics, "qkdagent_blocking_call"):
        if s.name == "qkdagent_blocking_calls_total":
            found[s.labels["where"]] += s.value
        elif s.name == "qkdagent_blocking_call_cooldowns_total":
            found["cooldowns"] += s.value
    return found["loop"], found["thread"], found["cooldowns"]


def _spread(values: list[float], fmt: str = ".2f") -> str:
    """min/median/max of several runs (one value when there was one run)."""
    if len(values) == 1:
        return format(values[0], fmt)
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{low:{fmt}}/{mid:{fmt}}/{high:{fmt}}"


def cmd_procs(args: argparse.Namespace) -> None:
    runs = []
    for i in range(args.runs):
        runs.append(r := procs_once(args))
        print(
            f"run {i + 1}: ready {r['ready_s']['alice']:.1f}/{r['ready_s']['bob']:.1f} s, "
            f"{r['rate']:.1f} rot/s, CPU ms/rotation {r['cpu_ms']['alice']:.2f}/"
            f"{r['cpu_ms']['bob']:.2f}, peak RSS {r['peak_rss_mb']['alice']:.0f}/"
            f"{r['peak_rss_mb']['bob']:.0f} MB (alice/bob)",
            flush=True,
        )
    print(
        f"{args.links} links, interval {args.interval} s, keydir source, {args.sink} sinks, "
        f"each agent its own process, {args.seconds:.0f} s measured from the start of the "
        f"second round of rotations; {len(runs)} run(s), min/median/max"
    )

    def each(key: str, name: str) -> list[float]:
        return [r[key][name] for r in runs]

    print(
        f"  all links rotated once after {_spread([r['rotated_s'] for r in runs], '.1f')} s; "
        f"rotations/s {_spread([r['rate'] for r in runs], '.1f')} "
        f"(expected ≈ {args.links / args.interval / 0.95:.1f})"
    )
    if args.seconds < args.interval:
        # start-up opens every link at once, so the second round is bunched: a shorter window
        # sees only that burst (more batching per commit and per wake than a steady state)
        print(
            f"  (the window is shorter than the interval: it measures the bunched second round; "
            f"--seconds {args.interval:.0f} covers a whole interval)"
        )
    for name in ("alice", "bob"):
        print(
            f"  {name:<5} ({'initiator' if name == 'alice' else 'responder'}): "
            f"startup to ready {_spread(each('ready_s', name), '.1f')} s at RSS "
            f"{_spread(each('ready_rss_mb', name), '.0f')} MB; CPU "
            f"{_spread(each('cpu_ms', name))} ms/rotation (kernel {_spread(each('sys_ms', name))}; "
            f"{_spread(each('core', name))} "
            f"of a core); RSS peak {_spread(each('peak_rss_mb', name), '.0f')} MB, "
            f"end {_spread(each('rss_mb', name), '.0f')} MB"
        )
    for name in ("alice", "bob"):
        on_loop, on_threads, cooldowns = ([r["blocking"][name][i] for r in runs] for i in range(3))
        print(
            f"  {name:<5} blocking calls (commits, file writes) on threads "
            f"{_spread(on_threads, '.0f')}, on the event loop {_spread(on_loop, '.0f')}; "
            f"cooldowns of a kind {_spread(cooldowns, '.0f')} (a hop to a thread costs CPU)"
        )
    batches = sum(r["batches"] for r in runs)
    print(
        f"  requests in batches: {sum(r['batched'] for r in runs):.0f} in {batches:.0f} batches "
        f"(about {2 * sum(r['rate'] * args.seconds for r in runs):.0f} requests in all)"
    )
    lat = [x for r in runs for x in r["lat"]]
    print(
        "  latest rotation per link (initiator, to the peer's commit ack): "
        f"p50 {pct(lat, 50):.1f} ms, p99 {pct(lat, 99):.1f} ms"
    )
    print(
        f"  failed attempts {_spread([r['failures'] for r in runs], '.0f')}, links erased "
        f"{_spread([r['erased'] for r in runs], '.0f')}, oldest key "
        f"{_spread([r['oldest_key_s'] for r in runs], '.0f')} s "
        f"(reject_after {max(args.interval * 1.5, 10):.0f} s)"
    )


@contextlib.contextmanager
def _peer_process(args: argparse.Namespace, side: str) -> Iterator[dict[str, Any]]:
    """`side`'s config of the `procs` pair (`process_configs`), its peer running as a
    `qkdagent run` process until the block ends (for `memory` and `scrape --agent`)."""
    with _process_pair(args) as (base, tmp):
        peer = "bob" if side == "alice" else "alice"
        proc = spawn(base[peer], tmp, peer)
        try:
            yield base[side]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)


@contextlib.asynccontextmanager
async def _rotated_agent(config: dict[str, Any], links: int) -> AsyncIterator[tuple[Agent, float]]:
    """One agent in this process, once each of its links has committed, and the seconds from
    its start to ready (every link opened); stopped when the block ends."""
    stop = trio.Event()
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        agent = Agent(parse_config(config))
        await nursery.start(partial(agent.run, shutdown_trigger=stop.wait))
        ready = trio.current_time() - started
        while sum(agent.link(n).record.epoch >= 1 for n in agent.links) < links:  # noqa: ASYNC110
            await trio.sleep(0.5)
        try:
            yield agent, ready
        finally:
            stop.set()


async def _traced_agent(config: dict[str, Any], links: int, settle: float) -> float:
    """Run one agent until each of its links committed once and `settle` more seconds, then
    take the tracemalloc snapshot; returns the seconds from start to ready."""
    async with _rotated_agent(config, links) as (_, ready):
        await trio.sleep(settle)
        gc.collect()
        memory["snapshot"] = tracemalloc.take_snapshot()
    return ready


memory: dict[str, tracemalloc.Snapshot] = {}


def cmd_memory(args: argparse.Namespace) -> None:
    """tracemalloc of one agent at N links (its peer a `qkdagent run` process), after every
    link's first rotation: the top allocation sites, and bytes per link."""
    with _peer_process(args, args.side) as config:
        tracemalloc.start(args.frames)
        ready = trio.run(_traced_agent, config, args.links, args.settle)
    snapshot = memory["snapshot"].filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<unknown>")]
    )
    stats = snapshot.statistics("traceback" if args.frames > 1 else "lineno")
    total = sum(s.size for s in stats)
    role = "initiator" if args.side == "alice" else "responder"
    print(
        f"{args.side} ({role}), {args.links} links, after every link's first rotation "
        f"(+{args.settle:g} s); ready after {ready:.1f} s under tracemalloc"
    )
    print(
        f"  traced: {total / 2**20:.1f} MB, {total / args.links:.0f} bytes per link; "
        f"top {args.top} sites:"
    )
    print(f"  {'KB':>8} {'B/link':>7} {'blocks':>8}  where")
    root = str(Path(__file__).resolve().parents[2])
    for stat in stats[: args.top]:
        frames = [f"{f.filename.replace(root + '/', '')}:{f.lineno}" for f in stat.traceback]
        print(
            f"  {stat.size / 1024:>8.0f} {stat.size / args.links:>7.0f} {stat.count:>8}  "
            + " < ".join(frames)
        )


async def _longest_hold(work: Any) -> float:
    """Seconds of the longest stretch in which the event loop gave a task that only yields
    no turn, while `await work()` ran (what every link's timers and the peer API waited)."""
    longest = 0.0
    done = False
    beating = trio.Event()

    async def heartbeat() -> None:
        nonlocal longest
        last = time.perf_counter()
        while not done:
            await trio.lowlevel.checkpoint()
            now = time.perf_counter()
            if beating.is_set():
                longest = max(longest, now - last)
            beating.set()
            last = now

    async with trio.open_nursery() as nursery:
        nursery.start_soon(heartbeat)
        await beating.wait()  # its clock runs before the work starts
        await work()
        done = True
    return longest


async def _scrape_agent(config: dict[str, Any], links: int, repeat: int) -> None:
    """One agent at `links` links, once each has committed: how long a `/status` document and
    a `/metrics` scrape hold its loop, in one go and as served (in pieces)."""
    from qkdagent.observability import status_body, status_json

    async with _rotated_agent(config, links) as (agent, _):

        async def one_go_status() -> bytes:
            return status_json(agent._status())

        async def one_go_metrics() -> bytes:
            return agent.metrics.exposition()

        async def served_status() -> bytes:
            return await status_body(agent._status())

        print(f"one agent at {links} links, each rotated once: longest hold of its event loop")
        print(f"while the body is written, ms (min/median/max of {repeat}):")
        works = (
            ("/status in one go", one_go_status),
            ("/status as served", served_status),
            ("/metrics in one go", one_go_metrics),
            ("/metrics as served", agent.metrics.scrape),
        )
        for name, work in works:
            holds = [await _longest_hold(work) * 1000 for _ in range(repeat)]
            print(f"  {name:<20} {_spread(holds, '.1f')}")


def cmd_scrape(args: argparse.Namespace) -> None:
    if args.agent:
        with _peer_process(args, "alice") as config:
            trio.run(_scrape_agent, config, args.links, 5)
        return
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.registry import Collector

    from qkdagent.observability import Metrics

    metrics = Metrics()
    for i in range(args.links):
        link = f"link-{i:05d}"
        metrics.rotation_done(link, 1000 + i, 0.05)
        metrics.installs.labels(link, "psk", "ok").inc(1000)
        metrics.fetched_ahead.labels(link, "used").inc(1000)
        if i % 100 == 0:
            metrics.failures.labels(link, "peer").inc()
    families = [*metrics._per_link, *metrics.plugins.families()]

    class Families(Collector):
        def collect(self) -> Any:
            for family in families:
                yield family.family()

    reference = CollectorRegistry(auto_describe=False)
    reference.register(Families())

    def through_prometheus_client() -> bytes:
        return generate_latest(metrics.registry) + generate_latest(reference)

    print(f"/metrics of one agent at {args.links} links, CPU ms per scrape (min/median/max of 5):")
    scrapes = (("qkdagent", metrics.exposition), ("prometheus_client", through_prometheus_client))
    for name, scrape in scrapes:
        times = []
        for _ in range(5):
            start = time.thread_time()
            body = scrape()
            times.append((time.thread_time() - start) * 1000)
        print(f"  {name:<18} {_spread(times)} ms, {len(body) / 1024:.0f} KiB")


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("latency")
    p.add_argument("--rotations", type=int, default=500)
    p.add_argument("--runs", type=int, default=1, help="repeat; prints min/median/max")
    p.add_argument("--in-situ", action="store_true", help="time path functions against warm")
    p.add_argument(
        "--state-dir",
        help="where the agents' state goes (default: the temp dir); /dev/shm, whose fsyncs do "
        "nothing, separates the code's time from the storage's (not a durable setup)",
    )
    p.add_argument(
        "--no-settle",
        action="store_true",
        help="leave the garbage collector as the interpreter sets it, instead of as "
        "`qkdagent run` does once ready (start-up heap frozen, young generation of 10,000)",
    )
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
    p.add_argument("--runs", type=int, default=1, help="repeat; prints min/median/max")
    p.add_argument("--sink", choices=("file", "recording"), default="file")
    p.add_argument("--grid", type=float, help="the links' grid (default: the agent's)")
    p = sub.add_parser("memory")
    p.add_argument("--links", type=int, default=10000)
    p.add_argument("--interval", type=float, default=120.0)
    p.add_argument("--parallel", type=int, default=64, help="[agent] max_parallel_rotations")
    p.add_argument("--sink", choices=("file", "recording"), default="file")
    p.add_argument("--side", choices=("alice", "bob"), default="alice")
    p.add_argument("--settle", type=float, default=5.0, help="seconds after the first rotations")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--frames", type=int, default=1, help="traceback depth per site")
    p = sub.add_parser("scrape")
    p.add_argument("--links", type=int, default=10000)
    p.add_argument("--interval", type=float, default=120.0, help="with --agent")
    p.add_argument("--parallel", type=int, default=64, help="with --agent")
    p.add_argument("--sink", choices=("file", "recording"), default="file", help="with --agent")
    p.add_argument(
        "--agent",
        action="store_true",
        help="a running agent (its peer a process): how long /status and /metrics hold its loop",
    )
    args = parser.parse_args()
    commands = {
        "latency": cmd_latency,
        "scale": cmd_scale,
        "hold": cmd_hold,
        "procs": cmd_procs,
        "memory": cmd_memory,
        "scrape": cmd_scrape,
    }
    commands[args.cmd](args)


if __name__ == "__main__":
    main()
