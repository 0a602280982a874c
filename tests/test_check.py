"""`qkdagent check` refuses what `run` would, naming the dotted key; `run` names it too."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qkdagent.cli import main
from qkdagent.fileutil import FileCheckError
from qkdagent.state import StateStore
from qkdagent.testing import encrypted_key_copy
from tests.helpers import alice_config, write_agent_files


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, str]:
    return write_agent_files(tmp_path)


def _check(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str], *, code: int = 2) -> str:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    assert main(["check", "-c", str(path)]) == code
    out, err = capsys.readouterr()
    if code:
        assert err.startswith(f"qkdagent: invalid config: {path}: ")
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err + out


def _encrypted_key(paths: dict[str, str], tmp_path: Path) -> str:
    return str(encrypted_key_copy(paths["alice_key"], tmp_path / "encrypted.key"))


@pytest.mark.parametrize(
    ("what", "key", "message"),
    [
        ("bob_key", "agent.tls.key", "does not match agent.tls.cert"),
        ("garbage_cert", "agent.tls.cert", "holds no PEM certificate"),
        ("garbage_key", "agent.tls.key", "holds no usable PEM private key"),
        ("encrypted_key", "agent.tls.key", "is encrypted"),
        ("ca_dir", "agent.tls.ca", "is a directory, not a regular file"),
    ],
)
def test_tls_files_are_checked(
    tmp_path: Path,
    paths: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    what: str,
    key: str,
    message: str,
) -> None:
    text = alice_config(paths)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    garbage.chmod(0o600)
    if what == "bob_key":
        text = text.replace(paths["alice_key"], paths["bob_key"])
    elif what == "garbage_cert":
        text = text.replace(paths["alice_cert"], str(garbage))
    elif what == "garbage_key":
        text = text.replace(paths["alice_key"], str(garbage))
    elif what == "encrypted_key":
        text = text.replace(paths["alice_key"], _encrypted_key(paths, tmp_path))
    elif what == "ca_dir":
        text = text.replace(paths["ca"], str(tmp_path))
    err = _check(tmp_path, text, capsys)
    assert f": {key}: " in err and message in err


@pytest.mark.parametrize(
    ("setup", "message"),
    [("file", "is a regular file, not a directory"), ("under_file", "cannot be created")],
)
def test_state_dir_is_checked(
    tmp_path: Path,
    paths: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    setup: str,
    message: str,
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    state = blocker if setup == "file" else blocker / "state"
    text = alice_config(paths).replace(f"{paths['dir']}/state", str(state))
    err = _check(tmp_path, text, capsys)
    assert ": agent.state_dir: " in err and message in err
    assert not (tmp_path / "state").exists()  # check changes nothing


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ('listen = "127.0.0.1:0"', "agent.listen: port must be 1-65535, not 0"),
        ('listen = "127.0.0.1:70000"', "agent.listen: port must be 1-65535, not 70000"),
        (
            'listen = "127.0.0.1:17447"\nstatus_listen = "0.0.0.0:17447"',
            "agent.status_listen: uses the port of agent.listen",
        ),
    ],
)
def test_ports_are_checked(
    tmp_path: Path,
    paths: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    listen: str,
    message: str,
) -> None:
    text = alice_config(paths).replace('listen = "127.0.0.1:17447"', listen)
    assert message in _check(tmp_path, text, capsys)


def test_file_sink_directory_is_checked_per_link(
    tmp_path: Path, paths: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    text = alice_config(paths).replace(f"{paths['dir']}/psk.key", f"{paths['dir']}/{{peer}}/psk")
    err = _check(tmp_path, text, capsys)
    assert f": sinks.psk.path: directory {paths['dir']}/bob does not exist" in err
    (tmp_path / "bob").mkdir()
    assert "OK" in _check(tmp_path, text, capsys, code=0)


def test_a_file_sink_that_creates_its_directories_needs_a_writable_parent(
    tmp_path: Path, paths: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    text = alice_config(paths, extra="create_dirs = true").replace(
        f"{paths['dir']}/psk.key", f"{paths['dir']}/a/{{peer}}/psk"
    )
    assert "OK" in _check(tmp_path, text, capsys, code=0)
    assert not (tmp_path / "a").exists()  # check creates nothing


@pytest.mark.parametrize(
    ("hook", "key", "message"),
    [
        ("missing", "command", "does not exist or is not a file"),
        ("directory", "command", "does not exist or is not a file"),
        ("not_executable", "command", "is not executable"),
        ("erase_missing", "erase_command", "does not exist or is not a file"),
    ],
)
def test_exec_hook_is_checked(
    tmp_path: Path,
    paths: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    hook: str,
    key: str,
    message: str,
) -> None:
    good = tmp_path / "hook.sh"
    good.write_text("#!/bin/sh\ncat >/dev/null\n")
    good.chmod(0o755)
    command, erase = str(good), str(good)
    if hook == "missing":
        command = str(tmp_path / "nohook")
    elif hook == "directory":
        command = str(tmp_path)
    elif hook == "not_executable":
        good.chmod(0o644)
    else:
        erase = str(tmp_path / "nohook")
    text = alice_config(
        paths,
        extra=f'\n[sinks.hook]\ntype = "exec"\ncommand = ["{command}"]\n'
        f'erase_command = ["{erase}"]\nlabel = "hook"',
    ).replace('sinks = ["psk"]', 'sinks = ["psk", "hook"]')
    err = _check(tmp_path, text, capsys)
    assert f": sinks.hook.{key}: " in err and message in err


def test_run_names_the_key_and_exits_2(tmp_path: Path, paths: dict[str, str]) -> None:
    """`run` refuses a missing sink directory as `check` does: exit 2, the dotted key, one
    line, before the state directory is even created."""
    text = alice_config(paths).replace(f"{paths['dir']}/psk.key", f"{paths['dir']}/no/psk.key")
    path = tmp_path / "agent.toml"
    path.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "qkdagent", "run", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"{path}: sinks.psk.path: directory {paths['dir']}/no does not exist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "state").exists()


# -- the state directory (StateStore) -------------------------------------------------------


def test_symlinked_state_dir_target_is_never_chmodded(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    link = tmp_path / "state"
    link.symlink_to(shared)
    with pytest.raises(FileCheckError, match="symbolic link .* never chmod-ed"):
        StateStore(link)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755
    assert not (shared / "state.db").exists()


def test_symlink_to_a_private_directory_is_used(tmp_path: Path) -> None:
    """systemd's DynamicUser= makes StateDirectory a link to private/NAME (mode 0700)."""
    private = tmp_path / "private" / "qkdagent"
    private.mkdir(parents=True, mode=0o700)
    link = tmp_path / "qkdagent"
    link.symlink_to(private)
    store = StateStore(link)
    try:
        assert stat.S_IMODE((private / "state.db").stat().st_mode) == 0o600
    finally:
        store.close()


def test_state_dir_that_is_a_file_or_a_linked_db_is_refused(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(FileCheckError, match="is a regular file, not a directory"):
        StateStore(afile)
    state = tmp_path / "state"
    state.mkdir()
    elsewhere = tmp_path / "elsewhere.db"
    elsewhere.write_bytes(b"")
    elsewhere.chmod(0o644)
    (state / "state.db").symlink_to(elsewhere)
    with pytest.raises(FileCheckError, match="state.db is a symbolic link"):
        StateStore(state)
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o644


def test_real_state_dir_is_made_private(tmp_path: Path) -> None:
    state = tmp_path / "a" / "state"
    state.parent.mkdir()
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    StateStore(state).close()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_a_second_store_on_the_same_state_dir_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    """Two agents on one state_dir could each use a key ID once: the second is refused."""
    state = tmp_path / "state"
    first = StateStore(state)
    with pytest.raises(FileCheckError, match="in use by another process"):
        StateStore(state)
    assert not (state / "state.db-shm").exists()  # no shared memory: one owner
    first.close()
    StateStore(state).close()
