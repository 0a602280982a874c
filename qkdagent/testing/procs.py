"""Agents as real processes (`python -m qkdagent run`), for signal and crash-injection tests.

Public so plugins can crash their own agents at `qkdagent.faults` points (`QKDAGENT_CRASH_AT`)
and check that both sides converge after a restart with the same state directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from ..builtin.loopback import pair_configs
from .toml import config_toml


def process_pair(directory: Path, link: dict[str, Any] | None = None) -> dict[str, Path]:
    """Config files for alice and bob with a shared key directory and file sinks."""
    keys = directory / "keys"
    sides = {
        name: {
            "sources": {"sim": {"type": "keydir", "directory": str(keys)}},
            "sinks": {"psk": {"type": "file", "path": str(directory / f"{name}.psk")}},
        }
        for name in ("alice", "bob")
    }
    configs = pair_configs(directory, alice=sides["alice"], bob=sides["bob"], link=link)
    paths = {}
    for name, config in configs.items():
        path = directory / f"{name}.toml"
        path.write_text(config_toml(config))
        paths[name] = path
    return paths


class AgentProcess:
    """`qkdagent run -c CONFIG`, its stderr appended to `log`; `env` adds variables (such as
    `QKDAGENT_CRASH_AT`), `preexec` runs in the child before exec (resource limits)."""

    def __init__(
        self,
        config: Path,
        log: Path,
        env: dict[str, str] | None = None,
        *,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.log = log
        with open(log, "ab") as stderr:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "qkdagent", "run", "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={**os.environ, **(env or {})},
                preexec_fn=preexec,
            )
        data = tomllib.loads(config.read_text())
        self.status_url = f"http://{data['agent']['status_listen']}/status"
        self.status_timeout = 10.0
        """Seconds a /status read may take (10,000 links make a document of megabytes)."""
        self.peer_port = int(data["agent"]["listen"].rsplit(":", 1)[1])

    def status(self) -> dict[str, Any] | None:
        try:
            return httpx.get(self.status_url, timeout=self.status_timeout).json()
        except (httpx.HTTPError, ValueError):
            return None

    def epochs(self) -> dict[str, int]:
        """Link -> epoch from /status ({} while it does not answer); a dead agent fails the
        test at once, with the end of its log, instead of a poll running into its timeout."""
        code = self.proc.poll()
        if code is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise AssertionError(f"agent {self.config.name} exited with {code}:\n{tail}")
        status = self.status()
        return {} if status is None else {x["link"]: x["epoch"] for x in status["links"]}

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    """Poll an external process's state with a bounded deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
