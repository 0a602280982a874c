"""Secret references: credential files, environment variables taken out of the environment,
and files that are read only when they are small regular files."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from qkdagent.config import load_config, parse_config
from qkdagent.errors import ConfigError
from qkdagent.options import MAX_SECRET_BYTES, Options
from tests.helpers import alice_config, write_agent_files

KEY = "links.alice-bob.bootstrap"


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, str]:
    return write_agent_files(tmp_path)


def _config(tmp_path: Path, paths: dict[str, str], ref: str) -> Path:
    text = alice_config(paths).replace(f'bootstrap = {{ file = "{paths["bootstrap"]}" }}', ref)
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def _error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


def test_credential_reads_the_systemd_credentials_directory(
    tmp_path: Path, paths: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "alice-bob.bootstrap").write_bytes(Path(paths["bootstrap"]).read_bytes())
    path = _config(tmp_path, paths, 'bootstrap = { credential = "alice-bob.bootstrap" }')
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    error = _error(path)
    assert error.key == KEY and "$CREDENTIALS_DIRECTORY" in error.message
    assert "LoadCredential=" in error.message
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    secret = load_config(path).links["alice-bob"].bootstrap
    assert secret.reveal() == base64.b64decode(Path(paths["bootstrap"]).read_bytes())


@pytest.mark.parametrize("name", ["../bootstrap.key", "a/b", "..", ".", "", "a\0b", 7])
def test_credential_name_cannot_leave_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: object
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    with pytest.raises(ConfigError, match="credential must be a credential name") as info:
        Options({"pin": {"credential": name}}, where="sinks.h").secret("pin")
    assert info.value.key == "sinks.h.pin"


def test_env_secret_is_removed_from_the_environment_and_children(
    tmp_path: Path, paths: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hooks and other programs the agent starts never inherit the variable; a reload (a
    second load in the same process) still finds the secret."""
    name = f"QK_TEST_{uuid.uuid4().hex}"
    value = Path(paths["bootstrap"]).read_text()
    monkeypatch.setenv(name, value)
    path = _config(tmp_path, paths, f'bootstrap = {{ env = "{name}" }}')
    first = load_config(path).links["alice-bob"].bootstrap
    assert name not in os.environ
    child = subprocess.run(
        [sys.executable, "-c", f"import os; print(os.environ.get({name!r}, 'unset'))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert child.stdout.strip() == "unset"
    assert load_config(path).links["alice-bob"].bootstrap == first  # reload


def test_env_secret_that_fails_to_load_stays_in_the_environment(
    tmp_path: Path, paths: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"QK_TEST_{uuid.uuid4().hex}"
    monkeypatch.setenv(name, "AAAA")
    assert (
        "must hold 32 bytes"
        in _error(_config(tmp_path, paths, f'bootstrap = {{ env = "{name}" }}')).message
    )
    assert os.environ[name] == "AAAA"


@pytest.mark.parametrize("name", ["A=B", "", "1X", "A B", "A\0B"])
def test_env_name_must_be_a_variable_name(name: str) -> None:
    with pytest.raises(ConfigError, match="env must name an environment variable"):
        Options({"pin": {"env": name}}, where="s").secret("pin")


def test_env_secret_with_undecodable_bytes_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = f"QK_TEST_{uuid.uuid4().hex}"
    monkeypatch.setitem(os.environb, name.encode(), b"\xff\xfe")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not valid base64"):
        Options({"k": {"env": name}}, where="s").secret("k", encoding="base64")


@pytest.mark.parametrize(
    ("target", "kind"),
    [("/dev/zero", "a character device"), ("dir", "a directory"), ("fifo", "a FIFO")],
)
def test_secret_file_must_be_a_regular_file(
    tmp_path: Path, paths: dict[str, str], target: str, kind: str
) -> None:
    if target == "dir":
        target = str(tmp_path)
    elif target == "fifo":
        target = str(tmp_path / "fifo")
        os.mkfifo(target)
    error = _error(_config(tmp_path, paths, f'bootstrap = {{ file = "{target}" }}'))
    assert error.key == KEY
    assert error.message == f"secret file {target} is {kind}, not a regular file"


def test_a_fifo_secret_does_not_hang_check(tmp_path: Path, paths: dict[str, str]) -> None:
    """In a real process (as the review did it): check ends at once, names the key, exits 2."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    path = _config(tmp_path, paths, f'bootstrap = {{ file = "{fifo}" }}')
    result = subprocess.run(
        [sys.executable, "-m", "qkdagent", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"{KEY}: secret file {fifo} is a FIFO" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_secret_file_read_is_bounded(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"A" * (MAX_SECRET_BYTES + 1))
    with pytest.raises(
        ConfigError, match=r"sinks\.h\.pin: secret file .*big is larger than 64 KiB"
    ):
        Options({"pin": {"file": str(big)}}, where="sinks.h").secret("pin")
    big.write_bytes(b"A" * MAX_SECRET_BYTES)  # the bound itself is fine
    assert len(Options({"pin": {"file": str(big)}}, where="s").secret("pin")) == MAX_SECRET_BYTES


def test_deeply_nested_toml_is_a_located_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.toml"
    path.write_text("a = " + "[" * 10000 + "]" * 10000)
    error = _error(path)
    assert error.key == "(syntax)" and "nested too deeply" in error.message
    nested: object = 1
    for _ in range(5000):  # parsed data from elsewhere (a fuzzer, a test) nested as deep
        nested = [nested]
    with pytest.raises(ConfigError) as info:
        parse_config({"agent": {"name": "a", "x": nested}})
    assert info.value.key.startswith("agent.x[0][0]") and "nested deeper" in info.value.message


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ("interval = 1" + "0" * 400, "links.alice-bob.interval"),
        ('peer_url = "https://[::1"', "links.alice-bob.peer_url"),
        ('peer_url = "https://127.0.0.1:99999"', "links.alice-bob.peer_url"),
        ('peer_url = "https://127.0.0.1\\n:1"', "links.alice-bob.peer_url"),
    ],
)
def test_odd_values_are_located_errors(
    tmp_path: Path, paths: dict[str, str], change: str, key: str
) -> None:
    text = alice_config(paths, link=change)
    if change.startswith("peer_url"):
        text = text.replace('peer_url = "https://127.0.0.1:17448"\n', "")
    path = tmp_path / "agent.toml"
    path.write_text(text)
    assert _error(path).key == key


def test_config_file_must_be_a_regular_file(tmp_path: Path) -> None:
    error = _error(Path("/dev/zero"))
    assert error.key == "(file)" and "is a character device" in error.message


def test_a_key_of_thousands_of_dotted_parts_is_refused_before_parsing(tmp_path: Path) -> None:
    """tomllib takes seconds to hours on such keys (found by contrib/fuzz): refused up front,
    naming the line."""
    from qkdagent.config import MAX_DOTTED_PARTS

    config = tmp_path / "agent.toml"
    config.write_text('[agent]\nname = "a"\n' + ".".join(["0"] * 6001) + " = 1\n")
    with pytest.raises(ConfigError, match=r"\(line 3\).*more than 64 dotted parts"):
        load_config(config)
    fine = '[agent]\nname = "a"\nx = "' + "." * 500 + '"\n' + ".".join(["k"] * 10) + " = 1\n"
    config.write_text(fine)
    with pytest.raises(ConfigError) as info:  # refused for other reasons, not the dots
        load_config(config)
    assert "dotted" not in str(info.value) and MAX_DOTTED_PARTS == 64


def test_locating_deep_nesting_does_not_spell_out_every_path(tmp_path: Path) -> None:
    """Review finding: building every child's dotted path up front took 301 MB for a 129 KB
    config; the path is spelled out only for the error now."""
    import tracemalloc

    config = tmp_path / "agent.toml"
    config.write_text("[" + "a" * 100_000 + "]\n" + "\n".join(f"k{i} = 1" for i in range(3000)))
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError):
            load_config(config)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50_000_000  # was about 300 MB
