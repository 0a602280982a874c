"""`qkdagent kme-sim` (as `python -m qkdagent_etsi014 kme-sim`), `--make-pki`, and the demo hook."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import qkdagent_etsi014
import trio
from qkdagent_etsi014.__main__ import main
from qkdagent_etsi014.cli import configure, settings_from
from qkdagent_etsi014.source import Etsi014Source

from qkdagent import CommandRegistry, Link
from qkdagent.testing import build_component, encrypted_key_copy, missing, running

from .conftest import tls_context


def test_make_pki_writes_private_keys_0600(tmp_path: Path, capsys) -> None:
    assert (
        main(["kme-sim", "--make-pki", str(tmp_path), "--kme", "K1=s1,s2", "--kme", "K2=s3"]) == 0
    )
    for name in ("ca", "K1", "K2", "s1", "s2", "s3"):
        assert (tmp_path / f"{name}.pem").is_file()
        mode = stat.S_IMODE((tmp_path / f"{name}.key").stat().st_mode)
        assert mode == 0o600, name
    assert "s3" in capsys.readouterr().out


def test_bad_arguments(tmp_path: Path, capsys) -> None:
    assert main(["kme-sim"]) == 2
    assert "--pki DIR" in capsys.readouterr().err
    assert main(["kme-sim", "--pki", str(tmp_path), "--key-size", "100"]) == 2
    with pytest.raises(SystemExit):
        main(["kme-sim", "--kme", "nosaes"])


def test_quirk_flags_reach_the_settings() -> None:
    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(["--only-method", "GET", "--method-refusal-status", "404"])
    quirks = settings_from(args).quirks
    assert (quirks.only_method, quirks.method_refusal_status) == ("GET", 404)
    assert settings_from(parser.parse_args([])).quirks.method_refusal_status == 405


def test_command_is_registered_through_the_hook() -> None:
    registry = CommandRegistry()
    qkdagent_etsi014.qkdagent_add_commands(registry)
    assert "kme-sim" in registry.commands


async def test_kme_sim_process_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    ready, log = tmp_path / "ready.json", tmp_path / "out.txt"
    pki = tmp_path / "pki"
    argv = [sys.executable, "-m", "qkdagent_etsi014", "kme-sim", "--pki", str(pki),
            "--ready-file", str(ready), "--rate", "0"]  # fmt: skip
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        with trio.fail_after(20):
            while not ready.exists() or not ready.read_text():
                assert process.poll() is None, log.read_text()
                await trio.sleep(0.05)
        kmes = {k["kme_id"]: k for k in json.loads(ready.read_text())}
        assert kmes["KME_A"]["saes"] == ["alice"] and kmes["KME_B"]["saes"] == ["bob"]
        alice = httpx.AsyncClient(base_url=kmes["KME_A"]["url"], verify=tls_context(pki, "alice"))
        bob = httpx.AsyncClient(base_url=kmes["KME_B"]["url"], verify=tls_context(pki, "bob"))
        async with alice, bob:
            enc = await alice.get("/api/v1/keys/bob/enc_keys", params={"number": 2})
            ids = [{"key_ID": k["key_ID"]} for k in enc.json()["keys"]]
            dec = await bob.post("/api/v1/keys/alice/dec_keys", json={"key_IDs": ids})
            assert dec.json() == enc.json()
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await process.wait()
    assert process.returncode == 0, log.read_text()
    assert "KME_A: https://127.0.0.1:" in log.read_text()


def kme_sim(*args: str) -> list[str]:
    return [sys.executable, "-m", "qkdagent_etsi014", "kme-sim", *args]


async def wait_ready(process: trio.Process, ready: Path, log: Path) -> dict[str, dict]:
    with trio.fail_after(30):
        while not ready.exists() or not ready.read_text():
            assert process.poll() is None, log.read_text()
            await trio.sleep(0.05)
    return {k["kme_id"]: k for k in json.loads(ready.read_text())}


async def test_readme_example_extends_an_existing_pki_with_new_names(tmp_path: Path) -> None:
    """Issue 11: `--pki ./pki --kme KME_A=alice --kme KME_B=bob,dave --kme KME_C=carol` on a
    directory made by plain `--make-pki` (no KME_C, dave, carol) ended in a traceback."""
    pki = tmp_path / "pki"
    assert main(["kme-sim", "--make-pki", str(pki)]) == 0
    original = (pki / "alice.pem").read_bytes()
    ready, log = tmp_path / "ready.json", tmp_path / "out.txt"
    argv = kme_sim("--pki", str(pki), "--kme", "KME_A=alice", "--kme", "KME_B=bob,dave",
                   "--kme", "KME_C=carol", "--ready-file", str(ready))  # fmt: skip
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        kmes = await wait_ready(process, ready, log)
        assert kmes["KME_C"]["saes"] == ["carol"] and kmes["KME_B"]["saes"] == ["bob", "dave"]
        calls = {"alice": ("KME_A", "bob"), "dave": ("KME_B", "alice"), "carol": ("KME_C", "bob")}
        for sae, (kme, peer) in calls.items():  # old and new certificates, one CA
            client = httpx.AsyncClient(base_url=kmes[kme]["url"], verify=tls_context(pki, sae))
            async with client:
                answer = await client.get(f"/api/v1/keys/{peer}/status")
            assert answer.status_code in (200, 400), (sae, answer.text)  # 400: no such link
            if answer.status_code == 200:
                assert answer.json()["master_SAE_ID"] == sae
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await process.wait()
    assert process.returncode == 0, log.read_text()
    assert (pki / "alice.pem").read_bytes() == original  # existing certificates are kept
    assert stat.S_IMODE((pki / "carol.key").stat().st_mode) == 0o600
    assert "issued certificates for KME_C, dave, carol" in log.read_text()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(kme_sim(*args), capture_output=True, text=True, timeout=60)


def assert_one_line_usage_error(result: subprocess.CompletedProcess[str], text: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("kme-sim: ") and text in result.stderr, result.stderr


def test_new_names_without_the_ca_key_are_one_clear_line(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert main(["kme-sim", "--make-pki", str(pki)]) == 0
    (pki / "ca.key").unlink()
    result = run_cli("--pki", str(pki), "--kme", "KME_A=alice", "--kme", "KME_C=carol")
    assert_one_line_usage_error(result, "no certificate for KME_C, carol and no ca.key")
    assert not (pki / "carol.pem").exists()


def test_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert main(["kme-sim", "--make-pki", str(pki)]) == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("--pki", str(pki), "--port", str(port))
    assert_one_line_usage_error(result, f"KME KME_A: cannot listen on 127.0.0.1 port {port}")
    assert "in use" in result.stderr


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--port", "70000"], "--port 70000"),
        (["--rate", "-1"], "--rate -1"),
        (["--initial-fill", "2"], "--initial-fill 2"),
        (["--kme", "K1=a", "--kme", "K2=a"], "SAE 'a' is attached to both K1 and K2"),
        (["--host", "host.invalid"], "cannot listen on host.invalid"),
    ],
)
def test_bad_settings_are_one_clear_line(tmp_path: Path, args: list[str], text: str) -> None:
    assert_one_line_usage_error(run_cli("--pki", str(tmp_path / "pki"), *args), text)


async def test_demo_link_service_fills_the_source_tables(tmp_path: Path) -> None:
    demo = qkdagent_etsi014.qkdagent_demo_link(tmp_path)
    assert demo.alice_sources["qkd"]["type"] == "etsi014"
    assert demo.alice_sources["qkd"]["kme_url"] == ""  # the hook does no I/O
    async with trio.open_nursery() as nursery:
        await nursery.start(demo.service.run)
        tables = {"alice": demo.alice_sources["qkd"], "bob": demo.bob_sources["qkd"]}
        assert all(t["kme_url"].startswith("https://127.0.0.1:") for t in tables.values())
        sources = {
            name: build_component(Etsi014Source, table, name="qkd", agent=name, state_dir=tmp_path)
            for name, table in tables.items()
        }
        async with running(*sources.values()):
            key = await sources["alice"].new_key(Link("l", "alice", "bob", True))
            same = await sources["bob"].key_by_id(Link("l", "bob", "alice", False), key.key_id)
            assert same.value == key.value
        nursery.cancel_scope.cancel()
    assert (tmp_path / "kme-pki" / "ca.pem").is_file()


def _qkdagent() -> str:
    path = shutil.which("qkdagent")
    if path is None:
        missing("the core's `qkdagent` command is not installed")
        raise AssertionError("unreachable")
    return path


def test_core_cli_runs_the_plugin_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [_qkdagent(), "kme-sim", "--make-pki", str(tmp_path / "pki")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "pki" / "KME_A.pem").is_file()


def test_core_demo_through_two_simulated_kmes(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            _qkdagent(),
            "demo",
            "--source",
            "etsi014",
            "--rotations",
            "3",
            "--interval",
            "0.3",
            "--dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ETSI GS QKD 014" in result.stdout
    assert "3 rotations, secrets identical on both sides every time." in result.stdout


@pytest.mark.parametrize("damage", ["garbage", "encrypted"])
def test_an_unusable_kme_key_is_one_clear_line(tmp_path: Path, damage: str) -> None:
    """A KME key that does not load, or is encrypted (never prompted for): exit 2, one line."""
    pki = tmp_path / "pki"
    assert main(["kme-sim", "--make-pki", str(pki)]) == 0
    key = pki / "KME_A.key"
    if damage == "garbage":
        key.write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    else:
        encrypted_key_copy(key, key)
    result = run_cli("--pki", str(pki))
    assert_one_line_usage_error(result, "kme-sim: ")
    assert ("is encrypted" in result.stderr) == (damage == "encrypted"), result.stderr
