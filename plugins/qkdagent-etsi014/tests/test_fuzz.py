"""The ETSI 014 fuzz targets of contrib/fuzz, short and derandomized (the full runs, a million
inputs each, are `python3 contrib/fuzz/run_fuzz.py --target etsi014_client` / `etsi014_sim`).

test_hostile.py fuzzes the simulator's answers over ASGI and HTTPS (no 5xx, nothing consumed);
these run the same parser entry points as the long runs, plus the inputs those runs found."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = Path(__file__).resolve().parents[3] / "contrib" / "fuzz"
TARGETS = ["etsi014_client", "etsi014_sim"]

FOUND = [
    b"1" * 4400,  # int() refuses over 4300 digits: a ValueError that was no WireError
    b'{"keys": [{"key_ID": "\\ud800", "key": ""}]}',  # lone surrogate: UnicodeEncodeError
    b'{"key_IDs": [{"key_ID": "\\ud800"}]}',  # ... and the simulator answered 500
    b"[" * 5000,
    b'{"keys": ' * 3000,
]
"""Inputs the long runs (or issue 11) found; each crashed a target before its fix."""


def load(name: str) -> ModuleType:
    path = FUZZ / f"fuzz_{name}.py"
    spec = importlib.util.spec_from_file_location(f"qkdfuzz_{name}", path)
    assert spec is not None and spec.loader is not None, f"no fuzz target at {path}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def documents(names: list[str]) -> st.SearchStrategy[bytes]:
    """JSON texts built from the protocol's member names: most reach past the JSON parser."""
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=40)
    )
    keys = st.sampled_from(names) | st.text(max_size=8)
    values = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
        max_leaves=16,
    )
    return values.map(lambda value: json.dumps(value).encode())


@pytest.fixture(params=TARGETS)
def module(request: pytest.FixtureRequest) -> ModuleType:
    return load(request.param)


def test_seeds_are_accepted(module: ModuleType) -> None:
    assert module.SEEDS
    for seed in module.SEEDS:
        module.target(seed)


@pytest.mark.parametrize("data", FOUND, ids=range(len(FOUND)))
def test_found_inputs_no_longer_crash(module: ModuleType, data: bytes) -> None:
    module.target(data)


def test_target_derandomized(module: ModuleType) -> None:
    names = [t.decode().strip('"') for t in module.DICTIONARY if t.startswith(b'"')]
    inputs = st.one_of(
        st.binary(max_size=256),
        st.sampled_from(module.SEEDS),
        documents(names),
        st.tuples(st.sampled_from(module.SEEDS), st.binary(max_size=8), st.integers(0, 200)).map(
            lambda t: t[0][: t[2]] + t[1] + t[0][t[2] :]
        ),
    )

    @settings(
        max_examples=500,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(inputs)
    def run(data: bytes) -> None:
        module.target(data)

    run()
