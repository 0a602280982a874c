"""Telling a consumer to re-read its PSK file, and watching whether it did (trio I/O).

A signal goes to the pid in a pid file (stunnel: SIGHUP); a command runs with a clean argv and
environment (never the key). A log watcher remembers the log size before the reload and then looks
for the consumer's success or failure line after it, because stunnel answers a bad file only with
a log line and keeps serving its old keys.
"""

from __future__ import annotations

import os
import re
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
    """Where the consumer's log stood before a reload: which file, how far it went, and
    whether that is inside a line (whose rest is a fragment that never counts)."""

    file: tuple[int, int] | None
    """(st_dev, st_ino); None when there was no log yet."""
    offset: int
    mid_line: bool = False


def log_offset(watch: LogWatch | None) -> LogPosition:
    if watch is None:
        return LogPosition(None, 0)
    try:
        with watch.path.open("rb") as fh:
            st = os.fstat(fh.fileno())
            if st.st_size:
                fh.seek(st.st_size - 1)
                last = fh.read(1)
            else:
                last = b"\n"
    except (FileNotFoundError, NotADirectoryError):  # read from the start once it appears
        return LogPosition(None, 0)
    except OSError as exc:  # not "absent": reading it from the start could find old lines
        raise SinkError(f"cannot read the log {watch.path}: {exc.strerror}") from None
    return LogPosition((st.st_dev, st.st_ino), st.st_size, mid_line=last not in (b"\n", b""))


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


_STUNNEL_PREFIX = re.compile(rb"LOG[0-7]\[[^\]]*\]: ")
"""What stunnel puts before each message (`LOG5[ui]: `), after its date or syslog's host."""


def _says(line: bytes, needle: bytes) -> bool:
    """Whether `line` is the consumer's own verdict line. Where stunnel's `LOGn[thread]: `
    prefix starts the message (in its own log form or syslog's), the message is the needle
    exactly, so a peer's text that stunnel logs inside a message (a server name, say) cannot
    pass for it; in a log of another form the line is the needle, or ends with ": " and it."""
    line = line.rstrip(b"\r")
    prefix = _STUNNEL_PREFIX.search(line)
    if prefix is not None:
        return line[prefix.end() :] == needle
    return line == needle or line.endswith(b": " + needle)


def _first_verdict(lines: bytes, watch: LogWatch) -> bool | None:
    """The verdict of the first verdict line in `lines` (whole lines; the consumer's line for
    this reload comes before any later reload's), or None."""
    failure, success = watch.failure.encode(), watch.success.encode()
    if failure not in lines and success not in lines:
        return None  # the common case: a chunk of other lines, not split
    for line in lines.split(b"\n"):
        if _says(line, failure):
            return False
        if _says(line, success):
            return True
    return None


def _scan(watch: LogWatch, pos: LogPosition) -> tuple[bool | None, LogPosition]:
    """Look for the verdict in the complete lines after `pos`; return it and where the next
    scan starts. The position moves past every complete line read, so a busy consumer
    (stunnel logs each connection) cannot push the verdict out of sight however much it logs
    between two scans; a partial last line is read again next time, and the rest of a line
    longer than a chunk (or begun before `pos`) is skipped, never judged. A log replaced
    (another file under the name) or truncated is read from its start."""
    try:
        with watch.path.open("rb") as fh:
            st = os.fstat(fh.fileno())
            file, offset, mid_line = (st.st_dev, st.st_ino), pos.offset, pos.mid_line
            if file != pos.file or st.st_size < offset:
                offset, mid_line = 0, False
            elif offset and not mid_line:
                # Truncated in place and grown past `pos` since (copytruncate): then the
                # byte before it is no longer the end of a line, and what follows is a
                # fragment.
                fh.seek(offset - 1)
                mid_line = fh.read(1) != b"\n"
            for _ in range(SCAN_CHUNKS):
                fh.seek(offset)
                chunk = fh.read(SCAN_CHUNK)
                end = chunk.rfind(b"\n") + 1
                if not end:
                    if len(chunk) < SCAN_CHUNK:
                        break  # a partial last line: read again next time
                    offset, mid_line = offset + SCAN_CHUNK, True  # inside a line too long
                    continue
                start = chunk.find(b"\n") + 1 if mid_line else 0  # past the fragment
                verdict = _first_verdict(chunk[start:end], watch)
                if verdict is not None:
                    return verdict, LogPosition(file, offset, mid_line)
                offset, mid_line = offset + end, False
                if len(chunk) < SCAN_CHUNK:
                    break
    except FileNotFoundError:
        return None, pos
    return None, LogPosition(file, offset, mid_line)


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
