"""SoftHSM2 tokens on tmpfs for the real-token tests.

One SoftHSM config per pytest process (the module reads SOFTHSM2_CONF once, at C_Initialize);
every test gets fresh tokens with unique labels, deleted afterwards. Tokens created after the
module was initialised are found because the sink re-initialises the module when it has no open
session and the token is missing; every sink is closed at teardown so that holds.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qkdagent_hsm import Pkcs11Sink

from qkdagent import PluginContext
from qkdagent.testing import build_component, require_binary
from qkdagent.testing.pytest_plugin import install_logging_guard

# The test bed (softhsm_paths) lives beside the tests, outside the shipped package.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import softhsm_paths


def pytest_configure(config: pytest.Config) -> None:
    """Also when this directory runs alone (a conftest below the root cannot use
    `pytest_plugins`): no test leaves a logging handler on a closed stream."""
    install_logging_guard(config)


SO_PIN = "so-" + "5678"


@dataclass
class SoftHsm:
    root: Path
    conf: Path
    module: str
    util: str


@dataclass(frozen=True)
class TestToken:
    label: str
    pin: str
    pin_file: Path
    serial: str


def _serial(softhsm: SoftHsm, label: str, env: dict[str, str]) -> str:
    """The token's serial number, as `softhsm2-util --show-slots` lists it."""
    shown = subprocess.run(
        [softhsm.util, "--show-slots"], check=True, capture_output=True, env=env, timeout=30
    ).stdout.decode()
    serial = ""
    for line in shown.splitlines():
        name, _, value = line.strip().partition(":")
        if name == "Serial number":
            serial = value.strip()
        elif name == "Label" and value.strip() == label:
            return serial
    raise AssertionError(f"softhsm2-util does not list token {label!r}")


@pytest.fixture(scope="session")
def softhsm() -> Iterator[SoftHsm]:
    util = require_binary("softhsm2-util")["softhsm2-util"]
    module = softhsm_paths.find_module()
    if module is None:
        from qkdagent.testing import missing

        missing("libsofthsm2.so is not installed (Debian package softhsm2)")
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="qkdagent-hsm-", dir=base))
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        yield SoftHsm(root, conf, module, util)
    finally:
        if old is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = old
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def make_token(softhsm: SoftHsm, tmp_path: Path) -> Iterator[Callable[[], TestToken]]:
    """Initialise fresh tokens (unique labels); each is deleted when the test ends."""
    made: list[str] = []

    def make() -> TestToken:
        label = f"qa-{secrets.token_hex(4)}"
        pin = secrets.token_hex(6)
        env = {**os.environ, "SOFTHSM2_CONF": str(softhsm.conf)}
        # softhsm2-util takes PINs only on argv or a TTY; these are throw-away test PINs.
        argv = [softhsm.util, "--init-token", "--free", "--label", label]
        argv += ["--so-pin", SO_PIN, "--pin", pin]
        subprocess.run(
            argv,
            check=True,
            capture_output=True,
            env=env,
            timeout=30,
        )
        made.append(label)
        pin_file = tmp_path / f"{label}.pin"
        pin_file.write_text(pin + "\n")
        pin_file.chmod(0o600)
        return TestToken(label, pin, pin_file, _serial(softhsm, label, env))

    yield make
    env = {**os.environ, "SOFTHSM2_CONF": str(softhsm.conf)}
    for label in made:
        subprocess.run(
            [softhsm.util, "--delete-token", "--token", label],
            capture_output=True,
            env=env,
            timeout=30,
        )


@pytest.fixture
def token_table(softhsm: SoftHsm) -> Callable[..., dict[str, Any]]:
    """`token_table(tok, **extra)` -> a `[sinks.NAME]` table for a sink on test token `tok`."""

    def table(tok: TestToken, **extra: Any) -> dict[str, Any]:
        # A test selecting the token by URI gives `uri` (module-path included) instead.
        where = {} if "uri" in extra else {"token": tok.label, "module": softhsm.module}
        return {**where, "pin": {"file": str(tok.pin_file)}, **extra}

    return table


@pytest.fixture
async def sink_factory(
    token_table: Callable[..., dict[str, Any]], tmp_path: Path
) -> AsyncIterator[Callable[..., Pkcs11Sink]]:
    """Build (unprepared) sinks on a test token; every one is closed at teardown. Sinks with
    the same `agent` belong to one agent (one context, so one stash: worker and sessions)."""
    sinks: list[Pkcs11Sink] = []
    contexts: dict[str, PluginContext] = {}

    def build(
        tok: TestToken, *, name: str = "hsm", agent: str = "alice", **extra: Any
    ) -> Pkcs11Sink:
        context = contexts.setdefault(agent, PluginContext(agent_name=agent, state_dir=tmp_path))
        sink = build_component(Pkcs11Sink, token_table(tok, **extra), name=name, context=context)
        sinks.append(sink)
        return sink

    try:
        yield build
    finally:
        for sink in sinks:
            await sink.aclose()
