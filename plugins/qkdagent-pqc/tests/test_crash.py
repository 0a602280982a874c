"""Crash at every step of a rotation, on either side, with the `mlkem` source: real agent
processes (`QKDAGENT_CRASH_AT`), restarted on the same state directory, converge on the same
epoch and key; no ciphertext is used twice and no ciphertext reaches a private key that is gone.

A pqc-only link and a hybrid link (a shared key directory + pqc) for each crash point. The points
of one kind run in parallel within one test, to stay within CI time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qkdagent.testing import (
    CRASH_EXIT_CODE,
    CRASH_POINTS,
    AgentProcess,
    config_toml,
    pair_configs,
    wait_until,
)

from .conftest import StaticKeys

LINK = "alice-bob"
LINK_TIMERS = {"interval": 0.3, "jitter": 0, "reject_after": 60, "backoff_max": 0.5}
COMMIT_RE = re.compile(r"link (\S+): epoch (\d+) committed \((\w+)\) in [\d.]+ ms, key IDs (\S+)")
# What the agents log if a retry reached a private key that is gone (the source refuses a
# ciphertext for a key it no longer holds, or one that does not decapsulate: a failure at stage
# "source"), or if a ciphertext came twice (the core's key-reuse check).
REFUSALS = (
    "rotation failed at source",
    "not the ephemeral key this agent answered last",
    "does not decapsulate",
    "was already used",
    "Traceback",
)


@dataclass
class Run:
    """One pair of agent processes, one of them set to crash at `point`."""

    directory: Path
    point: str
    hybrid: bool
    paths: dict[str, Path] = field(default_factory=dict)
    procs: dict[str, AgentProcess] = field(default_factory=dict)
    crashed_epoch: int = -1

    @property
    def victim(self) -> str:
        return "alice" if self.point.startswith("initiator") else "bob"

    @property
    def logs(self) -> dict[str, Path]:
        return {name: self.directory / f"{name}.log" for name in ("alice", "bob")}

    def write(self, keys: StaticKeys) -> None:
        sides: dict[str, Any] = {}
        for name in ("alice", "bob"):
            sources: dict[str, Any] = {}
            if self.hybrid:
                sources["qkd"] = {"type": "keydir", "directory": str(self.directory / "keys")}
            sources["pqc"] = keys.table(name)
            sinks = {"psk": {"type": "file", "path": str(self.directory / f"{name}.psk")}}
            sides[name] = {"plugins": ["pqc"], "sources": sources, "sinks": sinks}
        configs = pair_configs(self.directory, **sides, link=LINK_TIMERS)
        for name, config in configs.items():
            self.paths[name] = path = self.directory / f"{name}.toml"
            path.write_text(config_toml(config))

    def start(self) -> None:
        for name in ("bob", "alice"):
            env = {"QKDAGENT_CRASH_AT": self.point} if name == self.victim else {}
            self.procs[name] = AgentProcess(self.paths[name], self.logs[name], env)

    def crashed(self) -> bool:
        """Once the victim has crashed: restart it (no crash point) on the same state dir."""
        if self.crashed_epoch >= 0:
            return True
        code = self.procs[self.victim].proc.poll()
        if code is None:
            return False
        assert code == CRASH_EXIT_CODE, f"{self.point}: the victim exited with {code}"
        self.crashed_epoch = max([0] + [c[1] for c in self.commits()])
        self.procs[self.victim] = AgentProcess(self.paths[self.victim], self.logs[self.victim])
        return True

    def converged(self) -> bool:
        if not self.crashed():
            return False
        ea, eb = (self.procs[n].epochs().get(LINK) for n in ("alice", "bob"))
        if ea is None or ea != eb or ea <= self.crashed_epoch + 2:
            return False
        pa, pb = (self.directory / f"{n}.psk" for n in ("alice", "bob"))
        return pa.exists() and pb.exists() and pa.read_bytes() == pb.read_bytes()

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()

    def commits(self) -> list[tuple[str, int, str, str]]:
        found = []
        for log in self.logs.values():
            if log.exists():
                text = log.read_text(errors="replace")
                found += [(m[1], int(m[2]), m[3], m[4]) for m in COMMIT_RE.finditer(text)]
        return found


def _check(run: Run) -> None:
    commits = run.commits()
    assert commits, f"{run.point}: no commit logged"
    for role in ("initiator", "responder"):
        mine = [(epoch, ids) for _, epoch, r, ids in commits if r == role]
        used = [i for _, ids in mine for i in ids.split(",")]
        assert len(used) == len(set(used)), f"{run.point}: the {role} used a key ID twice"
        epochs = [epoch for epoch, _ in mine]
        assert epochs == sorted(epochs) and len(epochs) == len(set(epochs)), run.point
    by_epoch: dict[int, str] = {}
    for _, epoch, _, ids in commits:
        assert by_epoch.setdefault(epoch, ids) == ids, f"{run.point}: different keys, {epoch}"
    text = "".join(log.read_text(errors="replace") for log in run.logs.values())
    for refusal in REFUSALS:
        assert refusal not in text, f"{run.point}: {refusal!r} in the logs"


@pytest.mark.parametrize("hybrid", [False, True], ids=["pqc-only", "hybrid"])
def test_a_crash_at_every_step_converges(tmp_path: Path, hybrid: bool) -> None:
    keys = StaticKeys(tmp_path / "mlkem")
    runs = [Run(tmp_path / point.replace(":", "-"), point, hybrid) for point in CRASH_POINTS]
    try:
        for run in runs:
            run.write(keys)
            run.start()
        for run in runs:
            wait_until(run.converged, timeout=60, what=f"convergence after a crash at {run.point}")
    finally:
        for run in runs:
            run.stop()
    for run in runs:
        _check(run)
