"""Pure validation and spelling of WireGuard keys and interface names.

WireGuard fails silently on bad PSKs (the kernel ignores a PSK that is not 32 bytes and treats
all-zero as "no PSK"), so every key is checked here before any backend sees it.
"""

from __future__ import annotations

import base64
import binascii
import re

KEY_LEN = 32
_IFNAME = re.compile(r"^[A-Za-z0-9_.=+-]{1,15}$")


def check_psk(psk: bytes) -> bytes:
    """Refuse a PSK WireGuard would drop or read as "no PSK"; messages never show the bytes."""
    if len(psk) != KEY_LEN:
        raise ValueError(f"a WireGuard PSK must be exactly {KEY_LEN} bytes, got {len(psk)}")
    if not any(psk):
        raise ValueError("refusing an all-zero WireGuard PSK: it would remove the PSK")
    return psk


def parse_public_key(text: str) -> bytes:
    """Decode a peer public key given as base64 (wg's spelling), strictly."""
    if not isinstance(text, str):
        raise ValueError("a public key must be a base64 string")
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64 (expected a WireGuard public key)") from None
    if len(raw) != KEY_LEN:
        raise ValueError(f"decodes to {len(raw)} bytes; a WireGuard public key has {KEY_LEN}")
    return raw


def public_key_text(raw: bytes) -> str:
    """The base64 spelling wg uses; public keys are not secret."""
    return base64.b64encode(raw).decode()


def check_ifname(name: str) -> str | None:
    """Return a problem description, or None when `name` is a usable Linux interface name."""
    if not _IFNAME.match(name) or name in (".", ".."):
        return "must be a Linux interface name (1-15 characters, no '/', spaces or ':')"
    return None
