"""Fixtures: real wireguard-go pairs in private namespaces, and sinks configured against them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qkdagent_wireguard.sink import WireGuardSink

from qkdagent import Link, PluginContext
from qkdagent.testing import build_component, require_binary, require_root
from qkdagent.testing.pytest_plugin import install_logging_guard

# The test beds (wg_testbed, wg_guestvm) live beside the tests, outside the shipped package.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from wg_testbed import Node, Pair, wait_for


def pytest_configure(config: pytest.Config) -> None:
    """Also when this directory runs alone (a conftest below the root cannot use
    `pytest_plugins`): no test leaves a logging handler on a closed stream."""
    install_logging_guard(config)


SinkFactory = Callable[..., WireGuardSink]


@pytest.fixture
def userspace_pair(tmp_path: Path) -> Iterator[Pair]:
    """Two namespaces with wireguard-go each, peered, each holding a different random PSK."""
    require_root()
    require_binary("wireguard-go", "wg", "ip", "ping")
    pair = Pair(tmp_path / "wg")
    try:
        pair.open(os.urandom(32), os.urandom(32))
        yield pair
    finally:
        pair.close()


@pytest.fixture
def make_sink(tmp_path: Path) -> SinkFactory:
    """Build a `wireguard` sink for `node`'s peer `peer` exactly as the config loader would; the
    sinks of one test belong to one agent (one context, so one stash)."""
    context = PluginContext("test", tmp_path)

    def make(
        node: Node, peer: Node, name: str = "wg", links: tuple[Link, ...] = (), **options: Any
    ) -> WireGuardSink:
        table = {"interface": node.iface, "peer_public_key": peer.public_text, **options}
        return build_component(WireGuardSink, table, name=name, context=context, links=links)

    return make


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Start `qkdagent-wireguard broker` subprocesses; each is stopped by PID at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str, socket: Path | None = None, timeout: float = 15) -> Path:
        sock = socket or tmp_path / f"broker-{len(procs)}.sock"
        log = open(tmp_path / f"broker-{len(procs)}.log", "wb")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qkdagent_wireguard.cli",
                "broker",
                "--socket",
                str(sock),
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        procs.append(proc)
        wait_for(lambda: sock.is_socket() or proc.poll() is not None, timeout, what="broker socket")
        assert proc.poll() is None, (tmp_path / f"broker-{len(procs) - 1}.log").read_text()
        return sock

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
