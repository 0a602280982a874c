"""The qkdagent-etsi004 plugin's fuzz target, for run_fuzz.py and tests/test_fuzz.py.

The target lives with its plugin (plugins/qkdagent-etsi004/fuzz/), next to the parser it
exercises; this file only makes the runner find it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_PLUGIN = Path(__file__).resolve().parents[2] / "plugins" / "qkdagent-etsi004"
_PATH = _PLUGIN / "fuzz" / "fuzz_etsi004.py"
_spec = importlib.util.spec_from_file_location("plugin_fuzz_etsi004", _PATH)
assert _spec is not None and _spec.loader is not None
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)

target = _module.target
SEEDS = _module.SEEDS
FORMAT = getattr(_module, "FORMAT", None)
if hasattr(_module, "STRATEGY"):
    STRATEGY = _module.STRATEGY
