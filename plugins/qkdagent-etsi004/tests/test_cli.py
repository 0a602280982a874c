"""`qkdagent qkdm-sim`: `--supply` (a supply from another plugin's entry point), usage errors as
one line and exit 2, and `--ready-file` (written once every module listens, saying what a client
needs) with the simulator as its own process."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from qkdagent_etsi004 import cli, codec
from qkdagent_etsi004.sim import SimSettings, make_pki, open_simulator
from qkdagent_etsi004.source import Etsi004Source
from qkdagent_etsi004.transport import Endpoint, ModuleConnection

from qkdagent import Link, file_stem
from qkdagent.testing import build_component, encrypted_key_copy, running

ALICE = Link("l", "alice", "bob", True)
BOB = Link("l", "bob", "alice", False)


class ConstSupply:
    """A stand-in engine: unlimited bits, every byte `fill` (so its keys are recognisable)."""

    def __init__(self, fill: int) -> None:
        self.fill = fill
        self.taken = 0

    def available_bits(self) -> int:
        return 1 << 30

    def take(self, bits: int) -> bytes:
        self.taken += bits
        return bytes([self.fill]) * (bits // 8)


class FakeEntryPoint:
    def __init__(self, name: str, load: Any) -> None:
        self.name = name
        self._load = load

    def load(self) -> Any:
        return self._load()


MADE: dict[tuple[str, str], ConstSupply] = {}


def make_const(options: dict[str, str]) -> Any:
    fill = int(options.get("fill", "1"))  # ValueError: a bad option
    if not 1 <= fill <= 255:
        raise ValueError(f"fill {fill} is not 1..255")

    def factory(a: str, b: str) -> ConstSupply:
        return MADE.setdefault((a, b), ConstSupply(fill))

    return factory


def make_failing(options: dict[str, str]) -> Any:
    def factory(a: str, b: str) -> ConstSupply:
        raise RuntimeError("engine cannot start")

    return factory


def broken_import() -> Any:
    raise ImportError("No module named 'qkdagent_nonesuch'")


@pytest.fixture
def fake_supplies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed supplies as qkdagent.keysupply sees them: const, failing, broken."""
    installed = [
        FakeEntryPoint("const", lambda: make_const),
        FakeEntryPoint("failing", lambda: make_failing),
        FakeEntryPoint("broken", broken_import),
    ]

    def entry_points(*, group: str) -> list[FakeEntryPoint]:
        assert group == "qkdagent.supplies"
        return installed

    # the name load_supply_factory looks entry points up with (the module is not public API)
    monkeypatch.setattr("qkdagent.keysupply.entry_points", entry_points)
    MADE.clear()


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    return parser.parse_args(list(argv))


async def test_supply_from_an_entry_point_backs_the_module_pair(
    fake_supplies: None, tmp_path: Path
) -> None:
    settings = cli.settings_from(parse("--supply", "const:fill=7"))
    assert list(MADE) == [("QKDM_A", "QKDM_B")]  # made before anything listens, names sorted
    async with open_simulator(tmp_path / "pki", settings) as sim:
        made = {
            app: build_component(
                Etsi004Source, sim.source_table(app), links=(link,), agent=app, state_dir=tmp_path
            )
            for app, link in (("alice", ALICE), ("bob", BOB))
        }
        async with running(*made.values()):
            key = await made["alice"].new_key(ALICE)
            same = await made["bob"].key_by_id(BOB, key.key_id)
    assert key.value.reveal() == bytes([7]) * 32 and same.value == key.value
    assert MADE[("QKDM_A", "QKDM_B")].taken == 256


def test_csprng_is_the_default_and_has_no_options(fake_supplies: None) -> None:
    assert cli.settings_from(parse()).supply_factory is None
    assert cli.settings_from(parse("--supply", "csprng")).supply_factory is None
    assert cli.settings_from(parse("--rate", "5")).rate_bps == 5.0


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        ("Const", "supply name 'Const'"),
        ("const:fill", "'fill' is not KEY=VALUE"),
        ("nonesuch", "no key supply 'nonesuch' is installed (installed: broken, const, failing"),
        ("const:fill=x", "--supply const: invalid literal for int()"),
        ("const:fill=0", "--supply const: fill 0 is not 1..255"),
        ("broken", "--supply broken: cannot load it (ImportError: No module named"),
        ("failing", "no supply for link QKDM_A-QKDM_B (RuntimeError: engine cannot start)"),
        ("csprng:rate=1", "supply 'csprng' takes no options"),
    ],
)
def test_a_bad_supply_is_one_line_and_exit_2(
    fake_supplies: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: str, text: str
) -> None:
    assert cli.run(parse("--pki", str(tmp_path / "pki"), "--supply", spec)) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkdm-sim: ") and err.count("\n") == 1, err
    assert text in err and "Traceback" not in err
    assert not (tmp_path / "pki").exists()  # refused before anything was made


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["--module", "M1=a", "--module", "M1=b"], "a module ID is given twice"),
        (["--module", "M1=a", "--module", "M2=a"], "application 'a' is on M1 and M2"),
        (["--module", "M1=a", "--module", "M2=b", "--module", "M3=c"], "in pairs"),
        (["--port", "70000"], "--port or --rate out of range"),
    ],
)
def test_bad_settings_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], text: str
) -> None:
    assert cli.run(parse("--pki", str(tmp_path), *argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and text in err, err


async def test_no_ready_file_when_a_module_cannot_listen(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = SimSettings(ports={"QKDM_A": 0, "QKDM_B": taken.getsockname()[1]})
        with pytest.raises(BaseExceptionGroup) as failed:
            await cli._serve(tmp_path / "pki", settings, ready)
    assert cli._expected(failed.value) is not None  # the CLI turns it into one line, exit 2
    assert not ready.exists() and not Path(f"{ready}.tmp").exists()


def fake_supply_distribution(root: Path) -> Path:
    """A tiny installed distribution offering supply `const` (entry point, as a plugin would)."""
    root.mkdir()
    (root / "fake_supply.py").write_text(
        "class Const:\n"
        "    def available_bits(self):\n        return 1 << 30\n"
        "    def take(self, bits):\n        return bytes([9]) * (bits // 8)\n"
        "def make(options):\n    return lambda a, b: Const()\n"
    )
    info = root / "fake_supply-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-supply\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[qkdagent.supplies]\nconst = fake_supply:make\n")
    return root


async def test_process_ready_file_and_supply(tmp_path: Path) -> None:
    """`qkdagent qkdm-sim` as its own process: the ready file appears once every module listens
    (its addresses accept a TLS connection at once), names what clients need, and keys come from
    the `--supply` an installed distribution offers."""
    site = fake_supply_distribution(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    ready, log, pki = tmp_path / "ready.json", tmp_path / "out.txt", tmp_path / "pki"
    argv = [sys.executable, "-m", "qkdagent", "qkdm-sim", "--pki", str(pki),
            "--ready-file", str(ready), "--supply", "const"]  # fmt: skip
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env
        )
    try:
        with trio.fail_after(30):
            while not ready.exists():
                assert process.poll() is None, log.read_text()
                await trio.sleep(0.05)
        modules = {m["module_id"]: m for m in json.loads(ready.read_text())}
        assert set(modules) == {"QKDM_A", "QKDM_B"} and modules["QKDM_A"]["peer"] == "QKDM_B"
        for module in modules.values():
            assert module["dialects"] == ["binary-v1", "binary-v2"]
            assert Path(module["ca"]).is_file()
            for creds in module["credentials"].values():
                assert Path(creds["cert"]).is_file() and Path(creds["key"]).is_file()
            host, _, port = module["address"].rpartition(":")
            conn = await ModuleConnection.connect(  # first try: it listened before the file
                Endpoint(host, int(port), host),
                _client_context(module, module["applications"][0]),
                codec.Dialect.V2,
            )
            await conn.aclose()
        tables = {
            app: {
                "type": "etsi004",
                "module": m["address"],
                "module_id": m["module_id"],
                "ca": m["ca"],
                **m["credentials"][app],
            }
            for m in modules.values()
            for app in m["applications"]
        }
        made = {
            app: build_component(Etsi004Source, tables[app], links=(link,), agent=app)
            for app, link in (("alice", ALICE), ("bob", BOB))
        }
        async with running(*made.values()):
            key = await made["alice"].new_key(ALICE)
            same = await made["bob"].key_by_id(BOB, key.key_id)
        assert key.value.reveal() == bytes([9]) * 32 and same.value == key.value
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await process.wait()
    text = log.read_text()
    assert process.returncode == 0, text
    assert "connection from application 'alice'" in text  # one line per connection event


def _client_context(module: dict[str, Any], app: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=module["ca"])
    context.load_cert_chain(module["credentials"][app]["cert"], module["credentials"][app]["key"])
    return context


@pytest.mark.parametrize("damage", ["garbage", "encrypted"])
def test_an_unusable_module_key_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    """A module key that does not load, or is encrypted (never prompted for): exit 2."""
    pki = make_pki(tmp_path / "pki")
    key = pki / f"{file_stem('QKDM_A')}.key"
    if damage == "garbage":
        key.write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    else:
        encrypted_key_copy(key, key)
    assert cli.run(parse("--pki", str(pki))) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkdm-sim: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert ("is encrypted" in err) == (damage == "encrypted"), err
