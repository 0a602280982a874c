"""The admin hooks in hooks/, driven through the exec sink against real programs."""

from __future__ import annotations

import base64
import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from qkdagent import KeyMeta, Link, PluginContext, Secret
from qkdagent.builtin.exec_sink import ExecSink
from qkdagent.errors import SinkError
from qkdagent.options import Options
from qkdagent.testing import require_binary, require_root

HOOKS = Path(__file__).resolve().parent.parent / "hooks"
LINK = Link("alice-bob", "alice", "bob", True)
META = KeyMeta(1, ("id-1",), "exec", 0.0)


def _sink(tmp_path: Path, command: list[str], fmt: str) -> ExecSink:
    opts = Options({"command": command, "format": fmt}, where="sinks.hook")
    sink = ExecSink("hook", opts, PluginContext("alice", tmp_path))
    opts.finish()
    return sink


@pytest.fixture
def wg_iface():
    """A real wireguard-go interface with one peer, in the root namespace (unique name)."""
    require_root()
    tools = require_binary("wireguard-go", "wg", "ip")
    name = f"wgh{secrets.token_hex(3)}"
    proc = subprocess.Popen(
        [tools["wireguard-go"], "-f", name],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "WG_PROCESS_FOREGROUND": "1"},
    )
    try:
        deadline = time.monotonic() + 10
        while not Path(f"/run/wireguard/{name}.sock").exists():
            assert time.monotonic() < deadline, "wireguard-go did not start"
            assert proc.poll() is None, "wireguard-go exited"
            time.sleep(0.02)
        peer = subprocess.run(
            [tools["wg"], "genkey"], capture_output=True, check=True, text=True
        ).stdout.strip()
        pub = subprocess.run(
            [tools["wg"], "pubkey"], input=peer, capture_output=True, check=True, text=True
        ).stdout.strip()
        subprocess.run([tools["wg"], "set", name, "peer", pub], check=True)
        yield name, pub
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def _preshared_keys(iface: str) -> list[str]:
    result = await trio.run_process(["wg", "show", iface, "preshared-keys"], capture_stdout=True)
    return result.stdout.decode().split()


async def test_wg_set_psk_hook_with_real_wireguard_go(tmp_path: Path, wg_iface) -> None:
    name, pub = wg_iface
    sink = _sink(tmp_path, [str(HOOKS / "wg-set-psk"), name, pub], "base64")
    await sink.prepare()
    secret = Secret(os.urandom(32))
    await sink.install(LINK, secret, META)
    shown = await _preshared_keys(name)
    assert shown == [pub, base64.b64encode(secret.reveal()).decode()]
    await sink.erase(LINK, "test")
    after = await _preshared_keys(name)
    assert after[1] not in (base64.b64encode(secret.reveal()).decode(), "(none)")
    unknown = _sink(tmp_path, [str(HOOKS / "wg-set-psk"), name, "A" * 43 + "="], "base64")
    with pytest.raises(SinkError, match="exited with 65"):
        await unknown.install(LINK, secret, META)


@pytest.fixture
def hup_target(tmp_path: Path):
    """A process that counts SIGHUPs into a file, standing in for stunnel's reload."""
    marker = tmp_path / "hups"
    code = (
        "import signal, sys, time\n"
        "n = 0\n"
        "def hup(*_):\n"
        "    global n; n += 1; open(sys.argv[1], 'w').write(str(n))\n"
        "signal.signal(signal.SIGHUP, hup)\n"
        "open(sys.argv[1], 'w').write('0')\n"
        "while True: time.sleep(1)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(marker)])
    deadline = time.monotonic() + 10
    while not marker.exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    pidfile = tmp_path / "stunnel.pid"
    pidfile.write_text(f"{proc.pid}\n")
    yield pidfile, marker
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)


async def test_stunnel_psk_hook_writes_and_signals(tmp_path: Path, hup_target) -> None:
    pidfile, marker = hup_target
    psk = tmp_path / "psk.txt"
    sink = _sink(tmp_path, [str(HOOKS / "stunnel-psk"), str(psk), "alice-bob", str(pidfile)], "hex")
    secret = Secret(os.urandom(32))
    await sink.install(LINK, secret, META)
    assert psk.read_text() == f"alice-bob:{secret.reveal().hex()}\n"
    assert stat.S_IMODE(psk.stat().st_mode) == 0o600
    deadline = time.monotonic() + 5
    while marker.read_text() != "1":
        assert time.monotonic() < deadline, "no SIGHUP arrived"
        await trio.sleep(0.02)
    bad = _sink(tmp_path, [str(HOOKS / "stunnel-psk"), str(psk), "bad:id", str(pidfile)], "hex")
    with pytest.raises(SinkError, match="exited with 65"):
        await bad.install(LINK, Secret(os.urandom(32)), META)
    assert psk.read_text() == f"alice-bob:{secret.reveal().hex()}\n"  # unchanged


async def test_write_and_reload_hook(tmp_path: Path) -> None:
    target = tmp_path / "app.psk"
    sink = _sink(tmp_path, [str(HOOKS / "write-and-reload"), str(target)], "raw")
    secret = Secret(os.urandom(48))
    await sink.install(LINK, secret, META)
    assert target.read_bytes() == secret.reveal()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_every_hook_has_a_usage_header() -> None:
    for hook in HOOKS.iterdir():
        if hook.name == "README.md":
            continue
        text = hook.read_text()
        assert os.access(hook, os.X_OK), hook.name
        assert f"# {hook.name} " in text and "Config:" in text, hook.name
        assert hook.name in (HOOKS / "README.md").read_text()
