"""Connection admission decisions of the peer server (pure; `qkdagent/admission.py`)."""

from __future__ import annotations

from qkdagent.admission import (
    BUSY,
    HANDSHAKING,
    HELLO,
    IDLE,
    Admission,
    Tally,
    TokenBuckets,
    Verdict,
    address_key,
    connection_caps,
)


def test_address_buckets() -> None:
    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("2001:db8:1:2:3:4:5:6") == address_key("2001:db8:1:2:ffff::1")
    assert address_key("2001:db8:1:2::1") != address_key("2001:db8:1:3::1")
    assert address_key("fe80::1%eth0") == "fe80::/64"
    assert address_key("not an address") == "not an address"


def test_oldest_handshaking_connection_is_evicted_for_a_new_one() -> None:
    adm = Admission(max_connections=100, max_per_address=100, max_handshaking=3)
    for n in range(3):
        assert adm.admit(f"attacker{n}", "198.51.100.1").admit
    verdict = adm.admit("peer", "192.0.2.2")
    assert verdict.admit and verdict.evict == (("attacker0", "handshaking-full"),)
    assert adm.count(HANDSHAKING) == 3
    assert adm.established("peer")
    assert adm.count(IDLE) == 1 and adm.count(HANDSHAKING) == 2


def test_silent_sockets_are_evicted_before_a_handshake_under_way() -> None:
    adm = Admission(max_connections=100, max_per_address=100, max_handshaking=4)
    adm.admit("peer", "192.0.2.2")
    assert adm.hello("peer")  # its ClientHello arrived
    for n in range(1000):  # idle sockets reopened in a loop
        verdict = adm.admit(f"x{n}", "198.51.100.1")
        assert verdict.admit and all(victim != "peer" for victim, _ in verdict.evict)
    assert adm.count(HELLO) == 1 and adm.count(HANDSHAKING) == 3
    assert adm.established("peer")
    for n in range(4):  # many handshakes under way: the oldest of them goes
        adm.admit(f"h{n}", "198.51.100.1")
        adm.hello(f"h{n}")
    assert adm.admit("h4", "198.51.100.1").evict == (("h0", "handshaking-full"),)


def test_established_connections_are_never_evicted_for_handshakes() -> None:
    adm = Admission(max_connections=4, max_per_address=100, max_handshaking=2)
    for n in range(2):
        adm.admit(f"peer{n}", "192.0.2.2")
        adm.established(f"peer{n}")
        adm.busy(f"peer{n}")
    for n in range(50):  # a flood of handshakes only ever evicts handshakes
        verdict = adm.admit(f"x{n}", "198.51.100.1")
        assert verdict.admit
        assert all(victim.startswith("x") for victim, _ in verdict.evict)
    assert adm.count(BUSY) == 2 and len(adm) == 4


def test_when_full_the_longest_idle_connection_goes_busy_ones_stay() -> None:
    adm = Admission(max_connections=3, max_per_address=100, max_handshaking=3)
    for name in ("a", "b", "c"):
        adm.admit(name, "192.0.2.2")
        adm.established(name)
    adm.busy("a")
    adm.busy("b")
    adm.idle("b")  # b idle since now, c since earlier
    verdict = adm.admit("d", "192.0.2.3")
    assert verdict.admit and verdict.evict == (("c", "full"),)
    adm.established("d")
    adm.busy("b")
    adm.busy("d")
    verdict = adm.admit("e", "192.0.2.4")
    assert not verdict.admit and verdict.reason == "full" and verdict.evict == ()


def test_per_address_cap_evicts_that_address_first_then_refuses() -> None:
    adm = Admission(max_connections=100, max_per_address=2, max_handshaking=100)
    adm.admit("other", "192.0.2.9")
    adm.admit("a1", "198.51.100.1")
    adm.admit("a2", "198.51.100.1")
    verdict = adm.admit("a3", "198.51.100.1")
    assert verdict.admit and verdict.evict == (("a1", "per-address"),)
    for name in ("a2", "a3"):
        adm.established(name)
        adm.busy(name)
    verdict = adm.admit("a4", "198.51.100.1")
    assert not verdict.admit and verdict.reason == "per-address"
    assert adm.admit("b1", "198.51.100.2").admit  # other addresses are not affected
    assert len(adm) == 4


def test_closed_and_evicted_connections_free_their_slots() -> None:
    adm = Admission(max_connections=2, max_per_address=2, max_handshaking=2)
    adm.admit("a", "192.0.2.1")
    adm.admit("b", "192.0.2.1")
    victim = adm.shed()
    assert victim == "a"
    adm.closed("a")  # its task ends later: a no-op
    assert not adm.established("a")
    adm.closed("b")
    assert len(adm) == 0 and adm.shed() is None
    assert adm.admit("c", "192.0.2.1").evict == ()


def test_caps_stay_below_the_descriptor_limit() -> None:
    assert connection_caps(512, 128, soft_nofile=1024, reserve=256) == (512, 128)
    assert connection_caps(4096, 1024, soft_nofile=1024, reserve=256) == (768, 384)
    assert connection_caps(512, 128, soft_nofile=65536, reserve=256) == (512, 128)
    assert connection_caps(512, 128, soft_nofile=100, reserve=256) == (8, 4)


def test_tally_counts_everything_but_logs_only_a_few_lines_per_period() -> None:
    tally = Tally(lines_per_period=3)
    logged = [tally.refuse(403) for _ in range(5)] + [tally.drop("handshake-timeout")]
    assert logged == [True, True, True, False, False, False]
    line = tally.summary()
    assert line == ("refused 5 requests, dropped 1 connections (5 x 403, 1 x handshake-timeout)")
    assert tally.summary() is None
    assert tally.drop("full")  # a new period, a new budget


def test_token_buckets_refill_per_key_and_forget_the_least_recent() -> None:
    buckets = TokenBuckets(rate=2, burst=3, max_keys=2)
    assert [buckets.take("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert buckets.take("b", 0.0)  # another key has its own budget
    assert not buckets.take("a", 0.25)  # half a token is not one
    assert buckets.take("a", 0.5) and not buckets.take("a", 0.5)
    assert buckets.take("a", 100.0) and buckets.take("a", 100.0) and buckets.take("a", 100.0)
    assert not buckets.take("a", 100.0)  # refilled to the burst, no more
    buckets.take("c", 100.0)  # a third key: "b", used least recently, is forgotten
    assert len(buckets) == 2


def test_churn_budget_refuses_newcomers_instead_of_evicting_beyond_it() -> None:
    churn = TokenBuckets(rate=1, burst=2)
    adm = Admission(max_connections=100, max_per_address=100, max_handshaking=2, churn=churn)
    for n in range(2):  # not crowded yet: no token spent
        assert adm.admit(f"held{n}", "198.51.100.1", now=0).admit
    assert len(churn) == 0
    evicting = [adm.admit(f"x{n}", "198.51.100.1", now=0) for n in range(4)]
    assert [v.admit for v in evicting] == [True, True, False, False]
    assert evicting[2] == Verdict(False, reason="churn")  # nothing evicted for it
    peer = adm.admit("peer", "192.0.2.2", now=0)  # another address keeps its budget
    assert peer.admit and peer.evict == (("x0", "handshaking-full"),)
    assert adm.admit("x9", "198.51.100.1", now=1).admit  # a second later: one more token


def test_churn_budget_is_not_spent_on_established_connections() -> None:
    churn = TokenBuckets(rate=1, burst=1)
    adm = Admission(max_connections=3, max_per_address=100, max_handshaking=2, churn=churn)
    for n in range(3):
        adm.admit(f"peer{n}", "192.0.2.2", now=0)
        adm.established(f"peer{n}")
    for n in range(5):  # full of idle peers only: the oldest idle one goes, no budget needed
        verdict = adm.admit(f"new{n}", "192.0.2.2", now=0)
        assert verdict.admit
        adm.established(f"new{n}")
    assert len(churn) == 0


def test_token_buckets_delay_queues_reservations_at_the_rate() -> None:
    buckets = TokenBuckets(rate=10, burst=2)
    assert [buckets.delay("a", 0.0) for _ in range(2)] == [0.0, 0.0]  # the burst
    waits = [buckets.delay("a", 0.0) for _ in range(3)]  # then one every 0.1 s, in turn
    assert [round(w, 6) for w in waits] == [0.1, 0.2, 0.3]
    assert buckets.delay("b", 0.0) == 0.0  # other addresses are not held up
    assert round(buckets.delay("a", 0.3), 6) == 0.1  # the queue drains at the rate
    assert buckets.delay("a", 10.0) == 0.0  # and refills up to the burst


def test_an_address_out_of_stranger_tokens_is_refused_at_accept_until_one_is_back() -> None:
    strangers = TokenBuckets(rate=1, burst=2)
    adm = Admission(max_connections=100, max_per_address=100, max_handshaking=100,
                    strangers=strangers)  # fmt: skip
    for n in range(2):  # two handshakes whose certificates named no peer
        assert adm.admit(f"s{n}", "198.51.100.1", now=0).admit
        adm.stranger("198.51.100.1", now=0)
        adm.closed(f"s{n}")
    assert adm.admit("s2", "198.51.100.1", now=0) == Verdict(False, reason="stranger")
    assert adm.admit("peer", "192.0.2.2", now=0).admit  # other addresses are not held up
    assert adm.admit("s3", "198.51.100.1", now=1).admit  # a token is back
    assert strangers.peek("198.51.100.1", 1) == 1 and strangers.peek("unseen", 0) == 2
