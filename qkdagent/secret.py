"""Redacted holders for key material.

Python cannot guarantee that bytes are wiped from memory (copies are made by the interpreter,
by `bytes()` conversions and by the libraries that consume a key). `Secret` narrows the ways a key
leaks by accident: it never shows its value in `repr`/`str`/format, refuses pickling and hashing,
compares in constant time, and overwrites its own buffer when `wipe()` is called.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import NoReturn

MAX_KEY_ID_BYTES = 256
MAX_KEY_ID_ANY = 4096
"""Hard cap on any key ID, whatever a source declares (an ML-KEM-1024 ciphertext in base64 is
2,092 bytes)."""


class Secret:
    """Key bytes with a redacted representation; call `reveal()` only at the consumer."""

    __slots__ = ("_buf",)

    def __init__(self, value: bytes | bytearray | memoryview) -> None:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError("Secret takes bytes")
        self._buf = bytearray(value)

    @classmethod
    def random(cls, size: int = 32) -> Secret:
        return cls(os.urandom(size))

    def reveal(self) -> bytes:
        """Return the raw bytes; the caller is responsible for not logging them."""
        return bytes(self._buf)

    def fingerprint(self) -> str:
        """A short, one-way identifier for comparing secrets in logs and demos."""
        return hashlib.sha3_256(b"qkdagent v1 fingerprint\x00" + self._buf).hexdigest()[:12]

    def wipe(self) -> None:
        for i in range(len(self._buf)):
            self._buf[i] = 0

    def __len__(self) -> int:
        return len(self._buf)

    def __repr__(self) -> str:
        return f"Secret(<{len(self._buf)} bytes redacted>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._buf, other._buf)

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> NoReturn:
        raise TypeError("Secret values cannot be pickled")

    def __bool__(self) -> bool:
        return bool(self._buf)


def check_key_id(key_id: object, limit: int = MAX_KEY_ID_BYTES) -> str:
    """Validate an opaque key ID from a source or a peer: non-empty printable text of at most
    `limit` UTF-8 bytes (256 by default; a source may declare more, up to MAX_KEY_ID_ANY)."""
    if not isinstance(key_id, str):
        raise ValueError("key ID must be a string")
    if not key_id:
        raise ValueError("key ID is empty")
    if len(key_id.encode("utf-8")) > limit:
        raise ValueError(f"key ID is longer than {limit} bytes")
    if not key_id.isprintable():
        raise ValueError("key ID contains control characters")
    return key_id


@dataclass(frozen=True, slots=True)
class Key:
    """One single-use key from a source: an opaque ID and its secret bytes."""

    key_id: str
    value: Secret

    def __post_init__(self) -> None:
        check_key_id(self.key_id, MAX_KEY_ID_ANY)  # the source's own limit is checked by the core
        if not isinstance(self.value, Secret):
            raise TypeError("Key.value must be a Secret")
        if len(self.value) == 0:
            raise ValueError("key is empty")
