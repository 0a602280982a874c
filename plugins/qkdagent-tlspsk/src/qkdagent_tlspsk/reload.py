"""Telling a consumer to re-read its PSK file, and watching whether it did (trio I/O).

A signal goes to the pid in a pid file (stunnel: SIGHUP); a command runs with a clean argv and
environment (never the key). A log watcher remembers the log size before the reload and then looks
for the consumer's success or failure line after it, because stunnel answers a bad file only with
a log line and keeps serving its old keys.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import trio

from qkdagent import SinkError, decimal, program_env, run_program


@dataclass(frozen=True)
class LogWatch:
    path: Path
    success: str
    failure: str


def parse_signal(name: str) -> signal.Signals | None:
    """`HUP`, `SIGHUP` or a number; None if unknown."""
    text = name.upper().removeprefix("SIG")
    try:
        return signal.Signals(int(text)) if text.isdigit() else signal.Signals["SIG" + text]
    except (KeyError, ValueError):
        return None


def read_pid(pid_file: Path) -> int:
    try:
        text = pid_file.read_text(encoding="ascii").strip()
    except OSError as exc:
        raise SinkError(f"cannot read pid file {pid_file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SinkError(f"pid file {pid_file} is not ASCII") from None
    pid = decimal(text, 7)
    if pid is None or not 1 < pid < 2**22:
        raise SinkError(f"pid file {pid_file} does not hold a process id")
    return pid


@dataclass(frozen=True)
class LogPosition:
    """Where the consumer's log stood before a reload: which file, and how far it went."""

    file: tuple[int, int] | None
    """(st_dev, st_ino); None when there was no log yet."""
    offset: int


def log_offset(watch: LogWatch | None) -> LogPosition:
    if watch is None:
        return LogPosition(None, 0)
    try:
        st = watch.path.stat()
    except OSError:  # absent (read from the start once it appears) or unreadable (_scan says)
        return LogPosition(None, 0)
    return LogPosition((st.st_dev, st.st_ino), st.st_size)


async def send_signal(pid_file: Path, sig: signal.Signals) -> int:
    pid = await trio.to_thread.run_sync(read_pid, pid_file)
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        raise SinkError(f"consumer process {pid} (from {pid_file}) is not running") from None
    except PermissionError:
        raise SinkError(f"not allowed to signal process {pid} (from {pid_file})") from None
    return pid


async def run_command(argv: list[str], deadline: float) -> None:
    """Run an admin-configured reload command (the core's runner: clean env, no key, bounded,
    killed at `deadline`); a non-zero exit is an install failure."""
    await run_program(
        argv, deadline=deadline, what="reload command", env=program_env({"LANG": "C"})
    )


SCAN_CHUNK = 1 << 20
SCAN_CHUNKS = 64  # per scan: a log growing faster than 64 MiB a poll is read over several


def _first_verdict(text: bytes, watch: LogWatch) -> bool | None:
    """The verdict written first in `text` (the consumer's line for this reload comes before
    any later reload's), or None."""
    found = [
        (at, verdict)
        for needle, verdict in ((watch.failure, False), (watch.success, True))
        if (at := text.find(needle.encode())) >= 0
    ]
    return min(found)[1] if found else None


def _scan(watch: LogWatch, pos: LogPosition) -> tuple[bool | None, LogPosition]:
    """Look for the verdict in the complete lines after `pos`; return it and where the next
    scan starts. The position moves past every complete line read, so a busy consumer
    (stunnel logs each connection) cannot push the verdict out of sight however much it logs
    between two scans; a partial last line is read again next time. A log replaced (another
    file under the name) or truncated is read from its start."""
    overlap = max(len(watch.success.encode()), len(watch.failure.encode())) - 1
    try:
        with watch.path.open("rb") as fh:
            st = os.fstat(fh.fileno())
            file, offset = (st.st_dev, st.st_ino), pos.offset
            if file != pos.file or st.st_size < offset:
                offset = 0
            for _ in range(SCAN_CHUNKS):
                fh.seek(offset)
                chunk = fh.read(SCAN_CHUNK)
                end = chunk.rfind(b"\n") + 1
                if end:
                    verdict, advance = _first_verdict(chunk[:end], watch), end
                elif len(chunk) == SCAN_CHUNK:
                    # One line longer than a chunk: the next read starts `overlap` bytes back,
                    # so a verdict cut here is whole in one of the two.
                    verdict, advance = _first_verdict(chunk, watch), SCAN_CHUNK - overlap
                else:
                    break  # a partial last line: read again next time
                if verdict is not None:
                    return verdict, LogPosition(file, offset)
                offset += advance
                if len(chunk) < SCAN_CHUNK:
                    break
    except FileNotFoundError:
        return None, pos
    return None, LogPosition(file, offset)


async def wait_for_log(watch: LogWatch, pos: LogPosition, deadline: float) -> None:
    """Wait (bounded) for the success line written after `pos`; raise on failure/timeout."""
    delay = 0.005
    while True:
        try:
            verdict, pos = await trio.to_thread.run_sync(_scan, watch, pos)
        except OSError as exc:
            raise SinkError(f"cannot read the log {watch.path}: {exc.strerror}") from None
        if verdict is True:
            return
        if verdict is False:
            raise SinkError(
                f"consumer rejected the new PSK file ({watch.failure!r} in {watch.path})"
            )
        if trio.current_time() >= deadline:
            raise SinkError(
                f"consumer did not confirm the reload ({watch.success!r} not seen in {watch.path})"
            )
        await trio.sleep(delay)
        delay = min(delay * 1.5, 0.02)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
