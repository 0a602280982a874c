"""Benchmark: one agent rotating the PSKs of many peers of one wireguard-go interface.

    python plugins/qkdagent-wireguard/bench/bench_agents.py [--peers 1000] [--baseline]

Two `qkdagent run` processes (alice, the initiator, and bob) carry one link per peer; each of
alice's links has a `wireguard` sink for its own peer on one wireguard-go interface (uapi), and
bob's links record (the `recording` test sink), so alice's figures are the WireGuard side's.
`--baseline` gives alice recording sinks too, to show the core's share. Keys come from the
`keydir` test source on /dev/shm.

Every link is due at once when the agents start (a link's first rotation is immediate), so the
first round is the burst this script times: from the first rotation's start to the last
commit, read from alice's JSON log, with each process's CPU over exactly that window (sampled
every 50 ms and interpolated). Needs root, wireguard-go, wg and ip. Prints figures; asserts
nothing.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench_install import add_peers, cpu_of

from qkdagent.testing import config_toml, pair_configs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # test beds: not shipped
from wg_testbed import Pair

INTERVAL = 3600.0
"""Long enough that no link rotates a second time while the script runs."""


def configs(workdir: Path, iface: str, peers: list[bytes], keys: Path, wireguard: bool) -> Any:
    base = pair_configs(
        workdir, link={"interval": INTERVAL, "jitter": 0, "reject_after": INTERVAL * 2}
    )
    for name, config in base.items():
        template = config["links"].pop("alice-bob")
        config["sources"] = {"sim": {"type": "keydir", "directory": str(keys)}}
        config["agent"]["plugins"] = ["memory", "wireguard"] if name == "alice" else ["memory"]
        config["agent"]["log_format"] = "json"
        config["agent"]["max_parallel_rotations"] = 64
        if name == "bob" or not wireguard:
            config["sinks"] = {"rec": {"type": "recording"}}
        for i, peer in enumerate(peers):
            link = dict(template, sources=["sim"], sinks=["rec"])
            if name == "alice" and wireguard:
                sink = f"wg{i:05d}"
                config["sinks"][sink] = {
                    "type": "wireguard",
                    "interface": iface,
                    "peer_public_key": base64.b64encode(peer).decode(),
                    "backend": "uapi",
                }
                link["sinks"] = [sink]
            config["links"][f"link{i:05d}"] = link
    return base


class CommitLog:
    """Alice's JSON log, read incrementally: (start, end) of every commit of epoch 1."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.commits = path, 0, list[tuple[float, float]]()

    def poll(self) -> int:
        with self.path.open("rb") as log:
            log.seek(self.offset)
            data = log.read()
        complete = data.rfind(b"\n") + 1
        self.offset += complete
        for line in data[:complete].splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("epoch") == 1 and "duration_ms" in entry:
                ts = entry["ts"].replace("Z", "+00:00")
                end = datetime.datetime.fromisoformat(ts).timestamp()
                self.commits.append((end - entry["duration_ms"] / 1000, end))
        return len(self.commits)


class CpuSampler(threading.Thread):
    """CPU seconds of some processes, sampled every 50 ms, for any instant in between."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids, self.times, self.samples = pids, list[float](), list[dict[str, float]]()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.times.append(time.time())
            self.samples.append({name: cpu_of(pid) for name, pid in self.pids.items()})
            self.stop.wait(0.05)

    def at(self, when: float, name: str) -> float:
        i = min(max(bisect.bisect(self.times, when), 1), len(self.times) - 1)
        t0, t1 = self.times[i - 1], self.times[i]
        c0, c1 = self.samples[i - 1][name], self.samples[i][name]
        return c0 + (c1 - c0) * min(max((when - t0) / (t1 - t0), 0.0), 1.0)


def stop(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for proc in procs.values():
        proc.send_signal(signal.SIGTERM)
    for proc in procs.values():
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(args: argparse.Namespace, workdir: Path, keys: Path) -> None:
    procs: dict[str, subprocess.Popen[bytes]] = {}
    with contextlib.ExitStack() as stack:
        pair = stack.enter_context(
            Pair(workdir / "wg", log_level="error").open(os.urandom(32), os.urandom(32))
        )
        a = pair.a
        assert a is not None and a.proc is not None
        peers = add_peers(a, args.peers)
        cfg = configs(workdir, a.iface, peers, keys, not args.baseline)
        stack.callback(stop, procs)
        started = time.time()
        for name in ("bob", "alice"):
            path = workdir / f"{name}.toml"
            path.write_text(config_toml(cfg[name]))
            stderr = stack.enter_context((workdir / f"{name}.log").open("wb"))
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "qkdagent", "run", "-c", str(path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        sampler = CpuSampler(
            {"alice": procs["alice"].pid, "bob": procs["bob"].pid, "wireguard-go": a.proc.pid}
        )
        sampler.start()
        stack.callback(sampler.stop.set)
        log, deadline = CommitLog(workdir / "alice.log"), time.monotonic() + 600
        while log.poll() < args.peers:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{args.peers} links did not all rotate in 600 s")
            time.sleep(0.5)
        time.sleep(0.1)  # a sample after the last commit
        sampler.stop.set()
        sampler.join()
    first = min(start for start, _ in log.commits)
    last = max(end for _, end in log.commits)
    durations = sorted(end - start for start, end in log.commits)
    what = "recording sinks (baseline)" if args.baseline else "wireguard sinks (uapi)"
    print(
        f"{args.peers} peers of one wireguard-go interface, one link each, rotated by one agent "
        f"pair (separate processes, mutual TLS over loopback); alice: {what}:"
    )
    print(f"  first rotation started {first - started:.1f} s after the agents were launched")
    print(f"  all {args.peers} links, due at once: {last - first:.2f} s to the last commit")
    print(
        f"  one rotation within that burst: p50 {durations[len(durations) // 2] * 1e3:.0f} ms, "
        f"max {durations[-1] * 1e3:.0f} ms (64 run at a time)"
    )
    for name in sampler.pids:
        used = sampler.at(last, name) - sampler.at(first, name)
        print(
            f"  CPU of {name:<12} over the burst: {used:.2f} s "
            f"({used / args.peers * 1e3:.2f} ms per rotation)"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="alice records instead of installing (the core's share, same peers and links)",
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="qkdwg-agents-"))
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else workdir
    keys = Path(tempfile.mkdtemp(prefix="qkdwg-keys-", dir=shm))
    try:
        run(args, workdir, keys)
    finally:
        shutil.rmtree(keys, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)  # holds TLS keys and agent state
    return 0


if __name__ == "__main__":
    sys.exit(main())
