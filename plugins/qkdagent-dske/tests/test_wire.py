"""dske-python's wire format (REFERENCE §7.1): byte-exact vectors, refusals, a fuzz pass.

The vectors are built from REFERENCE's description with the standard library only (hmac,
base64, json) and compared with what `wire` produces, so a drift in either shows.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib.util
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qkdagent_dske import wire

BLOCK = "4f3c7b1e-2a8d-4c6e-9b0f-1d2e3f405162"
OTHER = "0b9c8d7e-6f5a-4b3c-8d2e-1f0a9b8c7d6e"
PSRD = hashlib.shake_256(b"dske-psrd-vector").digest(64)


def test_request_signature_vector() -> None:
    """A share GET: the MAC covers the raw query string then the (empty) body; the key is the
    32 PSRD bytes named by the allocation, here split over two blocks."""
    allocation = wire.Allocation((wire.Fragment(BLOCK, 100, 20), wire.Fragment(OTHER, 0, 12)))
    key = PSRD[:32]
    query = b"client_name=conny&key_id=5a0e0e0e-1111-4222-8333-444455556666"
    header = wire.signature_header(allocation, key, query, b"")
    tag = base64.b64encode(hmac.new(key, query, hashlib.sha256).digest()).decode()
    assert header == f"{BLOCK}:100:20,{OTHER}:0:12%{tag}"
    assert header == EXPECTED_GET_HEADER
    parsed = wire.parse_signature(header)
    assert parsed.allocation == allocation and parsed.verify(key, query, b"")
    assert not parsed.verify(key, query + b"x", b"")
    assert not parsed.verify(PSRD[32:], query, b"")


EXPECTED_GET_HEADER = (
    "4f3c7b1e-2a8d-4c6e-9b0f-1d2e3f405162:100:20,0b9c8d7e-6f5a-4b3c-8d2e-1f0a9b8c7d6e:0:12"
    "%dbCwr55+RbMpycyfHayjGwPKwAqlL19UWsqwFyevGug="
)


def test_share_post_vector() -> None:
    """The POST body: the field names and nesting REFERENCE gives, the share XORed with as many
    PSRD bytes, standard padded base64; the signature covers b"" (no query) + the body."""
    share = bytes(range(32))
    pad_alloc = wire.Allocation((wire.Fragment(BLOCK, 32, 32),))
    encrypted = wire.xor(share, PSRD[32:])
    post = wire.SharePost("carol", "carol", "conny", "k-1", 2, pad_alloc, encrypted)
    body = post.encode()
    assert json.loads(body) == {
        "master_client_name": "carol",
        "master_sae_id": "carol",
        "slave_sae_id": "conny",
        "user_key_id": "k-1",
        "share_index": 2,
        "encryption_key_allocation": {
            "fragments": [{"block_uuid": BLOCK, "start": 32, "size": 32}]
        },
        "encrypted_share_value": base64.b64encode(
            bytes(a ^ b for a, b in zip(share, PSRD[32:], strict=True))
        ).decode(),
    }
    assert wire.parse_share_post(body) == post
    sig_alloc = wire.Allocation((wire.Fragment(BLOCK, 0, 32),))
    header = wire.signature_header(sig_alloc, PSRD[:32], b"", body)
    assert header.endswith(
        "%" + base64.b64encode(hmac.new(PSRD[:32], body, hashlib.sha256).digest()).decode()
    )


def test_share_reply_and_registration_round_trip() -> None:
    reply = wire.ShareReply(4, wire.Allocation((wire.Fragment(BLOCK, 0, 3),)), b"abc")
    assert wire.parse_share_reply(reply.encode()) == reply
    body = b'{"client_name": "carol", "encryptor_names": ["carol", "patrick"]}'
    assert wire.parse_registration(body) == wire.Registration("carol", ("carol", "patrick"))
    assert wire.parse_registration(b'{"client_name": "carol"}').encryptor_names == ()
    assert wire.parse_hub_name(b'{"hub_name": "hank"}') == "hank"


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        f"{BLOCK}:0:32",  # no MAC
        f"{BLOCK}:0:31%" + "A" * 44,  # 31-byte key
        f"{BLOCK}:0:32%" + "A" * 43,  # unpadded
        f"{BLOCK}:0:32%" + base64.b64encode(b"x" * 31).decode(),  # short MAC
        f"{BLOCK.upper()}x:0:32%" + "A" * 44,
        f"{BLOCK}:-1:32%" + "A" * 44,
        f"{BLOCK}:0:+32%" + "A" * 44,
        f"{BLOCK}:0:32:1%" + "A" * 44,
        ",".join([f"{BLOCK}:{i}:2" for i in range(17)]) + "%" + "A" * 44,
        "x" * 5000,
        f"{BLOCK}:0:32%" + "A" * 43 + "\u00e9",
    ],
)
def test_bad_signature_headers_are_refused(header: str | None) -> None:
    with pytest.raises(wire.WireError):
        wire.parse_signature(header)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[" * 100_000,
        b"null",
        b'{"share_index": 1}',
        b'{"share_index": true, "encryption_key_allocation": {"fragments": []},'
        b' "encrypted_share_value": ""}',
        b'{"share_index": 300, "encryption_key_allocation": {"fragments": []},'
        b' "encrypted_share_value": "AAAA"}',
        json.dumps(
            {
                "share_index": 1,
                "encryption_key_allocation": {
                    "fragments": [{"block_uuid": BLOCK, "start": 0, "size": 4}]
                },
                "encrypted_share_value": "AAAA",  # 3 bytes, allocation 4
            }
        ).encode(),
        json.dumps(
            {
                "share_index": 1,
                "encryption_key_allocation": {
                    "fragments": [{"block_uuid": BLOCK, "start": 0, "size": 3}]
                },
                "encrypted_share_value": "AAAA",
                "extra": 1,
            }
        ).encode(),
    ],
)
def test_bad_share_replies_are_refused(body: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.parse_share_reply(body)


def test_a_good_reply_parses() -> None:  # the refusals above are not refusing everything
    body = json.dumps(
        {
            "share_index": 1,
            "encryption_key_allocation": {
                "fragments": [{"block_uuid": BLOCK, "start": 0, "size": 3}]
            },
            "encrypted_share_value": "AAAA",
        }
    ).encode()
    assert wire.parse_share_reply(body).encrypted_share_value == b"\0\0\0"


def _fuzz_target():  # type: ignore[no-untyped-def]
    path = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_dske_wire.py"
    spec = importlib.util.spec_from_file_location("fuzz_dske_wire", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FUZZ = _fuzz_target()


@settings(derandomize=True, max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_target_only_refuses_with_wire_error(data: bytes) -> None:
    FUZZ.target(data)


def test_fuzz_seeds_reach_the_parsers() -> None:
    """The seeds parse (so mutations of them explore past the first check)."""
    wire.parse_share_post(FUZZ.SEEDS[1][1:])
    assert wire.parse_signature(FUZZ.SEEDS[0][1:]).allocation.size == 32


def test_a_body_may_come_in_as_many_pieces_as_an_honest_one_of_its_bound_needs() -> None:
    """A PSRD answer of the largest block arrives in TLS records of 16 KiB: its pieces must
    fit under the cap its size bound gives (a fixed 4096 cut off blocks over about 48 MiB)."""
    largest = wire.MAX_BLOCK_SIZE * 2  # what a refill asks for at most
    records = -(-(largest * 4 // 3) // 16384)  # base64 of it, in 16 KiB records
    assert records <= wire.body_pieces(largest)
    assert wire.body_pieces(wire.MAX_BODY) == wire.MAX_BODY_PIECES
