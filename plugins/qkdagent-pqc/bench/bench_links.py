"""Many links at a Rosenpass-like interval with the `mlkem` source, beside the same links with a
plain (key directory) source: CPU per rotation and peak RSS of each agent, in one run.

    python3 bench/bench_links.py [--links 10000] [--interval 120] [--seconds 30]
                                 [--kinds keydir,pqc,hybrid]

For each kind of link, two agents run as their own `qkdagent run` processes (the test kit's
`AgentProcess`) over loopback HTTPS with mutual TLS: `keydir` (the test kit's key-directory
source on /dev/shm, the reference), `pqc` (ML-KEM-768 only) and `hybrid` (keydir + pqc). Once
every link has rotated once (the start-up burst: timed, and its CPU per rotation, agent start
included), the agents' CPU (from /proc) is measured over `--seconds`, after `--settle` seconds
(a burst longer than the interval leaves links due again: their catch-up is not steady state);
CPU per rotation = CPU / rotations in that window; peak RSS is VmHWM. Prints figures; asserts
nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_rotation import mlkem_tables  # this directory: run as a script
from qkdagent_pqc import kem

from qkdagent.testing import AgentProcess, config_toml, pair_configs

NAMES = ("alice", "bob")


def write_configs(directory: Path, keys: Path, kind: str, args: argparse.Namespace) -> list[Path]:
    pqc = mlkem_tables(directory, kem.PARAMETER_SETS[kem.DEFAULT])
    sides = {}
    for name in NAMES:
        sources: dict[str, Any] = {}
        if kind in ("keydir", "hybrid"):
            sources["qkd"] = {"type": "keydir", "directory": str(keys)}
        if kind in ("pqc", "hybrid"):
            sources["pqc"] = pqc[name]
        sides[name] = {
            "plugins": ["pqc", "memory"],
            "sources": sources,
            "sinks": {"rec": {"type": "recording"}},
        }
    timers = {"interval": args.interval, "jitter": 0.1, "reject_after": args.interval * 1.5}
    configs = pair_configs(directory, **sides, link=timers)
    paths = []
    for name, config in configs.items():
        config["agent"]["max_parallel_rotations"] = args.parallel
        config["agent"]["log_format"] = "json"
        template = config["links"].pop("alice-bob")
        for i in range(args.links):
            config["links"][f"link{i:05d}"] = dict(template)
        path = directory / f"{name}.toml"
        path.write_text(config_toml(config))
        paths.append(path)
    return paths


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _links(proc: AgentProcess) -> list[dict[str, Any]]:
    """The links of /status; an unanswered status is an error, never "no rotations"."""
    for _ in range(3):
        status = proc.status()
        if status is not None:
            return list(status["links"])
    raise RuntimeError(f"{proc.status_url} did not answer (three tries)")


def run(kind: str, args: argparse.Namespace) -> None:
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    with tempfile.TemporaryDirectory(dir=shm) as keys, tempfile.TemporaryDirectory() as tmp:
        alice_conf, bob_conf = write_configs(Path(tmp), Path(keys), kind, args)
        procs = {
            "bob": AgentProcess(bob_conf, Path(tmp) / "bob.log"),
            "alice": AgentProcess(alice_conf, Path(tmp) / "alice.log"),
        }
        try:
            started = time.monotonic()
            while True:
                time.sleep(1)
                procs["alice"].epochs()  # fails at once if an agent died
                status = procs["alice"].status()
                links = [] if status is None else list(status["links"])
                if len(links) == args.links and all(x["epoch"] >= 1 for x in links):
                    break
            startup = time.monotonic() - started
            cpu0 = {n: _cpu(p.proc.pid) for n, p in procs.items()}
            epochs0 = sum(x["epoch"] for x in _links(procs["alice"]))
            time.sleep(args.settle)  # past the catch-up of links due again during the burst
            cpu_settled = {n: _cpu(p.proc.pid) for n, p in procs.items()}
            epochs_settled = sum(x["epoch"] for x in _links(procs["alice"]))
            t0 = time.monotonic()
            time.sleep(args.seconds)
            cpu1 = {n: _cpu(p.proc.pid) for n, p in procs.items()}
            elapsed = time.monotonic() - t0
            final = _links(procs["alice"])
            hwm = {n: _hwm_mb(p.proc.pid) for n, p in procs.items()}
        finally:
            for proc in procs.values():
                proc.stop()
    rotations = sum(x["epoch"] for x in final) - epochs_settled
    print(
        f"{kind:>6}: {args.links} links; start-up burst (every link's first rotation, "
        f"{epochs0} rotations) {startup:.1f} s; then {rotations} rotations in {elapsed:.0f} s "
        f"({rotations / elapsed:.1f}/s)"
    )
    for name in ("alice", "bob"):
        burst = 1000 * cpu0[name] / epochs0  # includes the agent's start (~1 s)
        used = cpu1[name] - cpu_settled[name]
        per = 1000 * used / rotations if rotations else float("nan")
        print(
            f"        {name:<5}: burst {burst:.2f} ms CPU per rotation; then {used / elapsed:.3f} "
            f"of a core, {per:.2f} ms CPU per rotation; peak RSS {hwm[name]:.0f} MB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--links", type=int, default=10000)
    parser.add_argument("--interval", type=float, default=120.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--settle", type=float, default=0.0, help="wait after the burst")
    parser.add_argument("--parallel", type=int, default=64, help="max_parallel_rotations")
    parser.add_argument("--kinds", default="keydir,pqc,hybrid")
    args = parser.parse_args()
    for kind in args.kinds.split(","):
        run(kind, args)


if __name__ == "__main__":
    main()
