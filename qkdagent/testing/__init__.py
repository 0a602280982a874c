"""Public test kit for qkdagent and its plugins.

- `MemoryPool`, `MemorySource`: a simulated key link shared by two agents in one process.
- `RecordingSink`: records installs and erasures (fingerprints only).
- `SinkContract`, `SourceContract`: conformance suites plugin tests subclass.
- `open_agent_pair`: two real agents over loopback HTTPS with mutual TLS.
- `assert_not_leaked`: fails if any spelling of a secret occurs in a text.

Fixtures live in `qkdagent.testing.pytest_plugin`; enable them with
`pytest_plugins = ["qkdagent.testing.pytest_plugin"]` in a conftest.
"""

from .agents import AgentPair, open_agent_pair, pair_configs
from .contracts import SinkContract, SourceContract, assert_not_leaked, secret_spellings
from .local import LocalNetwork
from .memory import InstallRecord, MemoryPool, MemorySource, RecordingSink
from .require import in_ci, missing, require_binary, require_root

__all__ = [
    "AgentPair",
    "InstallRecord",
    "LocalNetwork",
    "MemoryPool",
    "MemorySource",
    "RecordingSink",
    "SinkContract",
    "SourceContract",
    "assert_not_leaked",
    "in_ci",
    "missing",
    "open_agent_pair",
    "pair_configs",
    "require_binary",
    "require_root",
    "secret_spellings",
]
