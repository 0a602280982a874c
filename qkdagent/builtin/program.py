"""Running an admin-configured program (an `exec` sink hook, a consumer's reload command).

One runner for every plugin that starts a program, so they all get the same safety rules:

- the argv and the environment never carry key bytes (both are visible in /proc); a secret goes
  on standard input;
- the environment is clean: only `PATH`, `LANG`, `LC_ALL`, `TZ` pass through, plus what the
  caller adds (`program_env`);
- bounded: the whole run has a deadline (the process is killed after it), standard output is
  discarded and at most `MAX_STDERR` bytes of standard error are kept;
- a failure is a `SinkError` naming the program, its exit status and, only when the program was
  given nothing on standard input (so it never saw a secret it could echo), its last lines of
  standard error.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from functools import partial

import trio

from ..errors import SinkError

PASS_ENV = ("PATH", "LANG", "LC_ALL", "TZ")
DEFAULT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
MAX_STDERR = 64 * 1024
"""Standard error kept for the error message; the rest is read and dropped."""


def program_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The agent's `PATH` (or a default), `LANG`, `LC_ALL` and `TZ` if set, then `extra`."""
    env = {name: os.environ[name] for name in PASS_ENV if name in os.environ}
    env.setdefault("PATH", DEFAULT_PATH)
    env.update(extra or {})
    return env


def _tail(stderr: bytes, lines: int = 3) -> str:
    text = stderr.decode("utf-8", "replace").strip()
    return " | ".join(line.strip() for line in text.splitlines()[-lines:])[:300]


async def _feed(stream: trio.abc.SendStream, data: bytes) -> None:
    try:
        if data:
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the program exited without reading its input: its exit status tells
    finally:
        await stream.aclose()


async def _drain(stream: trio.abc.ReceiveStream, kept: bytearray) -> None:
    while chunk := await stream.receive_some(65536):
        room = MAX_STDERR - len(kept)
        if room > 0:
            kept += chunk[:room]


async def run_program(
    argv: Sequence[str],
    *,
    deadline: float,
    what: str,
    stdin: bytes = b"",
    env: Mapping[str, str] | None = None,
) -> None:
    """Run `argv` to completion by `deadline` (trio time); raise `SinkError` if it fails.

    `what` names the program in errors ("sink 'psk': hook", "reload command"); `env` defaults
    to `program_env()`. Cancellation kills the program (trio's `run_process` rules).
    """
    name = os.path.basename(argv[0]) if argv else "?"
    stderr = bytearray()
    allowed = deadline - trio.current_time()
    process: trio.Process | None = None
    failed: OSError | None = None
    try:
        with trio.fail_at(deadline):
            async with trio.open_nursery() as nursery:
                try:
                    process = await nursery.start(
                        partial(
                            trio.run_process,
                            list(argv),
                            stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE,
                            check=False,
                            env=dict(env) if env is not None else program_env(),
                        )
                    )
                except OSError as exc:  # caught here: raised in the body it would be grouped
                    failed = exc
                else:
                    assert process.stdin is not None and process.stderr is not None
                    nursery.start_soon(_feed, process.stdin, stdin)
                    nursery.start_soon(_drain, process.stderr, stderr)
    except trio.TooSlowError:
        raise SinkError(f"{what} {name} timed out after {max(allowed, 0):.3g} s") from None
    if failed is not None or process is None:
        reason = failed.strerror if failed is not None else "not started"
        raise SinkError(f"{what} {name}: cannot run: {reason}")
    if process.returncode != 0:
        quoted = _tail(bytes(stderr)) if not stdin else ""
        raise SinkError(
            f"{what} {name} exited with {process.returncode}" + (f": {quoted}" if quoted else "")
        )


__all__ = ["MAX_STDERR", "program_env", "run_program"]
