"""The pure parts: quPSKd's chain (a known-answer test computed by hand from REFERENCE §11, which
gives no recomputed example), the checks on peer answers, the timers, the link options."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest
from qkdagent_qupskd import chain, settings, timers, wire
from qkdagent_qupskd.timers import Action, Waits

from qkdagent import ConfigError, Options

KEY_ID = "0b5fd5a4-1d36-4c1a-9a3b-3b4b0f0e6c2a"


def test_chain_known_answers() -> None:
    # psk0 = H(["thisisverysecret", "quPSKd Version 1"]): sorted, "quPSKd..." (q) < "this..." (t)
    assert (
        hashlib.sha3_256(b"quPSKd Version 1thisisverysecret").hexdigest()
        == "300461c09a0fe9b89a00955ab46a95d177a31a2d43a3031bc3502e5e036cae11"
    )
    psk0 = "MARhwJoP6biaAJVatGqV0XejGi1DowMbw1AuXgNsrhE="
    assert chain.initial("thisisverysecret") == psk0
    assert (
        chain.initial(None) == chain.initial("") == "aVu7vsJcDkMeEq+9mElSZHzlgcZWoTc/yai3ZyQYCw0="
    )
    # quPSKd's fake KME: key = base64(SHA3-256(key_ID)); the three parts sort as "0E" < "0b" < "M"
    kme_key = hashlib.sha3_256(KEY_ID.encode()).digest()
    key_b64 = "0ELzO1jveItjdRSrLdxjHfTqQ1GjRDiOa7Dyg8vjio8="
    assert base64.b64encode(kme_key).decode() == key_b64
    joined = (key_b64 + KEY_ID + psk0).encode()
    psk1 = base64.b64encode(hashlib.sha3_256(joined).digest()).decode()
    assert psk1 == "apxjBBOtZLMvmABvHx3NAqQCGr2ZWsGrNKdeXC0fcCA="
    assert chain.advance(psk0, kme_key, KEY_ID) == psk1
    # the sinks get the 32 bytes; base64 of them is quPSKd's 44-character file
    assert base64.b64encode(chain.secret_bytes(psk1)).decode() == psk1 and len(psk1) == 44


def test_chain_state_round_trips_and_refuses_garbage() -> None:
    state = chain.ChainState(chain.initial("x"), caller=False)
    assert chain.ChainState.decode(state.encode()) == state
    assert state.psk not in repr(state)
    for bad in (
        b"",
        b"[]",
        b'{"v": 2, "psk": "", "caller": true}',
        b'{"v": 1, "psk": "short", "caller": true}',
        b'{"v": 1, "psk": "' + b"!" * 44 + b'", "caller": true}',
        b'{"v": 1, "psk": "' + state.psk.encode() + b'", "caller": "yes"}',
        b"{" * 5000,
        b"[" * 4000,
    ):
        with pytest.raises(chain.ChainError):
            chain.ChainState.decode(bad)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"<html>", "not JSON"),
        (b"[1]", "not an object"),
        (b'{"key_ID": "a"}', "status"),
        (b'{"status": "error", "key_ID": "a"}', "status"),
        (b'{"status": "ok"}', "key_ID is missing"),
        (b'{"status": "ok", "key_ID": 5}', "key_ID is missing"),
        (b'{"status": "ok", "key_ID": ""}', "key_ID is missing"),
        (b'{"status": "ok", "key_ID": "' + b"k" * 257 + b'"}', "longer than 256"),
        (b'{"status": "ok", "key_ID": "a\\nb"}', "characters"),
        (b'{"status": "ok", "key_ID": "a=b"}', "characters"),
        (b'{"status": "ok", "key_ID": "' + b"k" * 20000 + b'"}', "larger than"),
        (b"[" * 5000, "nested too deeply"),
        (b'{"a":' * 3000, "nested too deeply"),
    ],
)
def test_hostile_key_answers_are_refused(body: bytes, problem: str) -> None:
    with pytest.raises(wire.WireError, match=problem):
        wire.parse_key_answer(body)


def test_good_answers_and_routes() -> None:
    assert wire.parse_key_answer(wire.key_answer(KEY_ID)) == KEY_ID
    wire.parse_ack(wire.ack_answer())
    with pytest.raises(wire.WireError):
        wire.parse_ack(wire.error_answer("no"))
    assert [wire.route("GET", p) for p in ("/new", "/rotate", "/ack")] == ["new", "rotate", "ack"]
    for method, target in (("POST", "/new"), ("GET", "/new?x"), ("GET", "//new"), ("GET", "/")):
        assert wire.route(method, target) is None


W = Waits(120, 130, 180)


@pytest.mark.parametrize(
    ("now", "since", "caller", "synced", "retry_at", "expected"),
    [
        # not synchronised (no state, after expiry): /new at once, unless backing off
        (0, 0, True, False, None, (Action.CALL, 0, True)),
        (5, 0, False, False, 7, (Action.WAIT, 7, False)),
        (7, 0, False, False, 7, (Action.CALL, 7, True)),
        # the last caller calls again after initiator_wait
        (119, 0, True, True, None, (Action.WAIT, 120, False)),
        (120, 0, True, True, None, (Action.CALL, 120, False)),
        # the last receiver steps in only after responder_wait
        (120, 0, False, True, None, (Action.WAIT, 130, False)),
        (130, 0, False, True, None, (Action.CALL, 130, False)),
        # failing calls back off, but never past max_wait
        (150, 0, True, True, 175, (Action.WAIT, 175, False)),
        (150, 0, True, True, 200, (Action.WAIT, 180, False)),
        (180, 0, True, True, 200, (Action.EXPIRE, 180, False)),
        (181, 0, False, True, None, (Action.EXPIRE, 181, False)),
    ],
)
def test_timer_decisions(
    now: float,
    since: float,
    caller: bool,
    synced: bool,
    retry_at: float | None,
    expected: tuple[Action, float, bool],
) -> None:
    decision = timers.decide(
        now, since=since, caller=caller, synced=synced, waits=W, retry_at=retry_at
    )
    assert (decision.action, decision.at, decision.new) == expected


def test_retry_delay_doubles_and_is_capped() -> None:
    assert [timers.retry_delay(n) for n in (0, 1, 2, 3, 4, 5, 40)] == [0, 1, 2, 4, 8, 15, 15]


def _read(tmp_path: Path, **table: Any) -> settings.Settings:
    base = {"listen": "127.0.0.1:5555", "peer_url": "http://127.0.0.1:5556"}
    options = Options({**base, **table}, where="links.a-b", base_dir=tmp_path)
    result = settings.read(options)
    options.finish()
    return result


def test_settings_defaults_follow_the_link_timers(tmp_path: Path) -> None:
    s = _read(tmp_path)
    assert s.waits(120, 180) == Waits(120, 130, 180)  # quPSKd's numbers from the link defaults
    assert s.waits(60, 100) == Waits(60, 70, 100)
    assert _read(tmp_path, responder_wait=125.0).waits(120, 180) == Waits(120, 125, 180)
    psk = tmp_path / "psk"
    psk.write_text("thisisverysecret\n")
    psk.chmod(0o600)
    s = _read(tmp_path, psk={"file": "psk"})  # relative: against the config's directory
    assert s.psk_text() == "thisisverysecret" and "thisisverysecret" not in repr(s)


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ({"listen": "5555"}, "listen.*HOST:PORT"),
        ({"listen": "host:99999"}, "listen"),
        ({"peer_url": "https://peer:5556"}, "peer_url.*http://"),
        ({"peer_url": "http://peer:5556/x"}, "peer_url.*without a path"),
        ({"peer_url": "http://user@peer:1"}, "peer_url"),
        ({"psk": "inline"}, "psk.*not accepted inline"),
        ({"initiator_wait": 200, "max_wait": 180}, "initiator_wait.*below max_wait"),
        ({"max_wait": -1}, "max_wait"),
        ({"bogus": 1}, "bogus.*not a known"),
    ],
)
def test_settings_errors_name_the_option(
    tmp_path: Path, table: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        _read(tmp_path, **table)
