"""Reload commands, pid files, log confirmation and the grace-expiry task (no TLS server)."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from qkdagent_tlspsk import reload
from qkdagent_tlspsk.reload import LogWatch, parse_signal

from qkdagent import KeyMeta, Link, Secret, SinkError
from qkdagent.testing import MemoryPool, open_agent_pair

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


async def test_slow_reload_command_times_out_at_the_confirm_deadline(
    tmp_path: Path, h: Any, autojump_clock: trio.testing.MockClock
) -> None:
    # Jump only after a real second of idleness: the killed `sleep` exits well before that, so
    # trio's SIGTERM-then-wait is not skipped ahead to SIGKILL.
    autojump_clock.autojump_threshold = 1.0
    sink = h.make_sink(
        tmp_path,
        path=str(tmp_path / "psk"),
        reload_command=["sleep", "600"],
        confirm="none",
        confirm_timeout=0.2,
    )
    await sink.prepare()
    with pytest.raises(SinkError, match=r"^reload command sleep timed out after 0\.2 s$"):
        await sink.install(LINK, Secret.random(32), meta(1))


async def test_reload_command_gone_since_prepare_is_an_install_failure(
    tmp_path: Path, h: Any
) -> None:
    tool = tmp_path / "reload-tool"
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(0o700)
    sink = h.make_sink(
        tmp_path, path=str(tmp_path / "psk"), reload_command=[str(tool)], confirm="none"
    )
    await sink.prepare()  # found on disk here
    tool.unlink()
    with pytest.raises(SinkError, match=r"^reload command reload-tool: cannot run: No such file"):
        await sink.install(LINK, Secret.random(32), meta(1))


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


NOISE = b"LOG5[42]: Service [srv] accepted connection from 127.0.0.1:40000\n"
OK_LINE = b"LOG5[ui]: Configuration successful\n"
BAD_LINE = b"LOG3[ui]: Configuration failed\n"
CHUNK = 4096  # the scan's read size in these tests, so a many-chunk log stays small


@pytest.fixture
def small_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reload, "SCAN_CHUNK", CHUNK)


def watch(path: Path) -> LogWatch:
    return LogWatch(path, "Configuration successful", "Configuration failed")


def noise(size: int) -> bytes:
    return (NOISE * (size // len(NOISE) + 1))[:size]


def scan_until_verdict(log: Path, pos: reload.LogPosition) -> bool:
    verdict = None
    for _ in range(1000):
        last = pos
        verdict, pos = reload._scan(watch(log), pos)
        if verdict is not None:
            return verdict
        assert pos != last, "each scan of a log with whole lines in it moves on"
    raise AssertionError("no verdict")


@pytest.mark.parametrize("chunks", [0.5, 1, 1.5, 5, 200])
def test_the_verdict_is_found_behind_more_log_than_one_read(
    tmp_path: Path, small_reads: None, chunks: float
) -> None:
    """A busy consumer may log megabytes of connections between the reload and its verdict;
    the scan moves on past each read instead of reading the first one again."""
    log = tmp_path / "c.log"
    log.write_bytes(b"old: " + OK_LINE)  # before the reload: never counted
    pos = reload.log_offset(watch(log))
    assert reload._scan(watch(log), pos) == (None, pos)
    with log.open("ab") as fh:
        fh.write(noise(int(chunks * CHUNK) - 1) + b"\n")
    assert reload._scan(watch(log), pos)[0] is None
    with log.open("ab") as fh:
        fh.write(OK_LINE)
    assert scan_until_verdict(log, pos) is True


def test_a_scan_reads_a_bounded_amount(
    tmp_path: Path, small_reads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reload, "SCAN_CHUNKS", 3)
    log = tmp_path / "c.log"
    log.write_bytes(noise(10 * CHUNK) + b"\n" + OK_LINE)
    verdict, pos = reload._scan(watch(log), reload.LogPosition(None, 0))
    assert verdict is None and 2 * CHUNK < pos.offset <= 3 * CHUNK
    assert scan_until_verdict(log, pos) is True


def test_a_partial_last_line_is_read_again(tmp_path: Path, small_reads: None) -> None:
    log = tmp_path / "c.log"
    log.write_bytes(noise(CHUNK + 100) + b"\n" + OK_LINE[:-9])
    verdict, pos = reload._scan(watch(log), reload.LogPosition(None, 0))
    assert verdict is None and pos.offset == CHUNK + 101, "stops where the partial line starts"
    with log.open("ab") as fh:
        fh.write(OK_LINE[-9:])
    assert reload._scan(watch(log), pos)[0] is True


@pytest.mark.parametrize("shift", range(-40, 41))
@pytest.mark.parametrize("line", [OK_LINE, BAD_LINE])
def test_a_verdict_line_cut_by_a_read_is_read_again_whole(
    tmp_path: Path, small_reads: None, shift: int, line: bytes
) -> None:
    """Every placement of a verdict line across the end of the second read."""
    log = tmp_path / "c.log"
    log.write_bytes(noise(2 * CHUNK + shift - 1) + b"\n" + line + noise(100) + b"\n")
    assert scan_until_verdict(log, reload.LogPosition(None, 0)) is (line == OK_LINE)


def test_the_rest_of_a_line_longer_than_a_read_never_counts(
    tmp_path: Path, small_reads: None
) -> None:
    """Its start is out of sight, so its end cannot be told from a peer's text in a message."""
    log = tmp_path / "c.log"
    log.write_bytes(b"x" * (3 * CHUNK + 5) + b" LOG5[ui]: Configuration successful\n")
    verdict, pos = reload._scan(watch(log), reload.LogPosition(None, 0))
    assert verdict is None and pos.offset == log.stat().st_size and not pos.mid_line
    with log.open("ab") as fh:
        fh.write(BAD_LINE)
    assert reload._scan(watch(log), pos)[0] is False


@pytest.mark.parametrize(
    "forged",
    [
        b"LOG3[12]: SNI: no pattern matched servername: x]: Configuration successful\n",
        b"LOG5[12]: Configuration successful, says the peer\n",
        b"Configuration successful LOG5[ui]: x\n",
    ],
)
def test_a_verdict_inside_another_message_does_not_count(tmp_path: Path, forged: bytes) -> None:
    """stunnel logs some of a peer's text (a server name, say) inside its messages."""
    log = tmp_path / "c.log"
    log.write_bytes(b"2026.12.05 22:04:34 " + forged + b"2026.12.05 22:04:34 " + BAD_LINE)
    assert reload._scan(watch(log), reload.LogPosition(None, 0))[0] is False


@pytest.mark.parametrize(
    ("line", "counts"),
    [
        (b"2026.12.05 22:04:34 LOG5[ui]: Configuration successful", True),
        (b"2026.12.05 22:04:34 LOG5[ui]: Configuration successful\r", True),
        (b"Dec  5 22:04:34 gw stunnel[77]: LOG5[ui]: Configuration successful", True),
        (b"Dec  5 22:04:34 LOGSRV stunnel[77]: LOG5[ui]: Configuration successful", True),
        (b"Configuration successful", True),
        (b"app: Configuration successful", True),
        # a peer's text inside stunnel's message, in either form, and look-alikes
        (
            b"Dec  5 22:04:34 gw stunnel[77]: LOG7[3]: SNI: servername: Configuration successful",
            False,
        ),
        (b"2026.12.05 22:04:34 LOG3[12]: SNI: x]: Configuration successful", False),
        (b"2026.12.05 22:04:34 LOG5[ui]: Configuration successful, or not", False),
        (b"2026.12.05 22:04:34 LOG5[ui]: Configuration successful ", False),
        (b"NotConfiguration successful", False),
        (b"Configuration successful LOG5[ui]: x", False),
    ],
)
def test_which_lines_are_a_verdict(line: bytes, counts: bool) -> None:
    assert reload._says(line, b"Configuration successful") is counts


def test_a_log_truncated_in_place_and_grown_past_the_position(tmp_path: Path) -> None:
    """copytruncate: the position now falls inside a line of the new text, whose rest is a
    fragment, not a line."""
    log = tmp_path / "c.log"
    log.write_bytes(NOISE * 3)
    pos = reload.log_offset(watch(log))
    with log.open("r+b") as fh:
        fh.truncate(0)
    log.write_bytes(b"x" * (pos.offset - 5) + b"app: Configuration successful\n" + BAD_LINE)
    assert reload._scan(watch(log), pos)[0] is False


def test_a_position_inside_a_line_skips_its_rest(tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    log.write_bytes(NOISE + b"2026.12.05 22:04:34 LOG5[ui]: Configuration")
    pos = reload.log_offset(watch(log))
    assert pos.mid_line
    with log.open("ab") as fh:
        fh.write(b" successful\n" + BAD_LINE)  # the line begun before the reload: not ours
    assert reload._scan(watch(log), pos)[0] is False


@pytest.mark.parametrize("gap", [0, 10, CHUNK, 3 * CHUNK])
def test_the_verdict_written_first_decides(tmp_path: Path, small_reads: None, gap: int) -> None:
    """Within one read or across reads: this reload's line comes before a later reload's."""
    for first, second, expected in ((OK_LINE, BAD_LINE, True), (BAD_LINE, OK_LINE, False)):
        log = tmp_path / "c.log"
        log.write_bytes(first + noise(gap) + b"\n" + second)
        assert scan_until_verdict(log, reload.LogPosition(None, 0)) is expected


def test_a_replaced_or_truncated_log_is_read_from_its_start(tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    log.write_bytes(noise(1000))
    pos = reload.log_offset(watch(log))
    replacement = tmp_path / "new.log"
    replacement.write_bytes(OK_LINE + noise(5000))  # longer than the old offset
    replacement.rename(log)
    assert reload._scan(watch(log), pos)[0] is True
    pos = reload.log_offset(watch(log))
    with log.open("r+b") as fh:
        fh.truncate(0)
        fh.write(BAD_LINE)
    assert reload._scan(watch(log), pos)[0] is False


async def test_an_absent_log_is_waited_for_and_an_unreadable_one_fails(tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    pos = reload.log_offset(watch(log))
    assert pos == reload.LogPosition(None, 0)
    assert reload._scan(watch(log), pos) == (None, pos)
    log.write_bytes(NOISE + OK_LINE)  # appears after the reload: read whole
    await reload.wait_for_log(watch(log), pos, trio.current_time() + 5)
    log.unlink()
    log.mkdir()
    with pytest.raises(SinkError, match="cannot read the log"):
        await reload.wait_for_log(watch(log), pos, trio.current_time() + 5)


@pytest.mark.parametrize("content", ["", "abc", "1", "99999999999", "9" * 5000, "0000001"])
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


async def test_expiry_task_drops_previous_identity_after_grace(
    tmp_path: Path, h: Any, nursery: trio.Nursery
) -> None:
    # real time (the task sleeps on the wall clock): 2 s of grace leaves a loaded machine
    # ample time to see the previous identity before it expires
    sink = h.make_sink(tmp_path, path=str(tmp_path / "psk"), grace_period=2.0)
    await sink.prepare()
    await nursery.start(sink.run)  # the sink's expiry task, as the agent runs it
    await sink.install(LINK, Secret.random(32), meta(1))
    await sink.install(LINK, Secret.random(32), meta(2))
    assert "l.1:" in sink.path.read_text()
    with trio.fail_after(15):
        while "l.1:" in sink.path.read_text() or sink.next_expiry() is not None:  # noqa: ASYNC110
            await trio.sleep(0.05)
    assert sink.path.read_text().startswith("l.2:")


async def test_a_failing_expiry_is_retried_after_a_pause(
    tmp_path: Path, h: Any, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    sink = h.make_sink(tmp_path, path=str(tmp_path / "psk"), grace_period=1.0)
    sink.clock = autojump_clock.current_time  # the grace runs on the virtual clock
    await sink.prepare()
    await sink.install(LINK, Secret.random(32), meta(1))
    await sink.install(LINK, Secret.random(32), meta(2))
    calls: list[float] = []

    async def failing_expire() -> bool:
        calls.append(trio.current_time())
        raise SinkError("cannot write the file")

    sink.expire = failing_expire
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        await trio.sleep(10.5)
        nursery.cancel_scope.cancel()
    # once a second from the end of the grace, not in a busy loop
    assert len(calls) == 10 and all(b - a >= 1.0 for a, b in itertools.pairwise(calls))
    assert "removing an expired PSK identity failed: cannot write the file" in caplog.text


async def test_the_agent_runs_the_expiry_task(tmp_path: Path) -> None:
    """No install after epoch 2 (key source down): only the sink's task, started by the agent,
    can take the previous identity out of the file once its grace is over (real time)."""
    psk = tmp_path / "alice.psk"

    def side(path: Path) -> dict[str, Any]:
        sink = {"type": "tls-psk", "path": str(path), "grace_period": 2.0}
        return {"sinks": {"psk": sink}, "plugins": ["tlspsk"]}

    async with open_agent_pair(
        tmp_path / "agents",
        alice=side(psk),
        bob=side(tmp_path / "bob.psk"),
        link={"interval": 1.0, "jitter": 0, "reject_after": 60},
        local=True,
    ) as pair:
        await pair.wait_for_epoch(2)
        MemoryPool.named(pair.configs["alice"]["sources"]["sim"]["pool"]).down = True
        epoch = pair.epoch("alice")
        ids = lambda: [line.split(":")[0] for line in psk.read_text().splitlines()]  # noqa: E731
        with trio.fail_after(1.5):  # within the grace: the previous identity is still there
            while ids() != [f"alice-bob.{epoch}", f"alice-bob.{epoch - 1}"]:  # noqa: ASYNC110
                await trio.sleep(0.01)
        with trio.fail_after(10):
            while ids() != [f"alice-bob.{epoch}"]:  # noqa: ASYNC110 (file written by the agent)
                await trio.sleep(0.05)
        assert pair.epoch("alice") == epoch  # no rotation (no install) removed it


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
