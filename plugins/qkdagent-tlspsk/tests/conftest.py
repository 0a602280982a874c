"""Fixtures: sink construction, free loopback ports, real consumer processes (by PID)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from qkdagent_tlspsk import TlsPskSink

from qkdagent.testing import build_component, free_port, require_binary
from qkdagent.testing.pytest_plugin import install_logging_guard


def pytest_configure(config: pytest.Config) -> None:
    """Also when this directory runs alone (a conftest below the root cannot use
    `pytest_plugins`): no test leaves a logging handler on a closed stream."""
    install_logging_guard(config)


def make_sink(tmp_path: Path, name: str = "psk", **options: Any) -> TlsPskSink:
    """alice's sink `name` built from `options` (not prepared)."""
    return build_component(TlsPskSink, options, name=name, state_dir=tmp_path / f"state-{name}")


def wait_listening(port: int, proc: subprocess.Popen[bytes], deadline: float = 10.0) -> None:
    """Poll (bounded) until something accepts on 127.0.0.1:port."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port} after {deadline} s")


def wait_pid_file(path: Path, deadline: float = 5.0) -> int:
    """Poll (bounded) until `path` holds a pid; return it."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            text = ""
        if text.isdigit():
            return int(text)
        time.sleep(0.01)
    raise RuntimeError(f"no pid in {path} after {deadline} s")


@dataclass
class Stunnel:
    conf: Path
    pid_file: Path
    log: Path
    psk: Path
    port: int
    proc: subprocess.Popen[bytes]


class Processes:
    """Starts processes and kills exactly those (by PID) at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def processes() -> Iterator[Processes]:
    procs = Processes()
    yield procs
    procs.stop_all()


@pytest.fixture
def stunnel_bin() -> str:
    return require_binary("stunnel4")["stunnel4"]


def stunnel_tls_lines(tls: str) -> str:
    if tls == "1.3":
        suites = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256"
        return f"sslVersionMin = TLSv1.3\nciphersuites = {suites}\n"
    return "sslVersionMax = TLSv1.2\nciphers = PSK\n"


@pytest.fixture
def start_stunnel(tmp_path: Path, processes: Processes, stunnel_bin: str) -> Callable[..., Stunnel]:
    """Start stunnel in the foreground; the caller provides a PSK file that already exists."""

    def start(
        name: str, *, client: bool, accept: int, connect: int, tls: str, psk: Path
    ) -> Stunnel:
        conf = tmp_path / f"{name}.conf"
        pid_file = tmp_path / f"{name}.pid"
        log = tmp_path / f"{name}.log"
        conf.write_text(
            "foreground = yes\n"
            f"pid = {pid_file}\n"
            f"output = {log}\n"
            "debug = info\n"
            f"[{name}]\n"
            f"client = {'yes' if client else 'no'}\n"
            f"accept = 127.0.0.1:{accept}\n"
            f"connect = 127.0.0.1:{connect}\n"
            f"{stunnel_tls_lines(tls)}"
            f"PSKsecrets = {psk}\n"
        )
        proc = processes.start([stunnel_bin, str(conf)], tmp_path / f"{name}.stderr")
        wait_listening(accept, proc)
        assert wait_pid_file(pid_file) == proc.pid  # written after binding
        return Stunnel(conf, pid_file, log, psk, accept, proc)

    return start


async def echo_server(
    port: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    async def handle(stream: trio.SocketStream) -> None:
        try:
            async for data in stream:
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    task_status.started()
    await trio.serve_listeners(handle, listeners)


async def echo_roundtrip(port: int, payload: bytes, timeout: float = 5.0) -> bytes:  # noqa: ASYNC109
    """Send `payload` to 127.0.0.1:port and read the same number of bytes back ("" on failure)."""
    got = b""
    with trio.move_on_after(timeout):
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            return b""
        async with stream:
            try:
                await stream.send_all(payload)
                while len(got) < len(payload):
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    got += chunk
            except trio.BrokenResourceError:  # reset by stunnel (refused key, reload)
                pass
    return got


async def echo_eventually(port: int, payload: bytes, within: float = 5.0) -> bool:
    """True once a round trip succeeds within `within` s: a stunnel that has just confirmed its
    reload in the log may still be re-binding its listener (new connects are refused briefly)."""
    deadline = trio.current_time() + within
    while trio.current_time() < deadline:
        if (
            await echo_roundtrip(port, payload, timeout=max(deadline - trio.current_time(), 0.1))
            == payload
        ):
            return True
        await trio.sleep(0.02)
    return False


async def openssl_client(port: int, identity: str, key: bytes, tls: str) -> bool:
    """`openssl s_client` PSK handshake (test-only: the key is on this test's argv)."""
    binary = require_binary("openssl")["openssl"]
    argv = [
        binary,
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-psk_identity",
        identity,
        "-psk",
        key.hex(),
        "-brief",
        "-no_ign_eof",
    ]
    argv += ["-tls1_3"] if tls == "1.3" else ["-tls1_2", "-cipher", "PSK"]
    with trio.fail_after(10):
        result = await trio.run_process(
            argv, stdin=b"Q\n", capture_stdout=True, capture_stderr=True, check=False
        )
    out = (result.stdout + result.stderr).decode("utf-8", "replace")
    return "CONNECTION ESTABLISHED" in out and result.returncode == 0


def file_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


@pytest.fixture
def h() -> Any:
    """The helpers above, for test modules (conftest is not importable under importlib mode)."""
    import types

    return types.SimpleNamespace(
        free_port=free_port,
        make_sink=make_sink,
        echo_server=echo_server,
        echo_roundtrip=echo_roundtrip,
        echo_eventually=echo_eventually,
        openssl_client=openssl_client,
        file_mode=file_mode,
        wait_listening=wait_listening,
        wait_pid_file=wait_pid_file,
    )
