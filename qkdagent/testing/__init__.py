"""Public test kit for qkdagent and its plugins.

- `MemoryPool`, `MemorySource`: a simulated key link shared by two agents in one process.
- `RecordingSink`: records installs and erasures (fingerprints only).
- `SinkContract`, `SourceContract`: conformance suites plugin tests subclass.
- `open_agent_pair`: two real agents over loopback HTTPS with mutual TLS (or in-process).
- `ManInTheMiddle`, `send_as`: a hostile network for in-process pairs (replay, forge, delay,
  corrupt, impersonate).
- `assert_not_leaked`: fails if any spelling of a secret occurs in a text.
- `write_test_pki`: a throw-away CA and leaf certificates for mutual TLS (simulators, tests).
- `config_toml`: a config dict (as `pair_configs` returns) as TOML text, for agent processes.

Fixtures live in `qkdagent.testing.pytest_plugin`; enable them with
`pytest_plugins = ["qkdagent.testing.pytest_plugin"]` in a conftest. The names that need pytest
are imported on first use, so the demo and the simulated sources work without pytest installed.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..pki import LeafFiles, PkiFiles, write_test_pki
from .agents import AgentPair, free_port, open_agent_pair, pair_configs
from .hostile import Exchange, ManInTheMiddle, send_as
from .local import LocalNetwork
from .memory import InstallRecord, MemoryPool, MemorySource, RecordingSink
from .toml import config_toml

_NEED_PYTEST = {
    "SinkContract": ".contracts",
    "SourceContract": ".contracts",
    "assert_not_leaked": ".contracts",
    "secret_spellings": ".contracts",
    "in_ci": ".require",
    "missing": ".require",
    "require_binary": ".require",
    "require_root": ".require",
}


def __getattr__(name: str) -> Any:
    module = _NEED_PYTEST.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


__all__ = [
    "AgentPair",
    "Exchange",
    "InstallRecord",
    "LeafFiles",
    "LocalNetwork",
    "ManInTheMiddle",
    "MemoryPool",
    "MemorySource",
    "PkiFiles",
    "RecordingSink",
    "SinkContract",
    "SourceContract",
    "assert_not_leaked",
    "config_toml",
    "free_port",
    "in_ci",
    "missing",
    "open_agent_pair",
    "pair_configs",
    "require_binary",
    "require_root",
    "secret_spellings",
    "send_as",
    "write_test_pki",
]
