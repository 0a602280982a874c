"""The qkdagent-tlspsk plugin's fuzz target, for run_fuzz.py and tests/test_fuzz.py.

The target lives with its plugin (plugins/qkdagent-tlspsk/fuzz/), next to the parsers it
exercises; this file only makes the runner find it.
"""

from __future__ import annotations

from pathlib import Path

from engine import load_target

_PLUGIN = load_target(
    Path(__file__).resolve().parents[2]
    / "plugins"
    / "qkdagent-tlspsk"
    / "fuzz"
    / "fuzz_tlspsk_files.py"
)
target = _PLUGIN.target
SEEDS = list(_PLUGIN.SEEDS)
FORMAT = getattr(_PLUGIN, "FORMAT", None)
