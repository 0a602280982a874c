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

EXAMPLES = sorted(
    p
    for p in (Path(__file__).resolve().parent.parent / "contrib").glob("*/*.toml")
    if p.name != "pyproject.toml"  # the plugin template's packaging, not an agent config
)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_config_checks(
    example: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = example.read_text()
    needed = set(re.findall(r"^plugins = \[(.*)\]", text, re.M)[0].replace('"', "").split(", "))
    absent = needed - set(installed())
    if absent:
        missing(f"plugins {sorted(absent)} are not installed")
    hooks = example.parents[2] / "hooks"
    text = text.replace("/usr/local/lib/qkdagent/hooks/", f"{hooks}/")
    # every other absolute path moves under tmp_path; key material is made up for it
    pki = write_test_pki(tmp_path / "pki", ["agent"])  # check loads the cert, key and CA
    for path in sorted(set(re.findall(r'"(/[^"]+)"', text)), key=len, reverse=True):
        if path.startswith(str(hooks)):
            continue
        moved = tmp_path / "root" / path.lstrip("/")
        moved.parent.mkdir(parents=True, exist_ok=True)
        if "bootstrap" in moved.name or "channel" in moved.name:  # a shared base64 secret
            moved.write_bytes(base64.b64encode(os.urandom(32)))
            moved.chmod(0o600)
        elif moved.suffix == ".mlkem":  # an ML-KEM private key: its 64-byte seed, base64
            moved.write_bytes(base64.b64encode(os.urandom(64)))
            moved.chmod(0o600)
        elif moved.suffix == ".key":
            moved.write_bytes(pki["agent"].key.read_bytes())
            moved.chmod(0o600)
        elif moved.suffix in (".pem", ".crt"):
            is_ca = "ca" in moved.stem.split("-")
            moved.write_bytes((pki.ca_cert if is_ca else pki["agent"].cert).read_bytes())
        text = text.replace(f'"{path}"', f'"{moved}"')
    # after the paths: a random key starting with "/" would otherwise look like one
    for placeholder in set(re.findall(r'"(REPLACE_WITH_[A-Z0-9_]+=)"', text)):
        text = text.replace(placeholder, base64.b64encode(os.urandom(32)).decode())
    config = tmp_path / example.name
    config.write_text(text)
    assert main(["check", "-c", str(config)]) == 0, capsys.readouterr().err
    assert "OK" in capsys.readouterr().out
