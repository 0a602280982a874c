"""The `bb84` key supply for kme-sim / qkdm-sim: options, store, aborts, the entry point."""

from __future__ import annotations

import time

import pytest
from qkdagent import SupplyExhausted, load_supply_factory, parse_supply_spec

from qkdagent_bb84.supply import Bb84Supply, make_supply_factory, parse_options

FAST = {"decoys": "false", "block_bits": "4000", "seed": "7"}


def supply(options: dict[str, str], **kw: object) -> Bb84Supply:
    settings, capacity, rate, seed = parse_options(options)
    return Bb84Supply(
        settings,
        capacity_bits=capacity,
        pulse_rate_hz=rate,
        seed=seed or 1,
        background=False,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"distance_km": "-1"}, "distance_km: must be between"),
        ({"distance_km": "nan"}, "distance_km: must be between"),
        ({"mu": "lots"}, "mu: not a number"),
        ({"block_bits": "1e6"}, "block_bits: not an integer"),
        ({"block_bits": "10"}, "block_bits: must be between"),
        ({"decoys": "maybe"}, "decoys: true or false"),
        ({"cascade": "ldpc"}, "cascade: one of"),
        ({"colour": "red"}, "unknown bb84 supply option 'colour'"),
        ({"mu": "0.1", "decoy_mu": "0.2"}, "decoy_mu"),
        ({"seed": "9" * 30}, "seed: not an integer"),
    ],
)
def test_bad_options_are_refused_with_a_clear_message(
    options: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_supply_factory(options)


def test_blocks_fill_the_store_and_take_hands_each_bit_out_once() -> None:
    now = [0.0]
    s = supply(FAST, clock=lambda: now[0])
    with pytest.raises(SupplyExhausted):
        s.take(8)
    s.produce_once()
    s.produce_once()
    now[0] = 1.0  # the link (at 1 GHz) has sent both blocks' pulses
    level = s.available_bits()
    assert level == s.key_bits > 0 and s.blocks == 2
    first, second = s.take(64), s.take(level - 64 - (level - 64) % 8)
    assert len(first) == 8 and first not in second
    with pytest.raises(SupplyExhausted):
        s.take(level)
    with pytest.raises(ValueError):
        s.take(7)
    assert "key" not in repr(s).lower()


def test_an_eavesdropped_link_supplies_nothing() -> None:
    s = supply({**FAST, "eve_intercept": "1"})
    result = s.produce_once()
    assert result.status.startswith("abort") and s.aborted == 1
    assert s.available_bits() == 0


def test_keys_appear_at_the_simulated_link_rate() -> None:
    now = [0.0]
    s = supply({**FAST, "pulse_rate_hz": "1000"}, clock=lambda: now[0])
    result = s.produce_once()
    assert result.ok and s.available_bits() == 0  # the link has not sent those pulses yet
    now[0] = result.pulses / 1000
    assert s.available_bits() == result.key_bits


def test_the_entry_point_makes_a_supply_that_fills_in_the_background() -> None:
    name, options = parse_supply_spec("bb84:decoys=false,block_bits=4000,capacity_bits=4000")
    factory = load_supply_factory(name, options)
    link = factory("kme-a", "kme-b")
    try:
        deadline = time.monotonic() + 60
        while link.available_bits() < 4000 and time.monotonic() < deadline:  # worker thread
            time.sleep(0.01)
        assert link.available_bits() >= 4000
        assert len(link.take(4000)) == 500
    finally:
        link.close()  # type: ignore[attr-defined]


def test_a_seed_gives_each_link_its_own_reproducible_keys() -> None:
    factory = make_supply_factory(FAST)
    a, b, a2 = (factory(*ends) for ends in (("x", "y"), ("x", "z"), ("x", "y")))
    for s in (a, b, a2):
        s._background = False  # type: ignore[attr-defined]
        s.produce_once()  # type: ignore[attr-defined]
    assert a.take(64) == a2.take(64) != b.take(64)
