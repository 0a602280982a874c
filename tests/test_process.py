"""Agents as real processes: crash at every step of a rotation and restart; SIGTERM; SIGHUP."""

from __future__ import annotations

import re
import signal
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from qkdagent.faults import CRASH_EXIT_CODE, POINTS
from qkdagent.testing.procs import AgentProcess, process_pair, wait_until
from qkdagent.testing.toml import config_toml

LINK = "alice-bob"
COMMIT_RE = re.compile(r"link (\S+): epoch (\d+) committed \((\w+)\) in [\d.]+ ms, key IDs (\S+)")


def _commits(*logs: Path) -> list[tuple[str, int, str, str]]:
    found = []
    for log in logs:
        for match in COMMIT_RE.finditer(log.read_text()):
            found.append((match[1], int(match[2]), match[3], match[4]))
    return found


def _converged(a: AgentProcess, b: AgentProcess, directory: Path, above: int) -> bool:
    ea, eb = a.epochs().get(LINK), b.epochs().get(LINK)
    if ea is None or ea != eb or ea <= above:
        return False
    pa, pb = directory / "alice.psk", directory / "bob.psk"
    return pa.exists() and pa.read_bytes() == pb.read_bytes()


@pytest.mark.parametrize("point", POINTS)
def test_crash_at_every_step_converges(tmp_path: Path, point: str) -> None:
    paths = process_pair(tmp_path, link={"interval": 0.3, "jitter": 0, "reject_after": 60})
    victim = "alice" if point.startswith("initiator") else "bob"
    env = {name: ({"QKDAGENT_CRASH_AT": point} if name == victim else {}) for name in paths}
    logs = {name: tmp_path / f"{name}.log" for name in paths}
    procs = {n: AgentProcess(paths[n], logs[n], env[n]) for n in ("bob", "alice")}
    try:
        assert procs[victim].wait_exit(timeout=30) == CRASH_EXIT_CODE
        crashed_epoch = max([e for *_, e in [(0, 0)]] + [c[1] for c in _commits(*logs.values())])
        procs[victim] = AgentProcess(paths[victim], logs[victim])  # restart, same state dir
        wait_until(
            lambda: _converged(procs["alice"], procs["bob"], tmp_path, crashed_epoch + 2),
            timeout=40,
            what=f"convergence after a crash at {point}",
        )
    finally:
        for proc in procs.values():
            proc.stop()
    commits = _commits(*logs.values())
    for role in ("initiator", "responder"):
        mine = [(epoch, ids) for _, epoch, r, ids in commits if r == role]
        used = [i for _, ids in mine for i in ids.split(",")]
        assert len(used) == len(set(used)), f"{role} used a key ID twice"
        epochs = [epoch for epoch, _ in mine]
        assert epochs == sorted(epochs) and len(epochs) == len(set(epochs))
    by_epoch = {}
    for _, epoch, _, ids in commits:
        assert by_epoch.setdefault(epoch, ids) == ids, "the two sides committed different keys"
    assert not list((tmp_path / "keys").glob(".taken-*"))


def test_sigterm_exits_zero_after_draining(tmp_path: Path) -> None:
    paths = process_pair(tmp_path, link={"interval": 0.2, "jitter": 0, "reject_after": 60})
    procs = {n: AgentProcess(paths[n], tmp_path / f"{n}.log") for n in ("bob", "alice")}
    try:
        wait_until(lambda: procs["alice"].epochs().get(LINK, 0) >= 3, 30, "three rotations")
        for name in ("alice", "bob"):
            started = time.monotonic()
            procs[name].proc.send_signal(signal.SIGTERM)
            assert procs[name].wait_exit(timeout=20) == 0
            assert time.monotonic() - started < 12  # drain_timeout (10 s) + shutdown
    finally:
        for proc in procs.values():
            proc.stop()
    assert "stopped" in (tmp_path / "alice.log").read_text()


def test_sighup_adds_and_removes_links(tmp_path: Path) -> None:
    paths = process_pair(tmp_path, link={"interval": 0.3, "jitter": 0, "reject_after": 60})
    originals = {n: p.read_text() for n, p in paths.items()}
    procs = {n: AgentProcess(paths[n], tmp_path / f"{n}.log") for n in ("bob", "alice")}
    try:
        wait_until(lambda: procs["alice"].epochs().get(LINK, 0) >= 1, 30, "first rotation")
        for name, path in paths.items():
            config = tomllib.loads(originals[name])
            second = dict(config["links"][LINK])
            second["sinks"] = ["psk2"]
            config["links"]["second"] = second
            config["sinks"]["psk2"] = {"type": "file", "path": str(tmp_path / f"{name}.psk2")}
            path.write_text(config_toml(config))
            procs[name].proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: all(p.epochs().get("second", 0) >= 2 for p in procs.values()),
            30,
            "the added link to rotate",
        )
        assert (tmp_path / "alice.psk2").read_bytes() != (tmp_path / "alice.psk").read_bytes()
        wait_until(
            lambda: (tmp_path / "alice.psk2").read_bytes() == (tmp_path / "bob.psk2").read_bytes(),
            10,
            "the added link's secrets to match",
        )
        before = (tmp_path / "bob.psk2").read_bytes()
        for name, path in paths.items():
            path.write_text(originals[name])
            procs[name].proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: all(set(p.epochs()) == {LINK} for p in procs.values()), 30, "link removal"
        )
        # erased (fail closed); the status drops the link just before its sinks are erased
        wait_until(lambda: (tmp_path / "bob.psk2").read_bytes() != before, 10, "the erase")
        assert all(p.proc.poll() is None for p in procs.values())
        epoch = procs["alice"].epochs()[LINK]
        wait_until(
            lambda: procs["bob"].epochs().get(LINK, -1) > epoch, 30, "the first link to go on"
        )
    finally:
        for proc in procs.values():
            proc.stop()
    # the start-up heap left the collector's work once ready, and each reload settled it again
    settled = (tmp_path / "alice.log").read_text().count("heap settled after ")
    assert settled == 3, (tmp_path / "alice.log").read_text()[-2000:]


def reload_alice(tmp_path: Path, edit: Callable[[str], str], logged: str) -> str:
    """Run a pair rotating every 0.3 s, rewrite alice's config with `edit` and SIGHUP her;
    once `logged` shows up in her log, check that her link goes on rotating. Her log."""
    paths = process_pair(tmp_path, link={"interval": 0.3, "jitter": 0, "reject_after": 60})
    procs = {n: AgentProcess(paths[n], tmp_path / f"{n}.log") for n in ("bob", "alice")}
    log = tmp_path / "alice.log"
    try:
        wait_until(lambda: procs["alice"].epochs().get(LINK, 0) >= 1, 30, "first rotation")
        paths["alice"].write_text(edit(paths["alice"].read_text()))
        procs["alice"].proc.send_signal(signal.SIGHUP)
        wait_until(lambda: logged in log.read_text(), 10, repr(logged))
        epoch = procs["alice"].epochs()[LINK]
        wait_until(lambda: procs["alice"].epochs().get(LINK, -1) > epoch, 10, "rotations to go on")
        return log.read_text()
    finally:
        for proc in procs.values():
            proc.stop()


def test_invalid_config_on_sighup_keeps_running(tmp_path: Path) -> None:
    text = reload_alice(
        tmp_path, lambda config: config.replace("interval = 0.3", "interval = -1"), "reload refused"
    )
    assert "links.alice-bob.interval" in text


def test_a_plugin_bug_on_sighup_keeps_running(tmp_path: Path) -> None:
    def add_buggy_sink(config: str) -> str:
        assert 'sinks = ["psk"]' in config
        config = config.replace('sinks = ["psk"]', 'sinks = ["psk", "buggy"]')
        return config + '\n[sinks.buggy]\ntype = "recording"\nprepare_bug = "psk=0123abcd"\n'

    text = reload_alice(tmp_path, add_buggy_sink, "config reload failed")
    assert "unexpected RuntimeError at" in text
    assert "0123abcd" not in text
