"""`kme-sim --supply NAME[:KEY=VALUE,...]`: a supply from another plugin's entry point backs every
KME link (made before anything listens), a bad spec is one line and exit 2, and the CSPRNG
supply of `--rate`/`--initial-fill` stays the default."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from qkdagent_etsi014.__main__ import main
from qkdagent_etsi014.cli import configure, settings_from
from qkdagent_etsi014.sim import open_simulator

from .conftest import tls_context


class ConstSupply:
    """A stand-in engine: every byte `fill`, a fixed store (so its keys are recognisable)."""

    def __init__(self, fill: int) -> None:
        self.fill = fill
        self.stored = 64 * 256
        self.taken = 0

    def available_bits(self) -> int:
        return self.stored

    def take(self, bits: int) -> bytes:
        self.stored -= bits
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
    fill = int(options.get("fill", "1"))
    if not 1 <= fill <= 255:
        raise ValueError(f"fill {fill} is not 1..255")
    return lambda a, b: MADE.setdefault((a, b), ConstSupply(fill))


def make_failing(options: dict[str, str]) -> Any:
    def factory(a: str, b: str) -> ConstSupply:
        raise RuntimeError("engine cannot start")

    return factory


def broken_import() -> Any:
    raise ImportError("No module named 'qkdagent_nonesuch'")


@pytest.fixture
def fake_supplies(monkeypatch: pytest.MonkeyPatch) -> None:
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
    configure(parser)
    return parser.parse_args(list(argv))


async def test_supply_from_an_entry_point_backs_every_link(
    fake_supplies: None, tmp_path: Path
) -> None:
    args = parse("--kme", "KME_B=bob", "--kme", "KME_A=alice", "--supply", "const:fill=5")
    settings = settings_from(args)
    # every pair made before anything listens, names sorted, a KME with itself too
    assert sorted(MADE) == [("KME_A", "KME_A"), ("KME_A", "KME_B"), ("KME_B", "KME_B")]
    pki = tmp_path / "pki"
    async with open_simulator(pki, settings) as sim:
        alice = httpx.AsyncClient(base_url=sim.urls["KME_A"], verify=tls_context(pki, "alice"))
        bob = httpx.AsyncClient(base_url=sim.urls["KME_B"], verify=tls_context(pki, "bob"))
        async with alice, bob:
            status = await alice.get("/api/v1/keys/bob/status")
            enc = await alice.get("/api/v1/keys/bob/enc_keys", params={"number": 2})
            ids = [{"key_ID": k["key_ID"]} for k in enc.json()["keys"]]
            dec = await bob.post("/api/v1/keys/alice/dec_keys", json={"key_IDs": ids})
    assert status.json()["stored_key_count"] == 64
    assert dec.json() == enc.json()
    keys = [k["key"] for k in enc.json()["keys"]]
    assert keys == ["BQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQU="] * 2  # 32 bytes of 0x05
    assert MADE[("KME_A", "KME_B")].taken == 512 and MADE[("KME_A", "KME_A")].taken == 0


def test_csprng_is_the_default_and_has_no_options(fake_supplies: None) -> None:
    assert settings_from(parse()).supply_factory is None
    assert settings_from(parse("--supply", "csprng")).supply_factory is None
    assert not MADE


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        ("Const", "supply name 'Const'"),
        ("const:fill", "'fill' is not KEY=VALUE"),
        ("nonesuch", "no key supply 'nonesuch' is installed (installed: broken, const, failing"),
        ("const:fill=0", "--supply const: fill 0 is not 1..255"),
        ("broken", "--supply broken: cannot load it (ImportError: No module named"),
        ("failing", "no supply for link KME_A-KME_A (RuntimeError: engine cannot start)"),
        ("csprng:rate=1", "supply 'csprng' takes no options"),
    ],
)
def test_a_bad_supply_is_one_line_and_exit_2(
    fake_supplies: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: str, text: str
) -> None:
    assert main(["kme-sim", "--pki", str(tmp_path / "pki"), "--supply", spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kme-sim: ") and err.count("\n") == 1, err
    assert text in err and "Traceback" not in err
    assert not (tmp_path / "pki").exists()  # refused before anything was made


async def test_kme_sim_process_takes_a_supply_an_installed_distribution_offers(
    tmp_path: Path,
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "fake_supply.py").write_text(
        "class Const:\n"
        "    def available_bits(self):\n        return 1 << 20\n"
        "    def take(self, bits):\n        return bytes([9]) * (bits // 8)\n"
        "def make(options):\n    return lambda a, b: Const()\n"
    )
    info = site / "fake_supply-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-supply\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[qkdagent.supplies]\nconst = fake_supply:make\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    ready, log, pki = tmp_path / "ready.json", tmp_path / "out.txt", tmp_path / "pki"
    argv = [sys.executable, "-m", "qkdagent_etsi014", "kme-sim", "--pki", str(pki),
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
        kmes = {k["kme_id"]: k for k in json.loads(ready.read_text())}
        client = httpx.AsyncClient(base_url=kmes["KME_A"]["url"], verify=tls_context(pki, "alice"))
        async with client:
            enc = await client.get("/api/v1/keys/bob/enc_keys")
        assert enc.json()["keys"][0]["key"] == "CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk="
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await process.wait()
    assert process.returncode == 0, log.read_text()
