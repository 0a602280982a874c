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

from qkdagent import SinkError, program_env, run_program


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
    if not text.isdigit() or not 1 < int(text) < 2**22:
        raise SinkError(f"pid file {pid_file} does not hold a process id")
    return int(text)


def log_offset(watch: LogWatch | None) -> int:
    if watch is None:
        return 0
    try:
        return watch.path.stat().st_size
    except FileNotFoundError:
        return 0


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
SCAN_CHUNKS = 64  # per scan: a log growing faster than 64 MiB per poll is read over several


def _scan(watch: LogWatch, offset: int) -> tuple[bool | None, int]:
    """Look for the verdict in the complete lines after `offset`; return it and where the next
    scan starts. The offset moves past every complete line read, so a busy consumer (stunnel
    logs each connection) cannot push the verdict out of sight however much it logs between
    two scans; a partial last line is read again next time."""
    try:
        with watch.path.open("rb") as fh:
            if os.fstat(fh.fileno()).st_size < offset:  # rotated or truncated: from the start
                offset = 0
            fh.seek(offset)
            for _ in range(SCAN_CHUNKS):
                chunk = fh.read(SCAN_CHUNK)
                end = chunk.rfind(b"\n") + 1
                if end == 0 and len(chunk) == SCAN_CHUNK:
                    # A line longer than a chunk: skip on, keeping enough of its tail to catch
                    # a verdict cut in two.
                    end = SCAN_CHUNK - 4 * max(len(watch.success), len(watch.failure))
                complete = chunk[:end].decode("utf-8", "replace")
                if watch.failure in complete:
                    return False, offset
                if watch.success in complete:
                    return True, offset
                offset += end
                if len(chunk) < SCAN_CHUNK:
                    break
                fh.seek(offset)
    except FileNotFoundError:
        pass
    return None, offset


async def wait_for_log(watch: LogWatch, offset: int, deadline: float) -> None:
    """Wait (bounded) for the success line written after `offset`; raise on failure/timeout."""
    delay = 0.005
    while True:
        verdict, offset = await trio.to_thread.run_sync(_scan, watch, offset)
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
