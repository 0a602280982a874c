"""The command line: demo, plugins, status table, gen-bootstrap, plugin commands."""

from __future__ import annotations

import base64
import http.server
import json
import logging
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from qkdagent.cli import format_status, main
from qkdagent.testing import AgentPair, config_toml, pair_configs


def test_demo_runs_and_never_prints_a_secret(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qkdagent",
            "demo",
            "--rotations",
            "3",
            "--interval",
            "0.2",
            "--source",
            "memory",
            "--dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch")]
    assert len(lines) == 3 and all(line.endswith("match") for line in lines)
    assert "MISMATCH" not in result.stdout
    secret = (tmp_path / "alice" / "bob.key").read_bytes()
    assert secret == (tmp_path / "bob" / "alice.key").read_bytes()
    raw = base64.b64decode(secret)
    for text in (result.stdout, result.stderr):
        assert secret.decode() not in text and raw.hex() not in text


def test_plugins_lists_without_importing(capsys: pytest.CaptureFixture[str]) -> None:
    before = set(sys.modules)
    assert main(["plugins", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert {"file", "exec", "memory"} <= set(rows)
    assert rows["file"]["distribution"] == "qkdagent"
    assert not {m for m in set(sys.modules) - before if m.startswith("qkdagent_")}


def test_gen_bootstrap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "link.bootstrap"
    assert main(["gen-bootstrap", str(path)]) == 0
    assert len(base64.b64decode(path.read_bytes())) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_bytes()
    assert main(["gen-bootstrap", str(path)]) == 1  # no silent overwrite
    assert path.read_bytes() == first
    assert main(["gen-bootstrap", "--force", str(path)]) == 0 and path.read_bytes() != first
    assert base64.b64decode(first).hex() not in capsys.readouterr().out


async def test_status_table(agent_pair: AgentPair) -> None:
    await agent_pair.wait_for_epoch(1)
    url = f"http://{agent_pair.configs['bob']['agent']['status_listen']}/status"
    async with httpx.AsyncClient() as http:
        data = (await http.get(url)).json()
    table = format_status(data)
    header, row = table.splitlines()[1:3]
    assert header.split()[:4] == ["LINK", "PEER", "ROLE", "EPOCH"]
    assert row.split()[:4] == ["alice-bob", "alice", "responder", "1"]
    code = await trio.to_thread.run_sync(main, ["status", "--url", url.rsplit("/", 1)[0]])
    assert code == 0


def test_status_of_a_stopped_agent_fails_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--url", "http://127.0.0.1:9"]) == 1
    assert "cannot read status" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["status", "--url", "http://[::1"], "invalid --url"),
        (["gen-bootstrap", "/nonexistent-dir-qkdagent/x.bootstrap"], "cannot write"),
    ],
)
def test_bad_cli_input_is_a_clear_error_not_a_traceback(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_command_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2


def test_demo_and_simulated_sources_work_without_pytest_or_the_test_kit() -> None:
    code = (
        "import sys; sys.modules['pytest'] = None; sys.modules['qkdagent.testing'] = None\n"
        "import qkdagent.demo, qkdagent.builtin.memory, qkdagent.agent, qkdagent.cli\n"
        "from qkdagent.builtin.loopback import pair_configs\n"
        "from qkdagent.builtin.memory import MemorySource\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize(
    ("sink", "shown", "hidden"),
    [
        ({"prepare_error": "no such device"}, "agent stopped: sink 'bad': recording sink", None),
        ({"prepare_bug": "psk=0123abcd"}, "agent stopped: unexpected RuntimeError at", "0123abcd"),
    ],
)
def test_run_reports_a_failed_start_in_one_line_not_a_traceback(
    tmp_path: Path, sink: dict[str, str], shown: str, hidden: str | None
) -> None:
    config = pair_configs(tmp_path, alice={"sinks": {"bad": {"type": "recording", **sink}}})
    path = tmp_path / "alice.toml"
    path.write_text(config_toml(config["alice"]))
    result = subprocess.run(
        [sys.executable, "-m", "qkdagent", "run", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert shown in result.stderr
    assert "Traceback" not in result.stderr and "ExceptionGroup" not in result.stderr
    if hidden is not None:
        assert hidden not in result.stderr


def _alice_file(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    config = pair_configs(
        tmp_path, alice={"sinks": {"psk": {"type": "file", "path": str(tmp_path / "psk")}}}
    )
    path = tmp_path / "alice.toml"
    path.write_text(config_toml(config["alice"]))
    return path, config["alice"]


@pytest.mark.parametrize("key", ["listen", "status_listen"])
def test_run_with_a_port_in_use_names_the_key_in_one_line(tmp_path: Path, key: str) -> None:
    path, config = _alice_file(tmp_path)
    host, port = config["agent"][key].rsplit(":", 1)
    with socket.socket() as busy:
        busy.bind((host, int(port)))
        busy.listen()
        result = subprocess.run(
            [sys.executable, "-m", "qkdagent", "run", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert f"agent.{key}: {host}:{port} is already in use" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_port_taken_after_the_check_still_exits_2_naming_the_listeners(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A program that takes the port between the check and the bind (a race): the OSError
    arrives grouped from the agent's nurseries, and is still one line and exit 2."""
    import qkdagent.validate

    path, config = _alice_file(tmp_path)
    monkeypatch.setattr(qkdagent.validate, "check_listeners", lambda config: None)
    host, port = config["agent"]["listen"].rsplit(":", 1)
    try:
        with socket.socket() as busy:
            busy.bind((host, int(port)))
            busy.listen()
            assert main(["run", "-c", str(path)]) == 2
    finally:
        logging.getLogger().handlers.clear()
    err = capsys.readouterr().err
    assert (
        "agent stopped: agent.listen or agent.status_listen: the address is already in use" in err
    )
    assert "Traceback" not in err and "ExceptionGroup" not in err


@pytest.mark.parametrize(
    "url",
    ["foo", "http://", "ftp://127.0.0.1", "http://127.0.0.1:99999", "http://a b", "http://h\n"],
)
def test_status_with_a_bad_url_is_a_usage_error(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--url", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkdagent: invalid --url") and len(err.strip().splitlines()) == 1


def test_status_of_something_else_is_one_line_not_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"links": [{"link": 1}]}' if self.path == "/status" else b"[]"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert main(["status", "--url", url]) == 1
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert "did not answer with a qkdagent status" in err and "Traceback" not in err


def test_status_table_escapes_text_from_elsewhere() -> None:
    """A peer's error text reaches the table through last_error: it cannot move the cursor,
    clear the screen or add a line."""
    link = {
        "link": "alice-bob",
        "peer": "bob",
        "role": "initiator",
        "epoch": 3,
        "last_error": "peer said\x1b[2J\nalice-bob  forged  responder  9",
    }
    table = format_status({"agent": "alice\x1b]0;x\x07", "version": "1", "links": [link]})
    assert "\x1b" not in table and "\x07" not in table
    assert len(table.splitlines()) == 3 and "\\x1b[2J\\nalice-bob" in table


def test_status_says_when_an_erase_failed() -> None:
    link = {
        "link": "alice-bob",
        "peer": "bob",
        "role": "responder",
        "epoch": 4,
        "erased": "reject_after",
        "erase_failed": ["wg0"],
    }
    table = format_status({"agent": "alice", "version": "1", "links": [link]})
    assert "ERASE FAILED, retrying (wg0)" in table and "ERASED" not in table


@pytest.mark.parametrize("text", [" 1", "1 ", "1_0", "\u0663", "+1", "-1", "0", "1e3", "9" * 10])
def test_demo_rotations_must_be_plain_digits(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A flag's number is ASCII digits: what `int` also reads (spaces, `_`, other scripts'
    digits, a sign) is refused with the flag named, before anything runs."""
    with pytest.raises(SystemExit) as info:
        main(["demo", "--rotations", text])
    assert info.value.code == 2
    assert "--rotations: " in capsys.readouterr().err


@pytest.mark.parametrize("text", [" 1", "1_0.5", "nan", "inf", "1e3", "0", "0.0", "-2", ".5"])
def test_demo_interval_must_be_a_plain_positive_decimal(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--interval", text])
    assert info.value.code == 2
    assert "--interval: " in capsys.readouterr().err


def test_demo_number_flags_take_plain_decimals() -> None:
    from qkdagent.cli import _positive_float, _positive_int

    assert _positive_int("12") == 12 and _positive_float("0.25") == 0.25
    assert _positive_float("3") == 3.0
