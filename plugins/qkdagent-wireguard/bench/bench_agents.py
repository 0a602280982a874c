"""Benchmark: one agent rotating the PSKs of many peers of one wireguard-go interface.

    python plugins/qkdagent-wireguard/bench/bench_agents.py [--peers 1000] [--interval 40]

Two `qkdagent run` processes (alice, the initiator, and bob) carry one link per peer; each of
alice's links has a `wireguard` sink for its own peer on one wireguard-go interface (uapi), and
bob's links record (the `recording` test sink), so alice's figures are the WireGuard side's.
Keys come from the `keydir` test source on /dev/shm. With no jitter, every link comes due again
`interval` seconds after its first rotation, so the second round repeats the first one's
spread: this script times that round from alice's JSON log (first rotation started to last
one committed) and takes each process's CPU over it. Needs root, wireguard-go, wg and ip.
`--baseline` gives alice recording sinks instead, to show the core's share.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_install import add_peers, cpu_of
from qkdagent_wireguard.testbed import Pair

from qkdagent.testing import config_toml, pair_configs


def configs(  # type: ignore[type-arg]
    workdir: Path, iface: str, peers: list[bytes], keys: Path, interval: float, wireguard: bool
) -> dict:
    base = pair_configs(
        workdir,
        link={"interval": interval, "jitter": 0, "reject_after": interval * 3},
    )
    template = None
    for name, config in base.items():
        template = config["links"].pop("alice-bob")
        config["sources"] = {"sim": {"type": "keydir", "directory": str(keys)}}
        config["agent"]["plugins"] = ["memory", "wireguard"] if name == "alice" else ["memory"]
        config["agent"]["log_format"] = "json"
        config["agent"]["max_parallel_rotations"] = 64
        if name == "bob" or not wireguard:
            config["sinks"] = {"rec": {"type": "recording"}}
        for i, peer in enumerate(peers):
            link = dict(template, sources=["sim"])
            if name == "alice" and wireguard:
                sink = f"wg{i:05d}"
                config["sinks"][sink] = {
                    "type": "wireguard",
                    "interface": iface,
                    "peer_public_key": base64.b64encode(peer).decode(),
                    "backend": "uapi",
                }
                link["sinks"] = [sink]
            else:
                link["sinks"] = ["rec"]
            config["links"][f"link{i:05d}"] = link
    return base


def commits(log: Path, epoch: int) -> list[tuple[float, float]]:
    """(start, end) in epoch seconds of every commit of `epoch` in a JSON log."""
    found = []
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("epoch") == epoch and "duration_ms" in entry:
            end = datetime.datetime.fromisoformat(entry["ts"].replace("Z", "+00:00")).timestamp()
            found.append((end - entry["duration_ms"] / 1000, end))
    return found


def wait_for(log: Path, epoch: int, count: int, timeout: float, procs: dict[str, Any]) -> None:
    deadline = time.monotonic() + timeout
    while len(commits(log, epoch)) < count:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"epoch {epoch} not reached by {count} links in {timeout:g} s")
        time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=40.0, help="must exceed round 1")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="alice records instead of installing (the core's share, same peers and links)",
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="qkdwg-agents-"))
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else workdir
    keys = Path(tempfile.mkdtemp(prefix="qkdwg-keys-", dir=shm))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        with Pair(workdir / "wg", log_level="error").open(os.urandom(32), os.urandom(32)) as pair:
            a = pair.a
            assert a is not None and a.proc is not None
            peers = add_peers(a, args.peers)
            cfg = configs(workdir, a.iface, peers, keys, args.interval, not args.baseline)
            logs = {name: workdir / f"{name}.log" for name in cfg}
            for name in ("bob", "alice"):
                path = workdir / f"{name}.toml"
                path.write_text(config_toml(cfg[name]))
                procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "qkdagent", "run", "-c", str(path)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=open(logs[name], "wb"),
                )
            started = time.time()
            wait_for(logs["alice"], 1, args.peers, 600, procs)
            first = commits(logs["alice"], 1)
            due = min(start for start, _ in first) + args.interval
            if max(end for _, end in first) > due - 2:
                raise RuntimeError("round 1 took longer than the interval: raise --interval")
            time.sleep(max(0.0, due - 2 - time.time()))
            pids = {"alice": procs["alice"].pid, "bob": procs["bob"].pid}
            pids["wireguard-go"] = a.proc.pid
            cpu0, t0 = {n: cpu_of(p) for n, p in pids.items()}, time.time()
            wait_for(logs["alice"], 2, args.peers, args.interval * 2, procs)
            cpu1, t1 = {n: cpu_of(p) for n, p in pids.items()}, time.time()
            second = commits(logs["alice"], 2)
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            proc.wait(timeout=120)
        shutil.rmtree(keys, ignore_errors=True)
    span = max(end for _, end in second) - min(start for start, _ in second)
    span1 = max(end for _, end in first) - min(start for start, _ in first)
    durations = sorted(end - start for start, end in second)
    what = "recording sinks (baseline)" if args.baseline else "wireguard sinks (uapi)"
    print(
        f"{args.peers} peers of one wireguard-go interface, one link each, rotated by one agent "
        f"pair (separate processes, mutual TLS over loopback); alice: {what}:"
    )
    print(f"  round 1 (right after start, {first[0][0] - started:.1f} s in): {span1:.2f} s")
    print(f"  round 2 (all due at once): {span:.2f} s from first start to last commit")
    print(
        f"  one rotation within round 2: p50 {durations[len(durations) // 2] * 1e3:.0f} ms, "
        f"max {durations[-1] * 1e3:.0f} ms (64 run at a time)"
    )
    window = t1 - t0
    for name in pids:
        used = cpu1[name] - cpu0[name]
        print(f"  CPU of {name:<12} over that {window:.1f} s window: {used:.2f} s")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
