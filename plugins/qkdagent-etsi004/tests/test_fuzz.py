"""The frame-parser fuzz target (fuzz/fuzz_etsi004.py), short and derandomized."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TARGET = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_etsi004.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("qkdfuzz_etsi004", TARGET)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seeds_run() -> None:
    module = load()
    assert len(module.SEEDS) > 10
    for seed in module.SEEDS:
        module.target(seed)


def test_target_derandomized() -> None:
    module = load()
    spliced = st.tuples(
        st.sampled_from(module.SEEDS), st.binary(max_size=8), st.integers(0, 400)
    ).map(lambda t: t[0][: t[2]] + t[1] + t[0][t[2] :])
    truncated = st.tuples(st.sampled_from(module.SEEDS), st.integers(0, 400)).map(
        lambda t: t[0][: t[1]]
    )

    @settings(
        max_examples=1000,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(st.one_of(st.binary(max_size=400), spliced, truncated))
    def run(data: bytes) -> None:
        module.target(data)

    run()
