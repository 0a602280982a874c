"""Public test kit for qkdagent and its plugins.

- `MemoryPool`, `MemorySource`: a simulated key link shared by two agents in one process.
- `RecordingSink`: records installs and erasures (fingerprints only).
- `SinkContract`, `SourceContract`: conformance suites plugin tests subclass.
- `build_component`, `running`: one source or sink built from its config table, prepared and
  run (and closed) exactly as the agent does.
- `open_agent_pair`: two real agents over loopback HTTPS with mutual TLS (or in-process).
- `ManInTheMiddle`, `send_as`: a hostile network for in-process pairs (replay, forge, delay,
  corrupt, impersonate).
- `assert_not_leaked`: fails if any spelling of a secret occurs in a text.
- `write_test_pki`: a throw-away CA and leaf certificates for mutual TLS (simulators, tests).
- `config_toml`: a config dict (as `pair_configs` returns) as TOML text, for agent processes.
- `AgentProcess`, `process_pair`, `wait_until`, `CRASH_POINTS`, `CRASH_EXIT_CODE`: agents as
  real processes, crashed at a rotation step with `QKDAGENT_CRASH_AT` and restarted.
- `qkdagent.testing.h1`: HTTP/1.1 parses compared whole against split (fuzzing the parsers).

Fixtures live in `qkdagent.testing.pytest_plugin`; enable them with
`pytest_plugins = ["qkdagent.testing.pytest_plugin"]` in a conftest. The kit needs pytest; the
agent, the CLI and the demo never import it (the simulated sources live in `qkdagent.builtin`).
"""

from __future__ import annotations

from ..builtin.loopback import free_port, pair_configs
from ..faults import CRASH_EXIT_CODE
from ..faults import POINTS as CRASH_POINTS
from ..pki import LeafFiles, PkiFiles, write_test_pki
from .agents import AgentPair, open_agent_pair
from .components import build_component, running
from .contracts import SinkContract, SourceContract, assert_not_leaked, secret_spellings
from .fuzzloop import mutation_loop, selecting_target
from .hostile import Exchange, ManInTheMiddle, send_as
from .local import LocalNetwork
from .memory import InstallRecord, KeyDirSource, MemoryPool, MemorySource, RecordingSink
from .procs import AgentProcess, process_pair, wait_until
from .require import in_ci, missing, require_binary, require_root
from .tlsfiles import encrypted_key_copy
from .toml import config_toml

__all__ = [
    "CRASH_EXIT_CODE",
    "CRASH_POINTS",
    "AgentPair",
    "AgentProcess",
    "Exchange",
    "InstallRecord",
    "KeyDirSource",
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
    "build_component",
    "config_toml",
    "encrypted_key_copy",
    "free_port",
    "in_ci",
    "missing",
    "mutation_loop",
    "open_agent_pair",
    "pair_configs",
    "process_pair",
    "require_binary",
    "require_root",
    "running",
    "secret_spellings",
    "selecting_target",
    "send_as",
    "wait_until",
    "write_test_pki",
]
