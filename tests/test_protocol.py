"""Peer message parsing under hostile input, authenticated refusals, and the message vectors."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
from pathlib import Path

import pytest

from qkdagent import protocol, ratchet
from qkdagent.errors import ProtocolError
from qkdagent.secret import Secret

VECTORS = json.loads((Path(__file__).parent / "vectors" / "messages.json").read_text())


def _enc(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">I", len(data)) + data


def _mac(key_hex: str, label: str, fields: dict) -> str:
    body = json.dumps(
        {k: v for k, v in fields.items() if k != "mac"}, sort_keys=True, separators=(",", ":")
    ).encode()
    mac = hmac.new(bytes.fromhex(key_hex), _enc(label) + body, hashlib.sha3_256).digest()
    return base64.b64encode(mac).decode()


def test_message_vectors_match_an_independent_implementation() -> None:
    rotate = json.loads(VECTORS["rotate"])
    assert rotate["mac"] == _mac(VECTORS["auth_key"], "qkdagent v1 message", rotate)
    refusal = json.loads(VECTORS["refusal"])
    assert refusal["mac"] == _mac(VECTORS["bootstrap_auth_key"], "qkdagent v1 refusal", refusal)
    digest = hashlib.sha3_256(VECTORS["rotate"].encode()).digest()
    assert base64.b64decode(refusal["request"]) == digest


def test_message_vectors_match_qkdagent() -> None:
    start = ratchet.chain_start(Secret(bytes.fromhex(VECTORS["bootstrap"])), VECTORS["link"])
    assert start.auth_key.reveal().hex() == VECTORS["bootstrap_auth_key"]
    message = protocol.parse(VECTORS["rotate"].encode(), expect=("rotate",))
    assert protocol.verify_mac(message, Secret(bytes.fromhex(VECTORS["auth_key"])))
    assert message.labels == ("wg0", "wg0-audit")
    refusal = protocol.parse_refusal(VECTORS["refusal"].encode())
    assert protocol.verify_refusal(refusal, bootstrap_auth=start.auth_key, link="alice-bob",
                                   sender="bob", receiver="alice",
                                   request=VECTORS["rotate"].encode())  # fmt: skip
    assert (refusal.code, refusal.epoch) == ("epoch", 7)


_EXTRA = {
    "rotate": {"keys": [["s", 'k,"nonce":']], "labels": ["r"], "nonce": b"n" * 32},
    "resync": {"keys": [["s", "k"]], "labels": [], "nonce": b"n" * 32},
    "rotate-reply": {"nonce": b"n" * 32, "request_nonce": b"r" * 32, "confirm": b"c" * 32,
                     "answers": [["s", "QUJD"]]},
    "resync-reply": {"nonce": b"n" * 32, "request_nonce": b"r" * 32, "confirm": b"c" * 32,
                     "answers": []},
    "commit": {"nonce": b"n" * 32, "confirm": b"c" * 32},
    "commit-reply": {"request_nonce": b"r" * 32},
    "announce": {"keys": [["s", "k"]], "nonce": b"n" * 32},
    "announce-reply": {"request_nonce": b"r" * 32},
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(_EXTRA))
@pytest.mark.parametrize("name", ["alice", 'a,"nonce":"x', "x\\", ',"to":', "é\u2028", "l" * 128])
def test_a_built_message_is_its_own_canonical_encoding(kind: str, name: str) -> None:
    """`build` puts the MAC into the encoding without it; the result is exactly the canonical
    encoding of all its fields, whatever the names hold, and its MAC verifies."""
    key = Secret(bytes(range(32)))
    body = protocol.build(kind, link=name, sender=name, receiver="bob", epoch=3, auth_key=key,
                          **_EXTRA[kind])  # fmt: skip
    fields = json.loads(body)
    assert body == protocol.canonical(fields)
    assert fields["mac"] == _mac(key.reveal().hex(), "qkdagent v1 message", fields)
    assert protocol.verify_mac(protocol.parse(body, expect=(kind,)), key)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 5000,
        b"{" * 5000,
        b'{"a":' * 3000 + b"1" + b"}" * 3000,
        b"[" * 9 + b"]" * 9,
        b'{"kind":"rotate","x":' + b"[" * 20 + b"]" * 20 + b"}",
    ],
)
def test_pathological_nesting_is_a_protocol_error(body: bytes) -> None:
    for expect in (("rotate",), ("rotate-reply",), ("commit",)):
        with pytest.raises(ProtocolError, match="nested deeper"):
            protocol.parse(body, expect=expect)
    with pytest.raises(ProtocolError):
        protocol.parse_refusal(body)


def test_nesting_up_to_the_limit_is_accepted_and_one_more_refused() -> None:
    limit = protocol.MAX_JSON_DEPTH
    nested: list = []
    for _ in range(limit - 1):
        nested = [nested]
    assert protocol.load_json(b"[" * limit + b"]" * limit) == nested
    with pytest.raises(ProtocolError, match="nested deeper"):
        protocol.load_json(b"[" * (limit + 1) + b"]" * (limit + 1))


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    assert protocol.nesting_depth(b'{"a":"[[[[[[[[[[[[[[\\"[[[["}') == 1
    assert protocol.load_json(b'{"a":"[[[[[[[[[[[[[[[[[["}') == {"a": "[" * 18}
    # escapes: a run of backslashes pairs up; only an odd one escapes the quote after it
    assert protocol.nesting_depth(b'["\\\\",[["\\\\\\"[["]]]') == 3
    assert protocol.nesting_depth(b'["\\u005b[",[]]') == 2


def test_a_body_of_many_quotes_and_brackets_is_refused_before_it_is_walked() -> None:
    """Review finding: 64 KiB of brackets cost 8 ms of Python per refused request (within
    the refusal budget, across connections). Escapes and other bytes are taken out in C,
    and over `MAX_STRUCTURE` quotes and brackets the body is refused unwalked."""
    flat = b"[" + b"[]," * 21000 + b"[]]"  # nesting 2, all structure
    with pytest.raises(ProtocolError, match="more than 4096 quotes and brackets"):
        protocol.load_json(flat)
    few = b'["' + b"a" * 60000 + b'",' + b"[" * 7 + b"]" * 7 + b"]"
    assert protocol.load_json(few) == ["a" * 60000, [[[[[[[]]]]]]]]
    with pytest.raises(ProtocolError, match="nested deeper"):
        protocol.load_json(b"[" * 60000)


@pytest.mark.parametrize(
    ("labels", "error"),
    [
        (["b", "a"], "sorted"),
        (["a", "a"], "sorted"),
        ([""], "empty"),
        (["a\nb"], "control"),
        ([1], "not text"),
        (["x"] * 65, "at most"),
    ],
)
def test_labels_are_checked(labels: list, error: str) -> None:
    body = protocol.build("rotate", link="l", sender="a", receiver="b", epoch=1,
                          auth_key=Secret(b"k" * 32), keys=[["s", "i"]], labels=labels,
                          nonce=b"n" * 32)  # fmt: skip
    with pytest.raises(ProtocolError, match=error):
        protocol.parse(body, expect=("rotate",))


def _refusal(**change: object) -> bytes:
    args: dict = {
        "link": "l",
        "sender": "b",
        "receiver": "a",
        "epoch": 3,
        "request": protocol.request_digest(b"req"),
        "bootstrap_auth": Secret(b"k" * 32),
    }
    args.update(change)
    return protocol.build_refusal("epoch", "why", **args)


def test_a_refusal_verifies_only_for_its_request_and_key() -> None:
    ok = dict(bootstrap_auth=Secret(b"k" * 32), link="l", sender="b", receiver="a", request=b"req")
    refusal = protocol.parse_refusal(_refusal())
    assert protocol.verify_refusal(refusal, **ok)
    for change in ({"request": b"other"}, {"bootstrap_auth": Secret(b"K" * 32)},
                   {"link": "m"}, {"sender": "c"}, {"receiver": "c"}):  # fmt: skip
        assert not protocol.verify_refusal(refusal, **{**ok, **change})
    tampered = json.loads(_refusal())
    tampered["epoch"] = 0
    assert not protocol.verify_refusal(protocol.parse_refusal(protocol.canonical(tampered)), **ok)


@pytest.mark.parametrize(
    "change",
    [
        {"epoch": -1},
        {"epoch": 2**62},
        {"epoch": True},
        {"error": "nope"},
        {"message": "x" * 301},
        {"request": "AAAA"},
        {"extra": 1},
        {"v": 2},
    ],
)
def test_malformed_refusals_are_protocol_errors(change: dict) -> None:
    fields = json.loads(_refusal())
    fields.update(change)
    with pytest.raises(ProtocolError):
        protocol.parse_refusal(protocol.canonical(fields))


def test_an_unauthenticated_error_body_carries_no_epoch_to_act_on() -> None:
    assert json.loads(protocol.error_body("refused", "no")) == {"error": "refused", "message": "no"}
