"""Pure logic without sockets: key supply, KME network rules, retry decisions, wire parsing."""

from __future__ import annotations

import base64
import uuid

import pytest
from qkdagent_etsi014 import wire
from qkdagent_etsi014.network import ApiError, KeyRequest, KmeNetwork, Limits
from qkdagent_etsi014.retry import Backoff, Outcome, classify, settle_no_route

from qkdagent import CsprngSupply, SupplyExhausted


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_supply_refills_at_the_link_rate_up_to_capacity() -> None:
    clock = FakeClock()
    supply = CsprngSupply(rate_bps=1000, capacity_bits=4096, initial_bits=0, clock=clock)
    assert supply.available_bits() == 0
    with pytest.raises(SupplyExhausted):
        supply.take(8)
    clock.now += 0.5
    assert supply.available_bits() == 500
    assert len(supply.take(256)) == 32
    assert supply.available_bits() == 244
    clock.now += 3600
    assert supply.available_bits() == 4096  # bounded store
    assert len(supply.take(4096)) == 512 and supply.available_bits() == 0


def test_supply_never_invents_bits() -> None:
    supply = CsprngSupply(rate_bps=0, capacity_bits=1024, clock=FakeClock())
    for _ in range(4):
        supply.take(256)
    with pytest.raises(SupplyExhausted):
        supply.take(8)
    with pytest.raises(ValueError):
        supply.take(7)


def network(clock: FakeClock, **kwargs) -> KmeNetwork:
    return KmeNetwork(
        {"A": ["alice"], "B": ["bob", "dave"]},
        limits=Limits(max_key_count=10, max_key_per_request=4),
        clock=clock,
        **kwargs,
    )


def test_sync_delay_hides_keys_until_synchronised() -> None:
    clock = FakeClock()
    net = network(clock, rate_bps=0, sync_delay=0.5)
    [(key_id, value)] = net.enc_keys("A", "alice", "bob", KeyRequest())
    with pytest.raises(ApiError) as info:
        net.dec_keys("B", "bob", "alice", [key_id])
    assert (info.value.status, info.value.message) == (400, wire.MSG_KEYS_NOT_FOUND)
    clock.now += 0.5
    assert net.dec_keys("B", "bob", "alice", [key_id]) == [(key_id, value)]


def test_store_empties_then_refills_with_time() -> None:
    clock = FakeClock()
    net = network(clock, rate_bps=256, initial_fill=0.0)  # one 256-bit key per second
    with pytest.raises(ApiError) as info:
        net.enc_keys("A", "alice", "bob", KeyRequest())
    assert info.value.status == 503
    clock.now += 2
    assert len(net.enc_keys("A", "alice", "bob", KeyRequest(number=2))) == 2
    with pytest.raises(ApiError):
        net.enc_keys("A", "alice", "bob", KeyRequest())


def test_undelivered_keys_are_bounded_per_kme() -> None:
    clock = FakeClock()
    net = network(clock, rate_bps=1e9)
    first = net.enc_keys("A", "alice", "bob", KeyRequest(number=4))
    for _ in range(20):
        clock.now += 1
        net.enc_keys("A", "alice", "bob", KeyRequest(number=4))
    assert net.parked_count("B") == 40  # 4 x max_key_count
    with pytest.raises(ApiError):
        net.dec_keys("B", "bob", "alice", [first[0][0]])


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError):
        Limits(key_size=100).check()
    with pytest.raises(ValueError):
        Limits(min_key_size=512, key_size=256).check()
    with pytest.raises(ValueError):
        KmeNetwork({"A": ["x"], "B": ["x"]})


@pytest.mark.parametrize(
    ("operation", "status", "message", "outcome"),
    [
        ("enc_keys", None, None, Outcome.UNAVAILABLE),
        ("enc_keys", 503, "key data access error", Outcome.UNAVAILABLE),
        ("enc_keys", 200, None, Outcome.OK),
        ("enc_keys", 405, None, Outcome.METHOD),
        ("dec_keys", 501, None, Outcome.METHOD),
        ("dec_keys", 401, None, Outcome.UNAUTHORIZED),
        ("dec_keys", 400, wire.MSG_KEYS_NOT_FOUND, Outcome.NOT_FOUND),
        ("dec_keys", 400, "Key Not Found", Outcome.NOT_FOUND),
        ("dec_keys", 400, None, Outcome.NOT_FOUND),
        ("dec_keys", 404, "Key not found", Outcome.NOT_FOUND),
        ("dec_keys", 404, None, Outcome.NO_ROUTE),  # bare 404: maybe the method has no route
        ("enc_keys", 404, None, Outcome.NO_ROUTE),
        ("enc_keys", 404, "slave SAE unknown", Outcome.REJECTED),
        ("dec_keys", 400, "size shall be a multiple of 8", Outcome.REJECTED),
        ("enc_keys", 400, wire.MSG_KEYS_NOT_FOUND, Outcome.REJECTED),
        ("enc_keys", 500, None, Outcome.REJECTED),
    ],
)
def test_only_safe_answers_are_retried(operation, status, message, outcome) -> None:
    assert classify(operation, status, message) is outcome


def test_a_bare_404_settles_as_absent_once_the_other_method_is_ruled_out() -> None:
    assert settle_no_route("dec_keys") is Outcome.NOT_FOUND
    assert settle_no_route("enc_keys") is Outcome.REJECTED


def test_backoff_is_bounded() -> None:
    backoff = Backoff(tries=5, initial=0.1, cap=0.3)
    assert [backoff.next() for _ in range(6)] == [0.1, 0.2, 0.3, 0.3, 0.3, None]


def test_status_parsing_requires_every_field() -> None:
    net = network(FakeClock())
    status = net.status("A", "alice", "bob")
    assert wire.parse_status(status).max_key_per_request == 4
    for name in status:
        broken = dict(status)
        del broken[name]
        with pytest.raises(wire.WireError, match=name):
            wire.parse_status(broken)
    with pytest.raises(wire.WireError, match="key_size"):
        wire.parse_status({**status, "key_size": True})


def test_key_container_accepts_keys_and_Keys() -> None:
    item = {"key_ID": str(uuid.uuid4()), "key": base64.b64encode(b"k" * 32).decode()}
    for name in ("keys", "Keys"):
        [(key_id, raw)] = wire.parse_key_container({name: [item]}, number=1, size_bits=256)
        assert (key_id, raw) == (item["key_ID"], b"k" * 32)


def test_a_variant_member_name_is_short_and_reported_bounded() -> None:
    """Review finding: `k___...___ey` (a megabyte of underscores) passed as `key`, and the
    source's warning quoted and kept every such name. Variants are names of at most
    `MAX_VARIANT` characters, reported as at most 64 printable ones."""
    key = base64.b64encode(b"k" * 32).decode()
    seen: list[str] = []
    [(_, raw)] = wire.parse_key_container(
        {"keys": [{"KEY_id": str(uuid.uuid4()), "Key": key}]},
        number=1,
        size_bits=256,
        on_variant=seen.append,
    )
    assert raw == b"k" * 32 and seen == ["'KEY_id' for 'key_ID'", "'Key' for 'key'"]
    padded = "k" + "_" * (wire.MAX_VARIANT - 3) + "ey"  # 32 characters
    too_long = "k" + "_" * (wire.MAX_VARIANT - 2) + "ey"
    for name, accepted in ((padded, True), (too_long, False)):
        data = {"keys": [{"key_ID": str(uuid.uuid4()), name: key}]}
        if accepted:
            wire.parse_key_container(data, number=1, size_bits=256, on_variant=seen.append)
            assert len(seen[-1]) <= 66 + len(" for 'key'")
        else:
            with pytest.raises(wire.WireError, match="key is not a string"):
                wire.parse_key_container(data, number=1, size_bits=256)


def test_error_message_is_sanitised_and_bounded() -> None:
    assert wire.error_message(b'{"message": "a\\u0000b"}') == "a?b"
    assert wire.error_message(b"not json") is None
    assert len(wire.error_message(('{"message": "%s"}' % ("x" * 999)).encode()) or "") == 203
