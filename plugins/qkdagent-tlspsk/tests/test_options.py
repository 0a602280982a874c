"""Config validation: every mistake is a ConfigError naming the key, before any I/O."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qkdagent import ConfigError


@pytest.mark.parametrize(
    ("options", "key", "message"),
    [
        ({"format": "nginx"}, "format", "must be one of"),
        ({"format": "openssl", "grace_period": 10}, "grace_period", "single key"),
        ({"identity": "{link}", "grace_period": 5}, "grace_period", "{epoch}"),
        ({"identity": "{local}.{epoch}"}, "identity", "unknown placeholder"),
        ({"identity_style": "cqptoolkit"}, "identity", "contains ':'"),
        ({"identity_style": "cqptoolkit", "identity": "{link}.{epoch}"}, "identity", "fixed by"),
        ({"role": "client", "probe": "127.0.0.1:1"}, "probe", "server-side"),
        ({"probe": "localhost"}, "probe", "HOST:PORT"),
        ({"probe": "localhost:\u00b2"}, "probe", "HOST:PORT"),
        ({"log_file": "l", "log_success": ""}, "log_success", "not be empty"),
        ({"log_file": "l", "log_success": "  "}, "log_success", "non-empty line"),
        ({"log_file": "l", "log_success": "Configuration successful "}, "log_success", "outer"),
        ({"log_file": "l", "log_failure": "failed\nConfiguration"}, "log_failure", "printable"),
        ({"pid_file": "p", "reload_command": ["true"]}, "reload_command", "either"),
        ({"reload_signal": "HUP"}, "reload_signal", "needs pid_file"),
        ({"pid_file": "p", "reload_signal": "NOPE"}, "reload_signal", "not a signal"),
        ({"grace_period": -1}, "grace_period", "at least"),
        ({"colour": "blue"}, "colour", "not a known option"),
        # stunnel only logs a rejected file: a reload nobody confirms is refused by default
        ({"pid_file": "p"}, "log_file", "confirm = 'none'"),
        ({"reload_command": ["true"]}, "log_file", "format 'stunnel' and a reload"),
        ({"role": "client", "pid_file": "p"}, "log_file", "probe = 'HOST:PORT'"),
        ({"pid_file": "p", "log_file": "l", "confirm": "none"}, "confirm", "contradicts"),
        ({"confirm": "never"}, "confirm", "must be one of"),
    ],
)
def test_config_errors(
    tmp_path: Path, h: Any, options: dict[str, Any], key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        h.make_sink(tmp_path, path=str(tmp_path / "psk"), **options)
    assert info.value.key == f"sinks.psk.{key}"
    assert message in info.value.message


def test_valid_combinations(tmp_path: Path, h: Any) -> None:
    sink = h.make_sink(
        tmp_path, path=str(tmp_path / "p"), format="gnutls", identity_style="cqptoolkit"
    )
    assert sink.identity_template.startswith("pkcs:object=")
    sink = h.make_sink(tmp_path, path=str(tmp_path / "p"), format="openssl")
    assert sink.grace == 0
    sink = h.make_sink(
        tmp_path,
        path=str(tmp_path / "p"),
        pid_file=str(tmp_path / "x.pid"),
        reload_signal="SIGUSR1",
        probe="[::1]:4433",
        probe_tls="1.3",
    )
    assert sink.probe_target == ("::1", 4433) and sink.reload_signal.name == "SIGUSR1"
    assert not (tmp_path / "state-psk").exists(), "constructing a sink must not touch the disk"


@pytest.mark.parametrize(
    "options",
    [
        {"pid_file": "p", "log_file": "l"},
        {"pid_file": "p", "probe": "127.0.0.1:4433"},
        {"reload_command": ["true"], "confirm": "none"},  # explicit opt-out
        {"format": "nghttpx", "pid_file": "p"},  # the rule is stunnel's
        {},  # no reload, nothing to confirm
    ],
)
def test_reload_confirmation_accepted(tmp_path: Path, h: Any, options: dict[str, Any]) -> None:
    h.make_sink(tmp_path, path=str(tmp_path / "psk"), **options)
