"""`qkdagent migrate qupskd` on the seed's example configs (quPSKd's alice and bob, values as in
its example/ directory): both generated configs pass `qkdagent check`; what cannot be carried
over is printed; a broken or hostile quPSKd file is one line and exit 2, nothing written."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from qkdagent_qupskd import migrate_cli
from qkdagent_qupskd.migrate import MigrateError, plan, read_qupskd

from qkdagent.testing import write_test_pki

ALICE = """
qupskd_bind = "localhost" # Interface/IP for qupskd binding
qupskd_port = 5555        # Port for qupskd service
enable_fake_qkd_api = true
etsi_url = "http://localhost:5555"          # QKD device for key requests
remote_qupskd_url = "http://localhost:5556" # Peer qupskd address
key_folder = "./psk/alice" # (optional) Directory for storing generated keys
alias = "bob"              # Name for storing the key
psk = "thisisverysecret"   # (optional) Extra PSK to add to the mix
# wireguard_public_key = "GOJt/mfPuwoUiKD+hARpxuDtnzJOWkcK0Tq+sxxw4UQ="
source_KME_ID = "hsn_alice"
target_KME_ID = "hsn_bob"
master_SAE_ID = "sae_alice"
remote_SAE_ID = "sae_bob"
"""
BOB = """
key_folder = "./psk/bob"
qupskd_bind = "localhost"
qupskd_port = 5556
enable_fake_qkd_api = true
etsi_url = "http://localhost:5556"
remote_qupskd_url = "http://localhost:5555"
alias = "bob"
psk = "thisisverysecret"
source_KME_ID = "hsn_bob"
target_KME_ID = "hsn_alice"
master_SAE_ID = "sae_bob"
remote_SAE_ID = "sae_alice"
"""


def main(args: list[str]) -> int:
    """`qkdagent migrate ...` in-process (argparse as the CLI builds it)."""
    assert args[0] == "migrate"
    parser = argparse.ArgumentParser(prog="qkdagent migrate")
    migrate_cli.configure(parser)
    return migrate_cli.run(parser.parse_args(args[1:]))


def qkdagent(*args: str) -> tuple[int, str]:
    """A built-in command as the operator runs it (the CLI module is not plugin API)."""
    done = subprocess.run(
        [sys.executable, "-m", "qkdagent", *args], capture_output=True, text=True, timeout=60
    )
    return done.returncode, done.stdout + done.stderr


def migrate(tmp_path: Path, name: str, text: str, *extra: str) -> tuple[int, Path]:
    source = tmp_path / f"qupskd_{name}.toml"
    source.write_text(text)
    out = tmp_path / "out"
    tls = tmp_path / "tls"
    if not (tls / "ca.pem").exists():
        write_test_pki(tls, ["alice", "bob"])
        shutil.copy(tls / "ca.pem", tls / "agents-ca.pem")
    args = ["--tls-dir", str(tls), "--state-dir", str(tmp_path / name / "state")]
    return main(["migrate", "qupskd", str(source), "-o", str(out), *args, *extra]), out


@pytest.mark.parametrize(
    ("name", "text", "peer"), [("alice", ALICE, "bob"), ("bob", BOB, "alice")], ids=["alice", "bob"]
)
def test_the_seed_examples_become_two_configs_that_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, peer: str
) -> None:
    code, out = migrate(tmp_path, name, text, "--peer-url", "https://192.0.2.2:7447")
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "fake KME inside the quPSKd being replaced" in printed
    assert "key_folder './psk/" in printed and "is relative" in printed
    phase1 = tomllib.loads((out / f"{name}-phase1.toml").read_text())
    link = phase1["links"]["alice-bob"]
    own, other = (5555, 5556) if name == "alice" else (5556, 5555)
    assert link["protocol"] == "qupskd" and link["insecure"] is True
    assert link["listen"] == f"localhost:{own}" and link["peer_url"] == f"http://localhost:{other}"
    source = phase1["sources"]["kme"]
    assert source["kme_url"] == f"http://localhost:{other}" and source["insecure_http"] is True
    assert source["peer_sae_ids"] == {peer: f"sae_{peer}"}
    sink = phase1["sinks"]["psk"]
    assert sink["path"] == f"./psk/{name}/bob.key" and sink["format"] == "base64"
    psk = out / "alice-bob.qupskd-psk.key"
    assert psk.read_text() == "thisisverysecret" and psk.stat().st_mode & 0o077 == 0
    # `qkdagent check` still wants a file sink's directory to exist even with create_dirs = true
    # (core gap, see README); the agent itself creates it at start
    (out / "psk" / name).mkdir(parents=True)
    code, checked = qkdagent("check", "-c", str(out / f"{name}-phase1.toml"))
    assert code == 0 and "does not authenticate its peer" in checked and "OK" in checked
    # phase 2: the native protocol with a bootstrap secret from gen-bootstrap
    phase2 = tomllib.loads((out / f"{name}-phase2.toml").read_text())
    native = phase2["links"]["alice-bob"]
    assert "protocol" not in native and native["peer_url"] == "https://192.0.2.2:7447"
    assert qkdagent("gen-bootstrap", str(out / native["bootstrap"]["file"]))[0] == 0
    code, checked = qkdagent("check", "-c", str(out / f"{name}-phase2.toml"))
    assert code == 0 and "does not authenticate" not in checked and "OK" in checked


def test_a_wireguard_site_gets_a_wireguard_sink(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = ALICE.replace("# wireguard_public_key", "wireguard_public_key")
    code, out = migrate(tmp_path, "alice", text)
    assert code == 0
    phase1 = tomllib.loads((out / "alice-phase1.toml").read_text())
    assert phase1["sinks"]["psk"] == {
        "type": "wireguard",
        "interface": "wg0_bob",
        "peer_public_key": "GOJt/mfPuwoUiKD+hARpxuDtnzJOWkcK0Tq+sxxw4UQ=",
    }
    assert "wireguard" in phase1["agent"]["plugins"]
    assert "phase 2 peer_url guessed as https://localhost:7447" in capsys.readouterr().out
    assert qkdagent("check", "-c", str(out / "alice-phase1.toml"))[0] == 0


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("qupskd_port = [", "not TOML"),
        (ALICE.replace("5555        #", '"5555"        #'), "qupskd_port: must be a int"),
        (ALICE.replace("enable_fake_qkd_api = true", "enable_fake_qkd_api = 1"), "must be a bool"),
        (ALICE.replace('remote_SAE_ID = "sae_bob"', ""), "remote_SAE_ID: is missing"),
        (ALICE.replace('"http://localhost:5556" #', '"ftp://x" #'), "remote_qupskd_url"),
        (ALICE + "\nx = '" + "a" * 70000 + "'\n", "larger than"),
        (ALICE.replace('"sae_alice"', '"sae_al ice"'), "--name"),
        (
            ALICE.replace("# wireguard_public_key", "wireguard_public_key").replace("GOJt", "!!"),
            "wireguard_public_key",
        ),
        ("\udcff".join(["a", "b"]), "not UTF-8"),
    ],
)
def test_a_broken_qupskd_config_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, problem: str
) -> None:
    source = tmp_path / "qupskd.toml"
    source.write_bytes(text.encode("utf-8", "surrogateescape"))
    out = tmp_path / "out"
    assert main(["migrate", "qupskd", str(source), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert problem in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_existing_files_are_not_overwritten_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert migrate(tmp_path, "alice", ALICE)[0] == 0
    assert migrate(tmp_path, "alice", ALICE)[0] == 2
    assert "--force" in capsys.readouterr().err
    assert migrate(tmp_path, "alice", ALICE, "--force")[0] == 0


CONTRIB = Path(__file__).resolve().parents[3] / "contrib" / "qupskd"


def test_the_contrib_examples_are_what_migrate_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """contrib/qupskd/alice-phase{1,2}.toml are the output for contrib/qupskd/qupskd/alice.toml,
    with the two files that sit next to the configs moved to /etc/qkdagent (`qkdagent check` of
    every contrib example runs in tests/test_examples.py)."""
    source = tmp_path / "qupskd" / "alice.toml"
    source.parent.mkdir()
    shutil.copy(CONTRIB / "qupskd" / "alice.toml", source)
    out = tmp_path / "out"
    args = ["-o", str(out), "--peer-url", "https://192.0.2.2:7447"]
    assert main(["migrate", "qupskd", str(source), *args]) == 0
    capsys.readouterr()
    for phase in (1, 2):
        text = (out / f"alice-phase{phase}.toml").read_text()
        text = text.replace(
            'psk = { file = "alice-bob.qupskd-psk.key" }   # quPSKd: psk (0600, next to this file)',
            'psk = { file = "/etc/qkdagent/alice-bob.qupskd-psk.key" }   # quPSKd: psk (migrate '
            "writes it, 0600)",
        )
        text = text.replace('"alice-bob.bootstrap" }', '"/etc/qkdagent/alice-bob.bootstrap" }')
        text = text.replace("(alice.toml)", "(qupskd/alice.toml)")
        assert text == (CONTRIB / f"alice-phase{phase}.toml").read_text(), f"phase {phase}"


@pytest.mark.parametrize("opening", ["[", "{y = "], ids=["arrays", "inline-tables"])
def test_a_deeply_nested_qupskd_config_is_a_migrate_error(opening: str) -> None:
    text = "x = " + opening * (60_000 // len(opening))
    with pytest.raises(MigrateError, match="nested too deeply"):
        read_qupskd(text)


def test_the_plan_repr_never_shows_the_psk() -> None:
    made = plan(read_qupskd(ALICE), source="alice.toml")
    assert made.psk and made.psk not in repr(made)
