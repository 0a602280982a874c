"""Writing agent configs as TOML files, for tests and benchmarks that run agents as processes."""

from __future__ import annotations

import json
import tomllib
from typing import Any


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def config_toml(config: dict[str, Any]) -> str:
    """TOML text for a config dict shaped like `pair_configs` returns (round-trip checked)."""
    lines: list[str] = []
    for section, body in config.items():
        if section == "agent":
            lines.append("[agent]")
            lines += [f"{k} = {toml_value(v)}" for k, v in body.items() if k != "tls"]
            lines.append("[agent.tls]")
            lines += [f"{k} = {toml_value(v)}" for k, v in body["tls"].items()]
        else:
            for name, table in body.items():
                lines.append(f"[{section}.{name}]")
                lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    text = "\n".join(lines) + "\n"
    if tomllib.loads(text) != config:
        raise ValueError("config does not survive a TOML round trip")
    return text
