"""Config validation: every error names the file, the key and what is wrong; check exits 2."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from qkdagent.cli import main
from qkdagent.config import load_config
from qkdagent.errors import ConfigError
from tests.helpers import alice_config, write_agent_files


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, str]:
    return write_agent_files(tmp_path)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_valid_config_loads(tmp_path: Path, paths: dict[str, str]) -> None:
    config = load_config(_write(tmp_path, alice_config(paths)))
    link = config.links["alice-bob"]
    assert config.agent.name == "alice"
    assert link.initiator is True  # auto: "alice" sorts before "bob"
    assert link.timing.interval == 120 and link.timing.reject_after == 180
    assert repr(link.bootstrap) == "Secret(<32 bytes redacted>)"


@pytest.mark.parametrize(
    ("change", "key", "message"),
    [
        (('name = "alice"', "name = 7"), "agent.name", "must be a string, not an integer"),
        (('name = "alice"', 'name = "a b"'), "agent.name", "letters, digits"),
        (('name = "alice"', 'name = "alice\\n"'), "agent.name", "letters, digits"),
        (('listen = "127.0.0.1:17447"', 'listen = "nowhere"'), "agent.listen", "HOST:PORT"),
        (('peer = "bob"', 'peer = "alice"'), "links.alice-bob.peer", "own name"),
        (
            ('peer_url = "https://127.0.0.1:17448"', 'peer_url = "http://127.0.0.1:17448"'),
            "links.alice-bob.peer_url",
            "https://",
        ),
        (('sources = ["sim"]', 'sources = ["nope"]'), "links.alice-bob.sources", "[sources.nope]"),
        (('sources = ["sim"]', "sources = []"), "links.alice-bob.sources", "must not be empty"),
        (('sinks = ["psk"]', 'sinks = ["psk", "psk"]'), "links.alice-bob.sinks", "twice"),
        (('type = "file"', 'typo = "file"'), "sinks.psk.type", "is required"),
        (('plugins = ["memory"]', 'plugins = ["memory"]\nbogus = 1'), "agent.bogus", "not a known"),
        (
            ('plugins = ["memory"]', 'plugins = ["memory"]\nused_key_ids_kept = 999'),
            "agent.used_key_ids_kept",
            "at least 1000",
        ),
        (
            ('plugins = ["memory"]', 'plugins = ["memory"]\nused_key_ids_kept = "5000"'),
            "agent.used_key_ids_kept",
            "must be an integer",
        ),
    ],
)
def test_errors_name_file_key_and_problem(
    tmp_path: Path, paths: dict[str, str], change: tuple[str, str], key: str, message: str
) -> None:
    text = alice_config(paths)
    assert change[0] in text
    path = _write(tmp_path, text.replace(change[0], change[1], 1))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key
    assert message in info.value.message
    assert str(info.value).startswith(f"{path}: {key}: ")


def test_used_key_ids_kept_defaults_to_the_retention_and_can_be_set(
    tmp_path: Path, paths: dict[str, str]
) -> None:
    text = alice_config(paths)
    assert load_config(_write(tmp_path, text)).agent.used_key_ids_kept == 100_000
    text = text.replace('plugins = ["memory"]', 'plugins = ["memory"]\nused_key_ids_kept = 5000')
    assert load_config(_write(tmp_path, text)).agent.used_key_ids_kept == 5000


def test_reject_after_must_exceed_interval(tmp_path: Path, paths: dict[str, str]) -> None:
    path = _write(tmp_path, alice_config(paths, link="interval = 60\nreject_after = 60"))
    with pytest.raises(ConfigError, match="reject_after: must be longer than interval"):
        load_config(path)


@pytest.mark.parametrize(
    ("link", "grid"),
    [
        ("", 1.0),  # the defaults: interval 120, reject_after 180
        ("interval = 12\nreject_after = 60", 0.1),  # interval / 120
        ("interval = 100\nreject_after = 100.5", 0.25),  # half the margin before the erase
        ("grid = 0", 0.0),
        ("grid = 5", 5.0),
    ],
)
def test_the_rotation_grid_defaults_to_what_the_timing_allows(
    tmp_path: Path, paths: dict[str, str], link: str, grid: float
) -> None:
    config = load_config(_write(tmp_path, alice_config(paths, link=link)))
    assert config.links["alice-bob"].timing.grid == grid


@pytest.mark.parametrize(
    ("link", "bound"),
    [
        ("grid = 12.5", "12"),
        ("grid = -1", "0"),
        ("interval = 100\nreject_after = 104\ngrid = 3", "2"),
    ],
)
def test_a_grid_that_could_delay_a_rotation_too_long_is_refused(
    tmp_path: Path, paths: dict[str, str], link: str, bound: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, alice_config(paths, link=link)))
    assert info.value.key == "links.alice-bob.grid" and bound in info.value.message


def test_inline_secret_is_refused(tmp_path: Path, paths: dict[str, str]) -> None:
    text = alice_config(paths).replace(
        f'bootstrap = {{ file = "{paths["bootstrap"]}" }}', 'bootstrap = "c2VjcmV0"'
    )
    with pytest.raises(ConfigError, match="bootstrap: is not accepted inline"):
        load_config(_write(tmp_path, text))


def test_secret_from_environment(
    tmp_path: Path, paths: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = alice_config(paths).replace(
        f'bootstrap = {{ file = "{paths["bootstrap"]}" }}', 'bootstrap = { env = "QK_TEST_BOOT" }'
    )
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match="environment variable QK_TEST_BOOT is not set"):
        load_config(path)
    monkeypatch.setenv("QK_TEST_BOOT", "AAAA")
    with pytest.raises(ConfigError, match="must hold 32 bytes"):
        load_config(path)
    monkeypatch.setenv("QK_TEST_BOOT", Path(paths["bootstrap"]).read_text())
    assert len(load_config(path).links["alice-bob"].bootstrap) == 32


def test_world_readable_secret_file_warns(
    tmp_path: Path, paths: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    os.chmod(paths["bootstrap"], 0o644)
    load_config(_write(tmp_path, alice_config(paths)))
    assert "readable by group or others" in caplog.text
    assert "links.alice-bob.bootstrap" in caplog.text


def test_shared_sink_label_is_refused(tmp_path: Path, paths: dict[str, str]) -> None:
    text = alice_config(paths, extra=f'\n[sinks.psk2]\ntype = "file"\npath = "{paths["dir"]}/b"')
    text = text.replace('sinks = ["psk"]', 'sinks = ["psk", "psk2"]')
    with pytest.raises(ConfigError, match="share the label 'file'"):
        load_config(_write(tmp_path, text))


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[agent\nname=")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_check_command_ok_and_exit_2(
    tmp_path: Path, paths: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    good = _write(tmp_path, alice_config(paths))
    assert main(["check", "-c", str(good)]) == 0
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text(alice_config(paths, extra='format = "pem"'))
    assert main(["check", "-c", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "sinks.psk.format" in err and "'base64', 'hex', 'raw'" in err


def test_check_reports_unknown_plugin_option_and_type(
    tmp_path: Path, paths: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    unknown_option = _write(tmp_path, alice_config(paths, extra="colour = 1"))
    assert main(["check", "-c", str(unknown_option)]) == 2
    assert "sinks.psk.colour: is not a known option here" in capsys.readouterr().err
    text = alice_config(paths).replace('type = "file"', 'type = "wireguardx"')
    unknown_type = _write(tmp_path, text)
    assert main(["check", "-c", str(unknown_type)]) == 2
    err = capsys.readouterr().err
    assert "sinks.psk.type: unknown sink type 'wireguardx'" in err


def test_check_reports_missing_plugin(
    tmp_path: Path, paths: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    text = alice_config(paths).replace('plugins = ["memory"]', 'plugins = ["memory", "nosuch"]')
    assert main(["check", "-c", str(_write(tmp_path, text))]) == 2
    assert "plugin 'nosuch' is not installed (pip install qkdagent-nosuch)" in (
        capsys.readouterr().err
    )


def test_missing_tls_file(tmp_path: Path, paths: dict[str, str]) -> None:
    text = alice_config(paths).replace(paths["alice_key"], str(tmp_path / "missing.key"))
    with pytest.raises(ConfigError, match=r"agent\.tls\.key: .*missing\.key does not exist"):
        load_config(_write(tmp_path, text))


def test_no_warning_for_private_secret_file(
    tmp_path: Path, paths: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    load_config(_write(tmp_path, alice_config(paths)))
    assert "readable" not in caplog.text


def test_agent_imports_only_the_plugins_its_config_names(
    tmp_path: Path, paths: dict[str, str]
) -> None:
    """In a fresh interpreter: building an agent from a config that names only `memory` imports
    no other installed plugin (a broken or slow vendor plugin elsewhere cannot affect it)."""
    import subprocess
    import sys

    config = _write(tmp_path, alice_config(paths))
    code = (
        "import sys\n"
        "from qkdagent.agent import Agent\n"
        "from qkdagent.config import load_config\n"
        f"Agent(load_config({str(config)!r}))\n"
        "print(sorted(m for m in sys.modules if m.startswith('qkdagent_')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[]"
    # and the same agent with the etsi014 plugin named does import it (the probe works)
    from qkdagent.plugins import installed
    from qkdagent.testing import missing

    if "etsi014" not in installed():
        missing("qkdagent-etsi014 is not installed")
    named = _write(tmp_path, alice_config(paths).replace('["memory"]', '["memory", "etsi014"]'))
    code2 = code.replace(repr(str(config)), repr(str(named)))
    out2 = subprocess.run(
        [sys.executable, "-c", code2], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert "qkdagent_etsi014" in out2 and "qkdagent_wireguard" not in out2
