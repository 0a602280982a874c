"""`run_program`: the one runner for admin programs (exec hooks, consumers' reload commands)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import trio

from qkdagent import SinkError, program_env, run_program
from qkdagent.builtin.program import MAX_STDERR

PY = sys.executable


async def _run(argv: list[str], seconds: float = 10, **kwargs: object) -> None:
    deadline = trio.current_time() + seconds
    await run_program(argv, deadline=deadline, what="hook", **kwargs)  # type: ignore[arg-type]


async def test_stdin_reaches_the_program_and_the_environment_is_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_SECRET_VAR", "must-not-pass")
    out = tmp_path / "out"
    code = (
        "import os, sys; open(sys.argv[1], 'w').write("
        "sys.stdin.read() + '|' + ','.join(sorted(os.environ)))"
    )
    await _run([PY, "-c", code, str(out)], stdin=b"key-bytes", env=program_env({"EXTRA": "1"}))
    stdin, names = out.read_text().split("|")
    assert stdin == "key-bytes"
    allowed = {"PATH", "LANG", "LC_ALL", "TZ", "EXTRA", "LC_CTYPE"}  # LC_CTYPE: Python's own
    assert set(names.split(",")) <= allowed and "EXTRA" in names and "PATH" in names


def test_program_env_has_a_path_even_when_the_agent_has_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PATH", raising=False)
    monkeypatch.setenv("HOME", "/root")
    env = program_env({"A": "b"})
    assert env["PATH"] and "HOME" not in env and env["A"] == "b"


async def test_a_failure_quotes_stderr_only_when_the_program_saw_no_secret() -> None:
    failing = [
        PY,
        "-c",
        "import sys; sys.stdin.read(); print('echoed secret', file=sys.stderr); sys.exit(3)",
    ]
    with pytest.raises(SinkError, match=r"^hook python[\d.]* exited with 3: echoed secret$"):
        await _run(failing)
    with pytest.raises(SinkError, match=r"^hook python[\d.]* exited with 3$") as info:
        await _run(failing, stdin=b"SECRET")
    assert "echoed" not in str(info.value)


async def test_stderr_is_bounded_and_stdout_discarded() -> None:
    code = (
        "import sys; sys.stdout.write('o' * 5_000_000); "
        "sys.stderr.write('e' * 5_000_000 + '\\nlast line\\n'); sys.exit(1)"
    )
    with pytest.raises(SinkError, match="exited with 1") as info:
        await _run([PY, "-c", code])
    assert "last line" not in str(info.value)  # only the first MAX_STDERR bytes are kept
    assert len(str(info.value)) < 400 and MAX_STDERR < 5_000_000


async def test_timeout_and_missing_program_are_sink_errors(tmp_path: Path) -> None:
    with pytest.raises(SinkError, match=r"^hook python[\d.]* timed out after 0\.2 s$"):
        await _run([PY, "-c", "import time; time.sleep(30)"], seconds=0.2)
    with pytest.raises(SinkError, match="^hook nope: cannot run: No such file or directory$"):
        await _run([str(tmp_path / "nope")])


async def test_a_program_that_ignores_its_input_is_judged_by_its_exit_status() -> None:
    await _run(["true"], stdin=os.urandom(1 << 20))
