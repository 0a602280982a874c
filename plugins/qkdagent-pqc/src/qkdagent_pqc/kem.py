"""ML-KEM (FIPS 203) as this plugin uses it: parameter sets, key fingerprints, and the key ID
that carries a ciphertext. Pure functions over `cryptography`; no I/O, no agent types.

A key ID is `FINGERPRINT.CIPHERTEXT` (both unpadded base64url): the fingerprint names the public
key the ciphertext was made for, so a responder can tell "the peer holds the wrong public key"
from a ciphertext that merely decapsulates to another secret (ML-KEM's implicit rejection
would otherwise surface only as a failed key confirmation).
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import mlkem

SEED_SIZE = 64
"""An ML-KEM private key is kept as its 64-byte seed (d ‖ z), for both parameter sets."""
SECRET_SIZE = 32
FINGERPRINT_SIZE = 8
_FINGERPRINT_LABEL = b"qkdagent pqc v1 public key fingerprint"
_B64URL = re.compile(r"[A-Za-z0-9_-]+\Z")


class PublicKey(Protocol):
    def encapsulate(self) -> tuple[bytes, bytes]: ...
    def public_bytes_raw(self) -> bytes: ...


class PrivateKey(Protocol):
    def decapsulate(self, ciphertext: bytes) -> bytes: ...
    def public_key(self) -> PublicKey: ...
    def private_bytes_raw(self) -> bytes: ...


@dataclass(frozen=True)
class ParameterSet:
    name: str
    public_size: int
    ciphertext_size: int
    _private: type[mlkem.MLKEM768PrivateKey] | type[mlkem.MLKEM1024PrivateKey]
    _public: type[mlkem.MLKEM768PublicKey] | type[mlkem.MLKEM1024PublicKey]

    def generate(self) -> PrivateKey:
        return self._private.generate()

    def private_key(self, seed: bytes) -> PrivateKey:
        """The private key of a 64-byte seed (ValueError otherwise)."""
        if len(seed) != SEED_SIZE:
            raise ValueError(f"an ML-KEM seed is {SEED_SIZE} bytes, not {len(seed)}")
        return self._private.from_seed_bytes(seed)

    def public_key(self, raw: bytes) -> PublicKey:
        """A raw public key of this set (ValueError if it is not one)."""
        if len(raw) != self.public_size:
            raise ValueError(
                f"an {self.name} public key is {self.public_size} bytes, not {len(raw)}"
            )
        return self._public.from_public_bytes(raw)

    @property
    def max_key_id(self) -> int:
        return len(key_id(b"\0" * FINGERPRINT_SIZE, b"\0" * self.ciphertext_size))


PARAMETER_SETS = {
    p.name: p
    for p in (
        ParameterSet("ML-KEM-768", 1184, 1088, mlkem.MLKEM768PrivateKey, mlkem.MLKEM768PublicKey),
        ParameterSet(
            "ML-KEM-1024", 1568, 1568, mlkem.MLKEM1024PrivateKey, mlkem.MLKEM1024PublicKey
        ),
    )
}
DEFAULT = "ML-KEM-768"


def fingerprint(params: ParameterSet, public: bytes) -> bytes:
    """A short name for a public key (not secret; binds the parameter set)."""
    digest = hashlib.sha3_256()
    for part in (_FINGERPRINT_LABEL, params.name.encode(), public):
        digest.update(len(part).to_bytes(4, "big") + part)
    return digest.digest()[:FINGERPRINT_SIZE]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    """Strict unpadded base64url (ValueError for anything else)."""
    if not _B64URL.match(text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key_id(public_fingerprint: bytes, ciphertext: bytes) -> str:
    return f"{b64url(public_fingerprint)}.{b64url(ciphertext)}"


def parse_key_id(params: ParameterSet, text: str) -> tuple[bytes, bytes]:
    """(fingerprint, ciphertext) of a key ID; ValueError saying what is wrong (no bytes)."""
    head, dot, body = text.partition(".")
    if not dot:
        raise ValueError("key ID is not FINGERPRINT.CIPHERTEXT")
    try:
        fp, ciphertext = unb64url(head), unb64url(body)
    except ValueError:
        raise ValueError("key ID is not base64url") from None
    if len(fp) != FINGERPRINT_SIZE:
        raise ValueError("key ID has no public key fingerprint")
    if len(ciphertext) != params.ciphertext_size:
        raise ValueError(
            f"ciphertext is {len(ciphertext)} bytes; {params.name} takes {params.ciphertext_size}"
        )
    return fp, ciphertext


def encapsulate(params: ParameterSet, public: bytes) -> tuple[bytes, str]:
    """(shared secret, key ID) for a fresh encapsulation to the raw public key `public`."""
    secret, ciphertext = params.public_key(public).encapsulate()
    return secret, key_id(fingerprint(params, public), ciphertext)
