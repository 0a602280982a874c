"""quPSKd's PSK chain (REFERENCE §11), pure: no I/O, no clock.

    H(parts) = base64(SHA3-256("".join(sorted(parts)).encode()))
    psk0     = H([psk or "", "quPSKd Version 1"])
    psk_n    = H([kme_key_base64, key_ID, psk_{n-1}])

Every value is the 44-character base64 text quPSKd keeps and writes; the sinks get the 32 bytes
it encodes (`secret_bytes`), so a `file` sink with `format = "base64"` writes quPSKd's file.
The KME's key enters as base64 of its bytes: quPSKd hashes the KME's own base64 text, which is
the same string whenever the KME sends canonical, padded base64 (quPSKd's simulator does).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass

IDENTITY = "quPSKd Version 1"
PSK_CHARS = 44
STATE_VERSION = 1
MAX_STATE_BYTES = 4096


class ChainError(ValueError):
    """A stored chain state that cannot be used (then the chain starts again with /new)."""


def digest(parts: list[str]) -> str:
    joined = "".join(sorted(parts))
    return base64.b64encode(hashlib.sha3_256(joined.encode()).digest()).decode()


def initial(psk: str | None) -> str:
    return digest([psk or "", IDENTITY])


def advance(previous: str, kme_key: bytes, key_id: str) -> str:
    return digest([base64.b64encode(kme_key).decode(), key_id, previous])


def random_psk() -> str:
    """What the chain becomes on expiry: unrelated to anything the peer holds."""
    return base64.b64encode(os.urandom(32)).decode()


def secret_bytes(psk: str) -> bytes:
    """The 32 bytes a chain value encodes (what sinks install)."""
    raw = base64.b64decode(psk, validate=True)
    if len(raw) != 32:
        raise ChainError("a chain value must encode 32 bytes")
    return raw


@dataclass(frozen=True)
class ChainState:
    """What is committed with every rotation and read back after a restart."""

    psk: str
    """The current chain value (the installed PSK, base64)."""
    caller: bool
    """Whether this side called the peer for that rotation (it then waits `initiator_wait`)."""

    def __repr__(self) -> str:
        return f"ChainState(caller={self.caller})"

    def encode(self) -> bytes:
        return json.dumps({"v": STATE_VERSION, "psk": self.psk, "caller": self.caller}).encode()

    @classmethod
    def decode(cls, data: bytes) -> ChainState:
        if len(data) > MAX_STATE_BYTES:
            raise ChainError("stored chain state is too large")
        try:
            value = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ChainError("stored chain state is not JSON") from None
        if not isinstance(value, dict) or value.get("v") != STATE_VERSION:
            raise ChainError("stored chain state has an unknown version")
        psk, caller = value.get("psk"), value.get("caller")
        if not isinstance(psk, str) or len(psk) != PSK_CHARS or not isinstance(caller, bool):
            raise ChainError("stored chain state has wrong fields")
        try:
            secret_bytes(psk)
        except (ValueError, binascii.Error):
            raise ChainError("stored chain value is not base64 of 32 bytes") from None
        return cls(psk, caller)
