"""The ML-KEM layer: sizes, fingerprints and the key ID format (pure functions)."""

from __future__ import annotations

import pytest
from qkdagent_pqc import kem


@pytest.mark.parametrize(
    ("name", "public", "ciphertext"), [("ML-KEM-768", 1184, 1088), ("ML-KEM-1024", 1568, 1568)]
)
def test_sizes_and_a_round_trip_through_the_key_id(name: str, public: int, ciphertext: int) -> None:
    params = kem.PARAMETER_SETS[name]
    private = params.generate()
    raw = private.public_key().public_bytes_raw()
    assert len(raw) == public == params.public_size
    secret, key_id = kem.encapsulate(params, raw)
    fp, ct = kem.parse_key_id(params, key_id)
    assert len(ct) == ciphertext and fp == kem.fingerprint(params, raw)
    assert private.decapsulate(ct) == secret and len(secret) == kem.SECRET_SIZE
    assert len(key_id) <= params.max_key_id <= 4096
    # a private key is kept as its seed, which gives the same key back
    again = params.private_key(private.private_bytes_raw())
    assert again.decapsulate(ct) == secret


def test_the_fingerprint_binds_the_parameter_set() -> None:
    raw = b"\x01" * 1184
    a = kem.fingerprint(kem.PARAMETER_SETS["ML-KEM-768"], raw)
    b = kem.fingerprint(kem.PARAMETER_SETS["ML-KEM-1024"], raw)
    assert a != b and len(a) == kem.FINGERPRINT_SIZE


@pytest.mark.parametrize(
    ("key_id", "problem"),
    [
        ("00000000-0000-4000-8000-000000000000", "not FINGERPRINT.CIPHERTEXT"),
        ("AAAAAAAAAAA.A+==", "not base64url"),
        ("AAAAAAAAAAA.", "not base64url"),
        ("AAAA.AAAA", "no public key fingerprint"),
        ("AAAAAAAAAAA.AAAA", "ciphertext is 3 bytes; ML-KEM-768 takes 1088"),
        ("AAAAAAAAAAA.A", "not base64url"),
    ],
)
def test_a_malformed_key_id_is_a_value_error(key_id: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        kem.parse_key_id(kem.PARAMETER_SETS["ML-KEM-768"], key_id)


def test_a_ciphertext_of_the_other_parameter_set_is_refused() -> None:
    big = kem.PARAMETER_SETS["ML-KEM-1024"]
    _, key_id = kem.encapsulate(big, big.generate().public_key().public_bytes_raw())
    with pytest.raises(ValueError, match="1568 bytes; ML-KEM-768 takes 1088"):
        kem.parse_key_id(kem.PARAMETER_SETS["ML-KEM-768"], key_id)


def test_a_public_key_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(ValueError, match="ML-KEM-768 public key is 1184 bytes, not 1183"):
        kem.PARAMETER_SETS["ML-KEM-768"].public_key(b"\0" * 1183)
