"""Rotation latency and CPU per rotation: qkdagent against a quPSKd-equivalent reference, one run.

    python contrib/bench/bench_rotation_latency.py [--rotations 200] [--rate 1] [--repeat 1]
        [--skip-inproc] [--links 10000 --scale-seconds 120 --scale-interval 120]
        [--profile DIR] [--strace] [--keep-logs DIR]
    python contrib/bench/bench_rotation_latency.py flame DIR/*.txt    # summarise py-spy raw output

What one run measures, on loopback (with `--repeat`, every other run measures (b) before (a),
so that over an even number of runs the machine's drift over minutes favours each system as
often):

(a) the reference pair (`qupskd_reference.py`, REFERENCE.md §11: plain-HTTP peer channel, the
    same four requests, the same hash chain, the PSK file written without fsync), each side its
    own process, through two simulated ETSI 014 KMEs (`qkdagent kme-sim`, its own process). The
    simulator serves mutual TLS only, so the reference's KME client is HTTPS with the SAE's
    client certificate on a kept-alive connection (quPSKd itself used plain HTTP to its KME);
(b) two `qkdagent run` processes through the same KMEs (`etsi014` sources, `file` sinks, one
    link, jitter 0, JSON logs);
(c) one link with the in-memory source, both agents in this process over real loopback mTLS
    (`bench_core.run_pair`), recording sinks;
(d) with `--links N`: two `qkdagent run` processes carrying N links (`--scale-source keydir` on
    /dev/shm, as `bench_core.py procs`, or `etsi014`), at `--scale-interval`.

Latency is the initiator's rotation from its start to both sides installed. qkdagent: from the
start of the initiator's rotation (its "committed" log line's time less its `duration_ms`) to
the later of that line and the responder's "committed" line for the same epoch (each side logs
it after its install; the responder acknowledges the commit once committed and installs
after, so its line may come last). The reference: `/rotate` to its own file written, after
`/ack` was answered, i.e. after the responder wrote. Rotations are `--rate` per second; the
first `--warmup` are not measured. CPU is utime+stime from /proc/PID/stat over the measured
rotations, per process; RSS is VmHWM (peak) and VmRSS at the end. Under (b)'s figures, its three
slowest rotations with each side's own part (the initiator's rotation, the responder's commit to
install) and the parts of each (the lines' `parts_ms`): which side, and which part of its
work, a slow one lost its time on. `--keep-logs DIR` copies the logs of every
system (no state or key files) into DIR, also when the bench fails. Prints figures; asserts
only that both sides of each system ended on the same PSK file.

`--profile DIR` attaches `py-spy record --format raw` (1000 Hz, non-blocking) to both qkdagent
agents over (b)'s measured window (and (d)'s, with `--links`), then prints the flame summary;
`--strace` counts each agent's system calls over (b)'s window (`strace -c`: fsyncs per rotation,
reads, writes...); `--perf DIR` runs `perf record -g` on both agents over (b)'s window (native
CPU by library: `perf report -i DIR/qkdagent-initiator.data --sort dso`). All three perturb the
latencies of the run they attach to.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import datetime
import json
import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SRC_PATHS = [str(REPO), *(str(p) for p in sorted((REPO / "plugins").glob("*/src")))]
for _path in reversed([str(HERE), *SRC_PATHS]):  # this checkout, whatever is installed
    if _path not in sys.path:
        sys.path.insert(0, _path)

import httpx  # noqa: E402
from bench_core import pct, proc_cpu, proc_cpu_split, proc_mem_mb  # noqa: E402

from qkdagent.builtin.loopback import free_port, pair_configs  # noqa: E402
from qkdagent.fileutil import write_secret_file  # noqa: E402
from qkdagent.testing.toml import config_toml  # noqa: E402

REFERENCE = HERE / "qupskd_reference.py"


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*SRC_PATHS, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


# -- /proc ---------------------------------------------------------------------------------------


def proc_switches(pid: int) -> int:
    """Context switches (voluntary + involuntary) of all the process's threads so far."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                total += int(line.split()[1])
    return total


class LogTail:
    """New complete lines of a growing file (an agent's log), without touching the agent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self.partial + data
        *complete, self.partial = data.split(b"\n")
        return [line.decode(errors="replace") for line in complete]


def popen(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "ab"),
        env=child_env(),
    )


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(predicate: Any, timeout: float, what: str, procs: list[Any] = ()) -> None:  # type: ignore[assignment]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for proc in procs:
            if proc.poll() is not None:
                raise SystemExit(f"bench: a process exited ({proc.args[:4]}) waiting for {what}")
        time.sleep(0.02)
    raise SystemExit(f"bench: timed out after {timeout} s waiting for {what}")


# -- attached tools (py-spy, strace) -------------------------------------------------------------


class Attached:
    """Samplers/tracers attached to processes over a measured window."""

    def __init__(self) -> None:
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def pyspy(self, pid: int, out: Path, rate: int = 1000, gil: bool = True) -> None:
        """`gil`: only samples holding the GIL, i.e. executing Python (perf shows ~70% of an
        agent's CPU is the interpreter); without it, every sample of a thread not idle in a
        known wait, which under load counts runnable-but-waiting threads too."""
        argv = ["py-spy", "record", "--format", "raw", "--rate", str(rate), "--nonblocking"]
        argv += ["--gil"] if gil else []
        argv += ["--pid", str(pid), "--output", str(out)]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append((proc, out))

    def strace(self, pid: int, out: Path) -> None:
        argv = ["strace", "-f", "-c", "-o", str(out), "-p", str(pid)]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append((proc, out))

    def perf(self, pid: int, out: Path) -> None:
        argv = ["perf", "record", "-q", "-F", "997", "-g", "-p", str(pid), "-o", str(out)]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append((proc, out))

    def settle(self) -> None:
        time.sleep(1.0 if self.procs else 0)  # attaching takes a moment

    def finish(self) -> None:
        for proc, _ in self.procs:
            proc.send_signal(signal.SIGINT)
        for proc, _ in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def strace_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    if not path.exists():
        return counts
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and not parts[-1].startswith("total"):
            try:
                counts[parts[-1]] = int(parts[3])
            except ValueError:
                continue
    return counts


# -- the simulated KMEs --------------------------------------------------------------------------


@contextlib.contextmanager
def kme_sim(tmp: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, dict[str, str]]]:
    pki = tmp / "kme-pki"
    ready = tmp / "kme-ready.json"
    argv = [sys.executable, "-m", "qkdagent", "kme-sim", "--pki", str(pki)]
    argv += ["--ready-file", str(ready), "--rate", "10000000"]
    proc = popen(argv, tmp / "kme-sim.log")
    try:
        wait_for(ready.exists, 60, "kme-sim", [proc])
        time.sleep(0.1)
        urls = {k["kme_id"]: k["url"] for k in json.loads(ready.read_text())}
        yield proc, pki, urls
    finally:
        stop(proc)


# -- (a) the reference pair ----------------------------------------------------------------------


def run_reference(
    tmp: Path, pki: Path, urls: dict[str, str], kme_pid: int, args: argparse.Namespace
) -> dict[str, Any]:
    d = tmp / "reference"
    d.mkdir()
    write_secret_file(d / "psk", base64.b64encode(os.urandom(32)))  # 0600 from the start
    common = ["--ca", str(pki / "ca.pem"), "--psk-file", str(d / "psk")]
    if args.kme_reconnect:
        common.append("--kme-reconnect")
    ready = d / "responder.ready"
    argv = [sys.executable, str(REFERENCE), "responder", "--listen", f"127.0.0.1:{free_port()}"]
    argv += ["--kme-url", urls["KME_B"], "--cert", str(pki / "bob.pem")]
    argv += ["--key", str(pki / "bob.key"), "--remote-sae", "alice", "--out", str(d / "bob.psk")]
    responder = popen([*argv, "--ready-file", str(ready), *common], d / "responder.log")
    procs = {"responder": responder}
    try:
        wait_for(ready.exists, 30, "reference responder", [responder])
        log = d / "initiator.jsonl"
        # one rotation past the measured ones: the initiator exits after its last, and its
        # memory, read once the last measured one is logged, was sometimes gone already
        total = args.warmup + args.rotations + 1
        argv = [sys.executable, str(REFERENCE), "initiator", "--peer-url", ready.read_text()]
        argv += ["--kme-url", urls["KME_A"], "--cert", str(pki / "alice.pem")]
        argv += ["--key", str(pki / "alice.key"), "--remote-sae", "bob"]
        argv += ["--out", str(d / "alice.psk"), "--interval", str(1 / args.rate)]
        argv += ["--rotations", str(total), "--log", str(log), *common]
        initiator = popen(argv, d / "initiator.err")
        procs["initiator"] = initiator
        result = measure(
            procs, {"kme-sim": kme_pid}, LogTail(log), _reference_line, args, None,
            (initiator, responder),
        )  # fmt: skip
        initiator.wait(timeout=60)  # it stops after its last rotation
    finally:
        for proc in procs.values():
            stop(proc)
    result["same_psk"] = same_file(d / "alice.psk", d / "bob.psk")
    return result


def _reference_line(line: str) -> float | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("duration_ms") if isinstance(record, dict) else None


# -- (b) and (d): qkdagent agents as processes ---------------------------------------------------


def agent_configs(
    d: Path,
    *,
    links: int,
    interval: float,
    source: str,
    sink: str,
    pki: Path | None,
    urls: dict[str, str] | None,
    parallel: int,
) -> dict[str, Path]:
    sides: dict[str, dict[str, Any]] = {}
    for name, kme in (("alice", "KME_A"), ("bob", "KME_B")):
        if source == "etsi014":
            assert pki is not None and urls is not None
            table = {
                "type": "etsi014", "kme_url": urls[kme], "cert": str(pki / f"{name}.pem"),
                "key": str(pki / f"{name}.key"), "ca": str(pki / "ca.pem"), "sae_id": name,
                "kme_id": kme,
            }  # fmt: skip
            plugins = ["etsi014"]
        else:
            shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else d
            keys = shm / f"qkdagent-bench-{os.getpid()}-keys"
            keys.mkdir(exist_ok=True, mode=0o700)
            table, plugins = {"type": "keydir", "directory": str(keys)}, ["memory"]
        if sink == "file":
            sinks = {"psk": {"type": "file", "path": str(d / name / "psk" / "{link}.psk")}}
            (d / name / "psk").mkdir(parents=True, exist_ok=True)
        else:
            sinks = {"psk": {"type": "recording"}}
            plugins.append("memory")
        sides[name] = {
            "sources": {"qkd": table},
            "sinks": sinks,
            "plugins": sorted(set(plugins)),
            "agent": {"log_format": "json", "max_parallel_rotations": parallel},
        }
    reject_after = max(10.0, 1.5 * interval)
    base = pair_configs(
        d, alice=sides["alice"], bob=sides["bob"],
        link={"interval": interval, "jitter": 0.0 if links == 1 else 0.1,
              "reject_after": reject_after},
    )  # fmt: skip
    paths = {}
    for name, config in base.items():
        if links > 1:
            template = config["links"].pop("alice-bob")
            for i in range(links):
                config["links"][f"link{i:05d}"] = dict(template)
        path = d / f"{name}.toml"
        path.write_text(config_toml(config))
        paths[name] = path
        if name == "alice":
            paths["alice-status"] = Path(config["agent"]["status_listen"])
        else:
            paths["bob-status"] = Path(config["agent"]["status_listen"])
    return paths


AgentLine = tuple[int, float, float, dict[str, float]]


def _agent_line(line: str) -> AgentLine | None:
    """(epoch, start, end, parts) of a side's rotation from its "committed" line (epoch
    seconds; the parts of its time in ms, `parts_ms`, where the line has them)."""
    if '"duration_ms"' not in line or "committed" not in line:
        return None
    try:
        record = json.loads(line)
        end = datetime.datetime.fromisoformat(record["ts"]).timestamp()
        start = end - float(record["duration_ms"]) / 1000
        epoch = int(record["epoch"])
    except (ValueError, KeyError, TypeError):
        return None
    return epoch, start, end, _parts(record.get("parts_ms"))


def _parts(value: Any) -> dict[str, float]:
    """A line's `parts_ms`, or none if it has none (or they do not parse: the line counts)."""
    try:
        return {str(name): float(ms) for name, ms in value.items()}
    except (AttributeError, ValueError, TypeError):
        return {}


Slow = tuple[float, int, AgentLine, AgentLine]


def both_installed(
    initiator: list[AgentLine], responder_log: Path
) -> tuple[list[float], list[Slow]]:
    """Milliseconds from each initiator rotation's start to the later side's install; and per
    rotation that figure, its epoch and each side's line, slowest first: which side, and which
    part of it, a slow rotation's time went to."""
    sides: dict[int, AgentLine] = {}
    for text in LogTail(responder_log).lines():
        parsed = _agent_line(text)
        if parsed is not None:
            sides[parsed[0]] = parsed
    missing = [mine[0] for mine in initiator if mine[0] not in sides]
    if missing:
        raise SystemExit(f"bench: the responder logged no commit of epoch(s) {missing[:5]}")
    durations: list[float] = []
    detail: list[Slow] = []
    for mine in initiator:
        epoch, start, end, _ = mine
        total = 1000 * (max(end, sides[epoch][2]) - start)
        durations.append(total)
        detail.append((total, epoch, mine, sides[epoch]))
    return durations, sorted(detail, key=lambda slow: slow[:2], reverse=True)


def start_agents(d: Path, paths: dict[str, Path]) -> dict[str, subprocess.Popen[bytes]]:
    procs = {}
    for name in ("bob", "alice"):  # the responder listens before the initiator's first rotation
        procs[name] = popen(
            [sys.executable, "-m", "qkdagent", "run", "-c", str(paths[name])], d / f"{name}.log"
        )
    return procs


def stop_agents(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for name in ("alice", "bob"):  # the initiator first: no rotation fails for the shutdown
        if name in procs:
            stop(procs[name])


def run_qkdagent(
    tmp: Path, pki: Path, urls: dict[str, str], kme_pid: int, args: argparse.Namespace
) -> dict[str, Any]:
    d = tmp / "qkdagent"
    d.mkdir()
    paths = agent_configs(
        d, links=1, interval=1 / args.rate, source="etsi014", sink="file", pki=pki, urls=urls,
        parallel=64,
    )  # fmt: skip
    procs = start_agents(d, paths)
    try:
        named = {"initiator": procs["alice"], "responder": procs["bob"]}
        result = measure(
            named, {"kme-sim": kme_pid}, LogTail(d / "alice.log"), _agent_line, args,
            "qkdagent", tuple(procs.values()),
        )  # fmt: skip
        stop(procs["alice"])  # the initiator first: its last commit reaches the responder
    finally:
        stop_agents(procs)
    result["durations"], result["slowest"] = both_installed(result["durations"], d / "bob.log")
    psk = "psk/alice-bob.psk"
    result["same_psk"] = same_file(d / "alice" / psk, d / "bob" / psk)
    return result


def slowest_line(slowest: list[Slow], count: int = 3) -> str:
    """(b)'s slowest rotations: which side, and which part of it, their time went to."""

    def side(line: AgentLine) -> str:
        _, start, end, parts = line
        inner = " + ".join(f"{name} {ms:.1f}" for name, ms in parts.items())
        return f"{1000 * (end - start):.1f}" + (f" = {inner}" if inner else "")

    lines = [
        f"epoch {epoch} {total:.1f} ms: initiator {side(mine)}; responder's commit to "
        f"install {side(theirs)}"
        for total, epoch, mine, theirs in slowest[:count]
    ]
    return "      slowest:\n" + "\n".join(f"        {line}" for line in lines)


def keep_logs(source: Path, destination: Path) -> None:
    """Copy a run's logs (`--keep-logs`): the agents', the reference's and the simulator's,
    which name key IDs and never key bytes. Nothing else: state files and PSK files hold keys."""
    logs = [
        path
        for path in source.rglob("*")
        if path.suffix in (".log", ".jsonl") and path.is_file() and not path.is_symlink()
    ]  # listed before copying: DIR may lie under the source
    for path in logs:
        target = destination / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def same_file(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and a.read_bytes() == b.read_bytes()


def measure(
    procs: dict[str, subprocess.Popen[bytes]],
    others: dict[str, int],
    tail: LogTail,
    parse: Any,
    args: argparse.Namespace,
    system: str | None,
    watch: tuple[subprocess.Popen[bytes], ...],
) -> dict[str, Any]:
    """Count rotations from the initiator's log: CPU snapshots after `warmup` and after
    `warmup + rotations`; the durations in between."""
    durations: list[Any] = []  # what `parse` makes of a line
    seen = 0

    def advance(target: int) -> Any:
        def check() -> bool:
            nonlocal seen
            for line in tail.lines():
                value = parse(line)
                if value is not None:
                    seen += 1
                    if seen > args.warmup:
                        durations.append(value)
            return seen >= target

        return check

    timeout = 60 + 3 * (args.warmup + args.rotations) / args.rate
    wait_for(advance(args.warmup), timeout, "warm-up rotations", list(watch))
    attached = Attached()
    if system is not None and args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        for role, proc in procs.items():
            attached.pyspy(proc.pid, args.profile / f"{system}-{role}.txt", gil=not args.active)
    if system is not None and args.strace:
        for role, proc in procs.items():
            attached.strace(proc.pid, Path(args.tmp) / f"strace-{role}.txt")
    if system is not None and args.perf:
        args.perf.mkdir(parents=True, exist_ok=True)
        for role, proc in procs.items():
            attached.perf(proc.pid, args.perf / f"{system}-{role}.data")
    attached.settle()
    del durations[:]
    seen = args.warmup
    tail.lines()  # rotations during the attach are not measured
    pids = {**{r: p.pid for r, p in procs.items()}, **others}
    cpu0 = {r: proc_cpu_split(pid) for r, pid in pids.items()}
    sw0 = {r: proc_switches(pid) for r, pid in pids.items()}
    t0 = time.monotonic()
    wait_for(advance(args.warmup + args.rotations), timeout, "measured rotations", list(watch))
    cpu1 = {r: proc_cpu_split(pid) for r, pid in pids.items()}
    sw1 = {r: proc_switches(pid) for r, pid in pids.items()}
    t1 = time.monotonic()
    mem = {r: proc_mem_mb(pid) for r, pid in pids.items()}
    attached.finish()
    rotations = len(durations)
    syscalls = {}
    if system is not None and args.strace:
        syscalls = {r: strace_counts(Path(args.tmp) / f"strace-{r}.txt") for r in procs}
    return {
        "durations": durations,
        "rotations": rotations,
        "seconds": t1 - t0,
        "cpu_ms": {r: 1000 * (sum(cpu1[r]) - sum(cpu0[r])) / max(rotations, 1) for r in pids},
        "sys_ms": {r: 1000 * (cpu1[r][1] - cpu0[r][1]) / max(rotations, 1) for r in pids},
        "mem": mem,
        "switches": {r: (sw1[r] - sw0[r]) / max(rotations, 1) for r in pids},
        "syscalls": syscalls,
    }


# -- (c) in process, memory source ---------------------------------------------------------------


def run_inproc(args: argparse.Namespace) -> dict[str, Any]:
    import trio
    from bench_core import run_pair

    interval = 1 / args.rate
    seconds = (args.rotations + 0.5) * interval
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        return trio.run(run_pair, Path(tmp), 1, interval, 0.0, seconds)


# -- (d) N links ---------------------------------------------------------------------------------


def run_scale(
    tmp: Path, pki: Path | None, urls: dict[str, str] | None, args: argparse.Namespace
) -> dict[str, Any]:
    d = tmp / f"scale-{args.links}"
    d.mkdir()
    paths = agent_configs(
        d, links=args.links, interval=args.scale_interval, source=args.scale_source,
        sink=args.scale_sink, pki=pki, urls=urls, parallel=args.parallel,
    )  # fmt: skip
    status = {n: f"http://{paths[f'{n}-status']}/status" for n in ("alice", "bob")}
    procs = start_agents(d, paths)

    def links() -> list[dict[str, Any]]:
        try:
            return list(httpx.get(status["alice"], timeout=120).json()["links"])
        except (httpx.HTTPError, ValueError, KeyError):
            return []

    try:
        started = time.monotonic()

        def all_rotated() -> bool:
            time.sleep(1)
            current = links()
            return len(current) == args.links and all(x["epoch"] >= 1 for x in current)

        wait_for(all_rotated, 900, f"{args.links} links' first rotation", list(procs.values()))
        startup = time.monotonic() - started

        def second_round() -> bool:  # the first round is start-up's burst: measure the next
            time.sleep(1)  # (once 1% of the links are on it: one retried link is no round)
            return sum(x["epoch"] >= 2 for x in links()) >= max(1, args.links // 100)

        wait_for(second_round, args.scale_interval * 2 + 60, "the second round of rotations",
                 list(procs.values()))  # fmt: skip
        attached = Attached()
        if args.profile:
            for name, proc in procs.items():
                out = args.profile / f"scale{args.links}-{name}.txt"
                attached.pyspy(proc.pid, out, 100, gil=not args.active)
        attached.settle()
        first = links()
        cpu0 = {n: proc_cpu(p.pid) for n, p in procs.items()}
        t0 = time.monotonic()
        time.sleep(args.scale_seconds)
        cpu1 = {n: proc_cpu(p.pid) for n, p in procs.items()}
        t1 = time.monotonic()
        mem = {n: proc_mem_mb(p.pid) for n, p in procs.items()}
        attached.finish()
        final = links()
    finally:
        stop_agents(procs)
        if args.scale_source == "keydir":
            for keys in Path("/dev/shm").glob(f"qkdagent-bench-{os.getpid()}-keys"):
                shutil.rmtree(keys, ignore_errors=True)
    rotations = sum(x["epoch"] for x in final) - sum(x["epoch"] for x in first)
    lat = [x["last_rotation_ms"] for x in final if x["last_rotation_ms"] is not None]
    return {
        "startup": startup,
        "rotations": rotations,
        "rate": rotations / (t1 - t0),
        "cpu": {n: cpu1[n] - cpu0[n] for n in procs},
        "seconds": t1 - t0,
        "mem": mem,
        "lat": lat,
        "failures": sum(x["failures"] for x in final) - sum(x["failures"] for x in first),
        "erased": sum(1 for x in final if x["erased"]),
    }


# -- flame summary -------------------------------------------------------------------------------

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def module_of(path: str) -> str:
    """A frame's file as a dotted module: py-spy writes `trio/_core/_run.py`, `ssl.py`,
    `<frozen runpy>`, or a full path for files outside packages."""
    p = path.replace("\\", "/")
    for marker in ("site-packages/", "dist-packages/"):
        if marker in p:
            p = p.split(marker, 1)[1]
    m = re.search(r"/lib/python3\.\d+/(.+)$", p)
    if m:
        p = m.group(1)
    if p.startswith("<frozen "):
        return p[8:].rstrip(">")
    parts = [x for x in p.removesuffix(".py").split("/") if x]
    for i, part in enumerate(parts):
        if part.startswith("qkdagent"):
            parts = parts[i:]
            break
    return ".".join(parts) or "?"


CATEGORY = [
    ("httpx/httpcore (peer + KME clients)", ("httpx", "httpcore")),
    ("h11 (HTTP/1.1)", ("h11",)),
    ("hypercorn", ("hypercorn",)),
    ("ssl (TLS records, handshakes)", ("ssl", "trio._ssl")),
    ("socket send/recv (trio._socket)", ("trio._socket", "socket")),
    ("sqlite/state (incl. fsync)", ("sqlite3", "qkdagent.state")),
    ("file sink / fileutil (incl. fsync)", ("qkdagent.builtin.file_sink", "qkdagent.fileutil")),
    ("ratchet/protocol/crypto", ("qkdagent.ratchet", "qkdagent.protocol", "hmac", "hashlib",
                                 "cryptography", "qkdagent.secret")),
    ("json", ("json",)),
    ("logging", ("logging", "qkdagent.logsetup")),
    ("etsi014 source", ("qkdagent_etsi014",)),
    ("metrics", ("prometheus_client", "qkdagent.observability")),
    ("worker threads (to_thread)", ("threading", "trio._threads", "trio._core._thread_cache",
                                    "outcome", "trio._core._wakeup_socketpair")),
    ("event loop wait (epoll)", ("trio._core._io_epoll",)),
    ("trio scheduling", ("trio",)),
]  # fmt: skip


def category_of(module: str) -> str:
    for name, prefixes in CATEGORY:
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                return name
    if module.startswith("qkdagent"):
        return "qkdagent (other core)"
    return "other: " + module


def parse_raw(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for frame in stack.split(";"):
            m = _FRAME.match(frame)
            if m is None:
                frames.append((frame, "?"))
            else:
                frames.append((m.group("func"), m.group("file")))
        stacks.append((frames, int(count)))
    return stacks


def flame_summary(path: Path, top: int = 15) -> str:
    stacks = parse_raw(path)
    total = sum(c for _, c in stacks) or 1
    incl_frame: collections.Counter[str] = collections.Counter()
    self_frame: collections.Counter[str] = collections.Counter()
    incl_cat: collections.Counter[str] = collections.Counter()
    self_cat: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        names = []
        for func, file in frames:
            names.append((f"{func} ({module_of(file)})", category_of(module_of(file))))
        for name in {n for n, _ in names}:
            incl_frame[name] += count
        for cat in {c for _, c in names}:
            incl_cat[cat] += count
        if names:
            self_frame[names[-1][0]] += count
            self_cat[names[-1][1]] += count
    out = [f"== {path.name}: {total} samples (non-idle)"]
    out.append(f"  {'by module group':<44} {'self %':>7} {'incl %':>7}")
    for cat, n in sorted(incl_cat.items(), key=lambda x: -self_cat[x[0]] - x[1] / 1000)[:top]:
        out.append(f"  {cat[:44]:<44} {100 * self_cat[cat] / total:>7.1f} {100 * n / total:>7.1f}")
    out.append(f"  top frames by inclusive time{'':<23} incl %")
    skip = ("<module>", "run (", "main (", "_run_module", "run_code", "trio.run")
    shown = 0
    for name, n in incl_frame.most_common():
        if shown >= top:
            break
        if name.startswith(skip):
            continue
        out.append(f"    {name[:70]:<70} {100 * n / total:>6.1f}")
        shown += 1
    out.append(f"  top frames by self time{'':<47} self %")
    for name, n in self_frame.most_common(top):
        out.append(f"    {name[:70]:<70} {100 * n / total:>6.1f}")
    return "\n".join(out)


# -- report --------------------------------------------------------------------------------------


def line_for(name: str, r: dict[str, Any]) -> str:
    d = r["durations"]
    return (
        f"  {name:<34} n={len(d):<4} p50 {pct(d, 50):6.2f} ms  p90 {pct(d, 90):6.2f}  "
        f"p99 {pct(d, 99):6.2f}  max {max(d, default=float('nan')):6.2f}  "
        f"mean {statistics.mean(d) if d else float('nan'):6.2f}"
    )


def cpu_lines(r: dict[str, Any]) -> list[str]:
    out = []
    for role, ms in r["cpu_ms"].items():
        hwm, rss = r["mem"][role]
        out.append(
            f"      {role:<10} CPU {ms:6.2f} ms/rotation (kernel {r['sys_ms'][role]:5.2f})   "
            f"RSS peak {hwm:6.1f} MB, "
            f"now {rss:6.1f} MB   context switches/rotation {r['switches'][role]:5.1f}"
        )
    for role, counts in r.get("syscalls", {}).items():
        n = max(r["rotations"], 1)
        top = sorted(counts.items(), key=lambda x: -x[1])[:12]
        per = ", ".join(f"{k} {v / n:.1f}" for k, v in top)
        syncs = sum(v for k, v in counts.items() if k in ("fsync", "fdatasync"))
        out.append(
            f"      {role:<10} syscalls/rotation (strace): fsync+fdatasync {syncs / n:.2f}; {per}"
        )
    return out


def cmd_bench(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.ERROR)
    print(
        f"rotation latency, loopback, {args.rate:g} rotation(s)/s, {args.rotations} measured "
        f"rotations after {args.warmup} warm-up, {os.cpu_count()} CPUs, load "
        f"{os.getloadavg()[0]:.2f}",
        flush=True,
    )
    print(
        "  reference: quPSKd-equivalent (REFERENCE §11), plain HTTP peer channel, new connection "
        "per peer request; its KME client is HTTPS with the SAE client certificate (kme-sim is "
        "mTLS only; quPSKd used plain HTTP), "
        + (
            "new TLS connection per KME call"
            if args.kme_reconnect
            else "one kept-alive TLS connection"
        ),
        flush=True,
    )
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-rotation-", dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        with contextlib.ExitStack() as finally_keep:
            if args.keep_logs:  # (also when the bench fails: then the logs say the most)
                finally_keep.callback(keep_logs, tmp, args.keep_logs)
            kme, pki, urls = finally_keep.enter_context(kme_sim(tmp))
            for i in range(args.repeat):
                run_dir = tmp / f"run{i}"
                run_dir.mkdir()
                # the machine's speed drifts over minutes: every other run starts with (b), so
                # that over an even number of runs a drift favours each system as often
                reference_first = i % 2 == 0
                if reference_first:
                    ref = run_reference(run_dir, pki, urls, kme.pid, args)
                    qka = run_qkdagent(run_dir, pki, urls, kme.pid, args)
                else:
                    qka = run_qkdagent(run_dir, pki, urls, kme.pid, args)
                    ref = run_reference(run_dir, pki, urls, kme.pid, args)
                runs.append({"ref": ref, "qka": qka})
                first = "reference" if reference_first else "qkdagent"
                print(f"run {i + 1}/{args.repeat} ({first} first):")
                print(line_for("(a) reference (quPSKd-equivalent)", ref))
                print(*cpu_lines(ref), sep="\n")
                print(line_for("(b) qkdagent, 2 processes, etsi014", qka))
                print(*cpu_lines(qka), sep="\n")
                print(slowest_line(qka["slowest"]))
                ratio50 = pct(qka["durations"], 50) / pct(ref["durations"], 50)
                ratio99 = pct(qka["durations"], 99) / pct(ref["durations"], 99)
                target99 = pct(qka["durations"], 99) / pct(ref["durations"], 50)
                print(
                    f"      qkdagent/reference: p50 x{ratio50:.2f}, p99 x{ratio99:.2f}; "
                    f"qkdagent p99 / reference p50 = {target99:.2f} (goal <= 2)"
                )
                print(
                    f"      same PSK on both sides: reference {ref['same_psk']}, "
                    f"qkdagent {qka['same_psk']}",
                    flush=True,
                )
            if args.links:
                scale = run_scale(tmp, pki, urls, args)
        if args.repeat > 1:
            print(f"over {args.repeat} runs (min / median / max):")
            for key, label in (("ref", "reference"), ("qka", "qkdagent")):
                for p in (50, 99):
                    vals = [pct(r[key]["durations"], p) for r in runs]
                    print(
                        f"  {label:<10} p{p}: {min(vals):.2f} / {statistics.median(vals):.2f} / "
                        f"{max(vals):.2f} ms"
                    )
                for role in ("initiator", "responder"):
                    vals = [r[key]["cpu_ms"][role] for r in runs]
                    print(
                        f"  {label:<10} CPU {role}: {min(vals):.2f} / "
                        f"{statistics.median(vals):.2f} / {max(vals):.2f} ms/rotation"
                    )
            ratios = sorted(
                pct(r["qka"]["durations"], 50) / pct(r["ref"]["durations"], 50) for r in runs
            )
            print(
                f"  qkdagent/reference p50, run by run: {ratios[0]:.2f} / "
                f"{statistics.median(ratios):.2f} / {ratios[-1]:.2f}; "
                f"{sum(x <= 1 for x in ratios)} of {len(ratios)} runs at or under x1.00"
            )
        if not args.skip_inproc:
            r = run_inproc(args)
            d = [x * 1000 for x in r["durations"]]
            print(
                f"(c) qkdagent in one process, memory source, recording sinks, 1 link: n={len(d)} "
                f"p50 {pct(d, 50):.2f} ms  p99 {pct(d, 99):.2f} ms; CPU both agents "
                f"{r['cpu_ms_per_rotation']:.2f} ms/rotation, peak RSS {r['peak_rss_mb']:.0f} MB "
                "(this process)",
                flush=True,
            )
        if args.links:
            s = scale
            print(
                f"(d) {args.links} links, {args.scale_source} source, {args.scale_sink} sinks, "
                f"interval {args.scale_interval:g} s, 2 processes, measured {s['seconds']:.0f} s "
                f"after all links' first rotation ({s['startup']:.0f} s): {s['rate']:.1f} "
                f"rotations/s (expected ~{args.links / args.scale_interval / 0.95:.1f})"
            )
            for name, role in (("alice", "initiator"), ("bob", "responder")):
                cpu = s["cpu"][name]
                hwm, rss = s["mem"][name]
                print(
                    f"      {role:<10} CPU {cpu / s['seconds']:.3f} core, "
                    f"{1000 * cpu / max(s['rotations'], 1):.2f} ms/rotation; RSS peak {hwm:.0f} "
                    f"MB, now {rss:.0f} MB"
                )
            lat = s["lat"]
            print(
                "      latest rotation per link (initiator, to the peer's commit ack): "
                f"p50 {pct(lat, 50):.1f} ms, p99 {pct(lat, 99):.1f} ms; "
                f"failed attempts {s['failures']}, links erased {s['erased']}"
            )
    if args.profile:
        for path in sorted(args.profile.glob("*.txt")):
            print(flame_summary(path))


def cmd_flame(paths: list[str]) -> None:
    for path in paths:
        print(flame_summary(Path(path)))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "flame":
        cmd_flame(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rotations", type=int, default=200, help="measured, per system")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rate", type=float, default=1.0, help="rotations per second")
    parser.add_argument("--repeat", type=int, default=1, help="runs of (a) and (b)")
    parser.add_argument("--skip-inproc", action="store_true", help="skip (c)")
    parser.add_argument("--kme-reconnect", action="store_true", help="reference: TLS per call")
    parser.add_argument("--links", type=int, default=0, help="(d): N links (e.g. 10000)")
    parser.add_argument("--scale-interval", type=float, default=120.0)
    parser.add_argument("--scale-seconds", type=float, default=120.0)
    parser.add_argument("--scale-source", choices=("keydir", "etsi014"), default="keydir")
    parser.add_argument("--scale-sink", choices=("file", "recording"), default="file")
    parser.add_argument("--parallel", type=int, default=64, help="[agent] max_parallel_rotations")
    parser.add_argument("--profile", type=Path, help="py-spy raw profiles into DIR")
    parser.add_argument("--active", action="store_true", help="py-spy: all non-idle samples")
    parser.add_argument("--strace", action="store_true", help="count syscalls over (b)")
    parser.add_argument("--perf", type=Path, help="perf record (b)'s agents into DIR")
    parser.add_argument("--tmp", default=None, help="directory for temp files")
    parser.add_argument(
        "--keep-logs", type=Path, help="copy each run's logs into DIR (the rest is removed)"
    )
    args = parser.parse_args()
    if args.tmp is None:
        args.tmp = tempfile.gettempdir()
    cmd_bench(args)


if __name__ == "__main__":
    main()
