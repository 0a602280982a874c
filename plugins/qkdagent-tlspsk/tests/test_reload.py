"""Reload commands, pid files, log confirmation and the grace-expiry service (no TLS server)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio
from qkdagent_tlspsk.reload import parse_signal
from qkdagent_tlspsk.service import run_expiry

from qkdagent import KeyMeta, Link, Secret, SinkError

LINK = Link("l", "alice", "bob", True)


def meta(epoch: int) -> KeyMeta:
    return KeyMeta(epoch, (f"k{epoch}",), "tls-psk", time.time())


async def test_reload_command_and_log_line_confirm(tmp_path: Path, h: Any) -> None:
    log = tmp_path / "consumer.log"
    log.write_text("Configuration successful\n")  # an old line must not count
    marker = tmp_path / "ran"
    sink = h.make_sink(
        tmp_path,
        path=str(tmp_path / "psk"),
        log_file=str(log),
        reload_command=["sh", "-c", f"touch {marker}; echo 'Configuration successful' >> {log}"],
    )
    await sink.prepare()
    await sink.install(LINK, Secret.random(32), meta(1))
    assert marker.exists()
    assert log.read_text().count("Configuration successful") == 2


async def test_failing_reload_command_is_an_install_failure(tmp_path: Path, h: Any) -> None:
    sink = h.make_sink(
        tmp_path,
        path=str(tmp_path / "psk"),
        reload_command=["sh", "-c", "echo boom >&2; exit 3"],
        confirm="none",
    )
    await sink.prepare()
    secret = Secret.random(32)
    with pytest.raises(SinkError, match="exited with 3: boom") as info:
        await sink.install(LINK, secret, meta(1))
    assert secret.reveal().hex() not in str(info.value)


async def test_missing_log_line_is_an_install_failure(tmp_path: Path, h: Any) -> None:
    sink = h.make_sink(
        tmp_path,
        path=str(tmp_path / "psk"),
        reload_command=["true"],
        log_file=str(tmp_path / "silent.log"),
        confirm_timeout=0.3,
    )
    await sink.prepare()
    with pytest.raises(SinkError, match="did not confirm"):
        await sink.install(LINK, Secret.random(32), meta(1))


async def test_failure_line_is_reported(tmp_path: Path, h: Any) -> None:
    log = tmp_path / "c.log"
    sink = h.make_sink(
        tmp_path,
        path=str(tmp_path / "psk"),
        log_file=str(log),
        reload_command=["sh", "-c", f"echo 'x: Configuration failed' >> {log}"],
    )
    await sink.prepare()
    with pytest.raises(SinkError, match="rejected the new PSK file"):
        await sink.install(LINK, Secret.random(32), meta(1))


@pytest.mark.parametrize("content", ["", "abc", "1", "99999999999"])
async def test_bad_pid_files_are_install_failures(tmp_path: Path, h: Any, content: str) -> None:
    pid_file = tmp_path / "c.pid"
    pid_file.write_text(content)
    sink = h.make_sink(tmp_path, path=str(tmp_path / "psk"), pid_file=str(pid_file), confirm="none")
    await sink.prepare()
    with pytest.raises(SinkError, match="pid file"):
        await sink.install(LINK, Secret.random(32), meta(1))


async def test_missing_reload_command_is_not_installed(tmp_path: Path, h: Any) -> None:
    from qkdagent import Misconfigured, NotInstalled

    sink = h.make_sink(
        tmp_path, path=str(tmp_path / "psk"), reload_command=["no-such-tool-x"], confirm="none"
    )
    with pytest.raises(NotInstalled):
        await sink.prepare()
    sink = h.make_sink(tmp_path, path=str(tmp_path / "missing-dir" / "psk"))
    with pytest.raises(Misconfigured):
        await sink.prepare()


def test_signal_names() -> None:
    assert parse_signal("HUP") == parse_signal("SIGHUP") == parse_signal("1")
    assert parse_signal("usr1").name == "SIGUSR1"
    assert parse_signal("NOPE") is None


async def test_expiry_service_drops_previous_identity_after_grace(
    tmp_path: Path, h: Any, nursery: trio.Nursery
) -> None:
    # real time (the service sleeps on the wall clock): 2 s of grace leaves a loaded machine
    # ample time to see the previous identity before it expires
    sink = h.make_sink(tmp_path, path=str(tmp_path / "psk"), grace_period=2.0)
    await sink.prepare()
    await nursery.start(run_expiry, sink.context.state_dir)
    await sink.install(LINK, Secret.random(32), meta(1))
    await sink.install(LINK, Secret.random(32), meta(2))
    assert "l.1:" in sink.path.read_text()
    with trio.fail_after(15):
        while "l.1:" in sink.path.read_text() or sink.next_expiry() is not None:  # noqa: ASYNC110
            await trio.sleep(0.05)
    assert sink.path.read_text().startswith("l.2:")


async def test_restart_keeps_bookkeeping(tmp_path: Path, h: Any) -> None:
    first = h.make_sink(tmp_path, path=str(tmp_path / "psk"), grace_period=60)
    await first.prepare()
    await first.install(LINK, Secret.random(32), meta(1))
    await first.install(LINK, Secret.random(32), meta(2))
    again = h.make_sink(tmp_path, path=str(tmp_path / "psk"), grace_period=60)
    await again.prepare()  # a restarted agent knows epoch 1 still expires
    assert again.next_expiry() == pytest.approx(time.time() + 60, abs=5)
    again.clock = lambda: time.time() + 61
    assert await again.expire() is True
    assert [line.split(":")[0] for line in again.path.read_text().splitlines()] == ["l.2"]
