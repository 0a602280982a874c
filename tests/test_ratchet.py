"""The key schedule against its published vectors, and against an independent implementation."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pytest

from qkdagent import ratchet
from qkdagent.secret import Secret

VECTOR_FILES = sorted((Path(__file__).parent / "vectors").glob("*.json"))
VECTORS = [
    case
    for path in VECTOR_FILES
    if path.name == "ratchet.json" or path.name.startswith("hybrid-")
    for case in json.loads(path.read_text())["cases"]
]
"""ratchet.json, and the hybrid links' vectors (QKD + ML-KEM, from qkdagent-pqc) in the same
format: their extra `mlkem` fields (how the ML-KEM secrets were made) are not needed here."""


def _enc(data: bytes | str) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return len(raw).to_bytes(4, "big") + raw


def _extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt, ikm, hashlib.sha3_256).digest()


def _expand32(prk: bytes, info: bytes) -> bytes:
    # one block suffices for 32 bytes of SHA3-256 output (RFC 5869 §2.3, T(1))
    return hmac.new(prk, info + b"\x01", hashlib.sha3_256).digest()


def _independent(case: dict) -> list[dict]:
    """Recompute every value from the README's description, without qkdagent."""
    prk0 = _extract(b"qkdagent v1 bootstrap", bytes.fromhex(case["bootstrap"]))
    c = _expand32(prk0, _enc("qkdagent v1 bootstrap chain") + _enc(case["link"]))
    assert c.hex() == case["c0"]
    a0 = _expand32(prk0, _enc("qkdagent v1 bootstrap auth") + _enc(case["link"]))
    assert a0.hex() == case["a0"]
    results = []
    for ep in case["epochs"]:
        srcs = ep["sources"]
        ikm = len(srcs).to_bytes(4, "big") + b"".join(
            _enc(s["source"]) + _enc(s["key_id"]) + _enc(bytes.fromhex(s["key"])) for s in srcs
        )
        prk = _extract(c, ikm)
        t = hashlib.sha3_256(
            _enc("qkdagent v2 transcript")
            + _enc(case["link"])
            + _enc(case["initiator"])
            + _enc(case["responder"])
            + ep["epoch"].to_bytes(8, "big")
            + len(srcs).to_bytes(4, "big")
            + b"".join(_enc(s["source"]) + _enc(s["key_id"]) for s in srcs)
            + _enc(bytes.fromhex(ep["initiator_nonce"]))
            + _enc(bytes.fromhex(ep["responder_nonce"]))
            + len(case["labels"]).to_bytes(4, "big")
            + b"".join(_enc(label) for label in sorted(case["labels"]))
            + len(ep["answers"]).to_bytes(4, "big")
            + b"".join(_enc(a["source"]) + _enc(bytes.fromhex(a["answer"])) for a in ep["answers"])
        ).digest()
        conf = _expand32(prk, _enc("qkdagent v1 confirm") + t)
        result = {
            "transcript_hash": t.hex(),
            "chain_key": _expand32(prk, _enc("qkdagent v1 chain") + t).hex(),
            "auth_key": _expand32(prk, _enc("qkdagent v1 auth") + t).hex(),
            "confirm_key": conf.hex(),
            "confirm_initiator": hmac.new(
                conf, _enc("qkdagent v1 confirm initiator") + t, hashlib.sha3_256
            ).hexdigest(),
            "confirm_responder": hmac.new(
                conf, _enc("qkdagent v1 confirm responder") + t, hashlib.sha3_256
            ).hexdigest(),
            "outputs": {
                label: _expand32(prk, _enc("qkdagent v1 sink") + _enc(label) + t).hex()
                for label in case["labels"]
            },
        }
        results.append(result)
        c = bytes.fromhex(result["chain_key"])
    return results


@pytest.mark.parametrize("case", VECTORS, ids=lambda c: c["link"])
def test_independent_implementation_matches_vectors(case: dict) -> None:
    for expected, got in zip(case["epochs"], _independent(case), strict=True):
        for name, value in got.items():
            assert expected[name] == value, f"epoch {expected['epoch']}: {name}"


@pytest.mark.parametrize("case", VECTORS, ids=lambda c: c["link"])
def test_qkdagent_ratchet_matches_vectors(case: dict) -> None:
    start = ratchet.chain_start(Secret(bytes.fromhex(case["bootstrap"])), case["link"])
    assert start.chain_key.reveal().hex() == case["c0"]
    assert start.auth_key.reveal().hex() == case["a0"]
    chain = start.chain_key
    for ep in case["epochs"]:
        inputs = [
            ratchet.SourceInput(s["source"], s["key_id"], Secret(bytes.fromhex(s["key"])))
            for s in ep["sources"]
        ]
        transcript = ratchet.Transcript(
            case["link"],
            case["initiator"],
            case["responder"],
            ep["epoch"],
            tuple((i.source, i.key_id) for i in inputs),
            bytes.fromhex(ep["initiator_nonce"]),
            bytes.fromhex(ep["responder_nonce"]),
            labels=tuple(sorted(case["labels"])),
            answers=tuple((a["source"], bytes.fromhex(a["answer"])) for a in ep["answers"]),
        )
        keys = ratchet.rotate(chain, inputs, transcript, case["labels"])
        assert keys.chain_key.reveal().hex() == ep["chain_key"]
        assert keys.auth_key.reveal().hex() == ep["auth_key"]
        assert ratchet.confirmation(keys, "initiator").hex() == ep["confirm_initiator"]
        assert ratchet.confirmation(keys, "responder").hex() == ep["confirm_responder"]
        assert {k: v.reveal().hex() for k, v in keys.outputs.items()} == ep["outputs"]
        chain = keys.chain_key


def _rotate(
    chain: bytes, key: bytes, labels: list[str], nonce: bytes = b"n" * 32
) -> ratchet.EpochKeys:
    inputs = [ratchet.SourceInput("kme", "id-1", Secret(key))]
    transcript = ratchet.Transcript("l", "a", "b", 1, (("kme", "id-1"),), nonce, b"r" * 32)
    return ratchet.rotate(Secret(chain), inputs, transcript, labels)


def test_each_sink_label_gets_independent_bytes() -> None:
    keys = _rotate(b"c" * 32, b"k" * 32, ["wireguard", "ipsec", "file"])
    values = {v.reveal() for v in keys.outputs.values()}
    assert len(values) == 3
    assert keys.chain_key.reveal() not in values and keys.auth_key.reveal() not in values


def test_every_input_changes_every_output() -> None:
    base = _rotate(b"c" * 32, b"k" * 32, ["x"])
    for variant in (
        _rotate(b"C" * 32, b"k" * 32, ["x"]),
        _rotate(b"c" * 32, b"K" * 32, ["x"]),
        _rotate(b"c" * 32, b"k" * 32, ["x"], nonce=b"N" * 32),
    ):
        assert variant.outputs["x"] != base.outputs["x"]
        assert variant.chain_key != base.chain_key


def test_length_prefix_prevents_ambiguous_encodings() -> None:
    assert ratchet.enc("ab") + ratchet.enc("c") != ratchet.enc("a") + ratchet.enc("bc")


def test_transcript_must_match_inputs() -> None:
    inputs = [ratchet.SourceInput("kme", "id-1", Secret(b"k" * 32))]
    transcript = ratchet.Transcript("l", "a", "b", 1, (("kme", "other"),), b"n", b"r")
    with pytest.raises(ValueError, match="do not match"):
        ratchet.rotate(Secret(b"c" * 32), inputs, transcript, ["x"])
