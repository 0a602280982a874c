"""The simulators' key-supply seam: the spec a `--supply` flag takes, the entry-point lookup and
the default CSPRNG supply."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdagent import (
    CsprngSupply,
    SupplyExhausted,
    load_supply_factory,
    parse_supply_spec,
)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("bb84", ("bb84", {})),
        ("bb84:", ("bb84", {})),
        ("bb84:distance_km=10,seed=7", ("bb84", {"distance_km": "10", "seed": "7"})),
        ("x-y:a=,b=1=2", ("x-y", {"a": "", "b": "1=2"})),
    ],
)
def test_a_spec_is_a_name_and_options(spec: str, expected: tuple[str, dict[str, str]]) -> None:
    assert parse_supply_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("", "supply name"),
        ("BB84", "supply name"),
        ("bb84:distance", "not KEY=VALUE"),
        ("bb84:a=1,a=2", "given twice"),
        ("bb84:A=1", "not KEY=VALUE"),
        ("bb84:a=\n", "NAME[:KEY=VALUE"),
        ("b" * 2000, "NAME[:KEY=VALUE"),
    ],
)
def test_a_bad_spec_says_what_is_wrong(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("[", r"\[")):
        parse_supply_spec(spec)


@given(st.text(max_size=200))
def test_any_spec_parses_or_is_a_value_error(spec: str) -> None:
    try:
        name, options = parse_supply_spec(spec)
    except ValueError:
        return
    assert spec.startswith(name) and all(f"{k}={v}" in spec for k, v in options.items())


def test_an_unknown_supply_names_the_installed_ones() -> None:
    with pytest.raises(ValueError, match="no key supply 'nonesuch' is installed"):
        load_supply_factory("nonesuch", {})


def test_the_csprng_supply_refills_at_its_rate_and_refuses_overdraw() -> None:
    now = [0.0]
    supply = CsprngSupply(rate_bps=800, capacity_bits=1600, initial_bits=0, clock=lambda: now[0])
    with pytest.raises(SupplyExhausted):
        supply.take(8)
    now[0] = 1.0
    assert supply.available_bits() == 800
    first, second = supply.take(256), supply.take(256)
    assert len(first) == 32 and first != second
    assert supply.available_bits() == 800 - 512
    now[0] = 100.0
    assert supply.available_bits() == 1600  # never above the store's capacity
    supply.drain()
    assert supply.available_bits() == 0
