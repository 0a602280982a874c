"""The example configs in contrib/config pass `qkdagent check` once their files exist."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

import pytest

from qkdagent.cli import main
from qkdagent.pki import write_test_pki
from qkdagent.plugins import installed
from qkdagent.testing import missing

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "contrib" / "config").glob("*.toml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_config_checks(
    example: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = example.read_text()
    needed = set(re.findall(r"^plugins = \[(.*)\]", text, re.M)[0].replace('"', "").split(", "))
    absent = needed - set(installed())
    if absent:
        missing(f"plugins {sorted(absent)} are not installed")
    etc = tmp_path / "etc"
    text = text.replace("/etc/qkdagent/", f"{etc}/").replace("/var/lib/qkdagent", str(tmp_path))
    text = text.replace("/usr/local/lib/qkdagent/hooks/", str(example.parents[2] / "hooks") + "/")
    for placeholder in set(re.findall(r'"(REPLACE_WITH_[A-Z0-9_]+=)"', text)):
        text = text.replace(placeholder, base64.b64encode(os.urandom(32)).decode())
    pki = write_test_pki(etc, [])
    for path in set(re.findall(rf"{re.escape(str(etc))}/[\w.-]+", text)):
        target = Path(path)
        if target.suffix == ".bootstrap":
            target.write_bytes(base64.b64encode(os.urandom(32)))
            target.chmod(0o600)
        elif not target.exists():
            target.write_bytes(pki.ca_cert.read_bytes())
    config = tmp_path / example.name
    config.write_text(text)
    assert main(["check", "-c", str(config)]) == 0, capsys.readouterr().err
    assert "OK" in capsys.readouterr().out
