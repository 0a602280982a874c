"""Peer messages (DESIGN §4): strict parsing, canonical encoding and MACs. Pure, no I/O.

Every message is a JSON object whose fields, minus `mac`, are encoded canonically (sorted keys,
no whitespace) and authenticated with HMAC-SHA3-256 under the link's auth key. Parsing is strict:
unknown fields, wrong types and out-of-range values are refused before any key is touched.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from typing import Any

from .errors import ProtocolError
from .ratchet import enc
from .secret import Secret, check_key_id

VERSION = 1
MAX_BODY = 64 * 1024
MAX_NAME = 128
MAX_SOURCES = 16
NONCE_SIZE = 32
MAX_EPOCH = 2**62

REQUESTS = ("rotate", "commit", "resync")
REPLIES = ("rotate-reply", "commit-reply", "resync-reply")

_FIELDS: dict[str, set[str]] = {
    "rotate": {"keys", "nonce"},
    "resync": {"keys", "nonce"},
    "rotate-reply": {"nonce", "request_nonce", "confirm"},
    "resync-reply": {"nonce", "request_nonce", "confirm"},
    "commit": {"nonce", "confirm"},
    "commit-reply": {"request_nonce"},
}
_COMMON = {"v", "kind", "link", "from", "to", "epoch", "mac"}


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, field: str, *, size: int | None = None) -> bytes:
    if not isinstance(value, str) or len(value) > 200:
        raise ProtocolError(f"field {field!r} must be a base64 string")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"field {field!r} is not valid base64") from None
    if size is not None and len(data) != size:
        raise ProtocolError(f"field {field!r} must decode to {size} bytes")
    return data


@dataclass(frozen=True)
class Message:
    """A parsed, not yet authenticated message. `fields` holds the raw JSON values."""

    kind: str
    link: str
    sender: str
    receiver: str
    epoch: int
    fields: dict[str, Any]
    mac: bytes

    @property
    def nonce(self) -> bytes:
        return _unb64(self.fields["nonce"], "nonce", size=NONCE_SIZE)

    @property
    def request_nonce(self) -> bytes:
        return _unb64(self.fields["request_nonce"], "request_nonce", size=NONCE_SIZE)

    @property
    def confirm(self) -> bytes:
        return _unb64(self.fields["confirm"], "confirm", size=32)

    @property
    def keys(self) -> tuple[tuple[str, str], ...]:
        return tuple((s, k) for s, k in self.fields["keys"])


def canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def compute_mac(auth_key: Secret, fields: dict[str, Any]) -> bytes:
    body = {k: v for k, v in fields.items() if k != "mac"}
    return hmac.new(
        auth_key.reveal(), enc("qkdagent v1 message") + canonical(body), hashlib.sha3_256
    ).digest()


def build(
    kind: str,
    *,
    link: str,
    sender: str,
    receiver: str,
    epoch: int,
    auth_key: Secret,
    **extra: Any,
) -> bytes:
    """Encode and MAC a message; `extra` values that are bytes are base64-encoded."""
    fields: dict[str, Any] = {
        "v": VERSION,
        "kind": kind,
        "link": link,
        "from": sender,
        "to": receiver,
        "epoch": epoch,
    }
    for name, value in extra.items():
        fields[name] = b64(value) if isinstance(value, bytes) else value
    if set(fields) | {"mac"} != _COMMON | _FIELDS[kind]:
        raise ValueError(f"wrong fields for {kind}")
    fields["mac"] = b64(compute_mac(auth_key, fields))
    return canonical(fields)


def parse(body: bytes, *, expect: tuple[str, ...]) -> Message:
    """Parse a message strictly; raise ProtocolError (status 400/413) on any defect."""
    if len(body) > MAX_BODY:
        raise ProtocolError(f"message larger than {MAX_BODY} bytes", status=413)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("message is not valid JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError("message must be a JSON object")
    kind = data.get("kind")
    if kind not in expect:
        raise ProtocolError(f"unexpected message kind {str(kind)[:40]!r}")
    if set(data) != _COMMON | _FIELDS[kind]:
        missing = sorted((_COMMON | _FIELDS[kind]) - set(data))
        extra = sorted(set(data) - (_COMMON | _FIELDS[kind]))
        raise ProtocolError(f"message fields wrong (missing {missing[:5]}, unknown {extra[:5]})")
    if data["v"] != VERSION or isinstance(data["v"], bool):
        raise ProtocolError(f"unsupported protocol version {str(data['v'])[:20]}")
    for name in ("link", "from", "to"):
        value = data[name]
        if not isinstance(value, str) or not value or len(value) > MAX_NAME:
            raise ProtocolError(f"field {name!r} must be a name of 1-{MAX_NAME} characters")
    epoch = data["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 < epoch < MAX_EPOCH:
        raise ProtocolError("field 'epoch' must be a positive integer")
    mac = _unb64(data["mac"], "mac", size=32)
    message = Message(kind, data["link"], data["from"], data["to"], epoch, data, mac)
    _check_fields(message)
    return message


def _check_fields(message: Message) -> None:
    names = _FIELDS[message.kind]
    if "nonce" in names:
        message.nonce  # noqa: B018 - validates
    if "request_nonce" in names:
        message.request_nonce  # noqa: B018
    if "confirm" in names:
        message.confirm  # noqa: B018
    if "keys" in names:
        keys = message.fields["keys"]
        if not isinstance(keys, list) or not 0 < len(keys) <= MAX_SOURCES:
            raise ProtocolError(f"field 'keys' must list 1-{MAX_SOURCES} source keys")
        for item in keys:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                raise ProtocolError("each entry of 'keys' must be [source, key_id]")
            if not item[0] or len(item[0]) > MAX_NAME:
                raise ProtocolError("a source name in 'keys' is empty or too long")
            try:
                check_key_id(item[1])
            except ValueError as exc:
                raise ProtocolError(f"bad key ID in 'keys': {exc}") from None


def verify_mac(message: Message, auth_key: Secret) -> bool:
    return hmac.compare_digest(compute_mac(auth_key, message.fields), message.mac)


def error_body(code: str, message: str, *, epoch: int | None = None) -> bytes:
    """An unauthenticated error reply; the receiver treats its content only as a hint."""
    body: dict[str, Any] = {"error": code, "message": message}
    if epoch is not None:
        body["epoch"] = epoch
    return canonical(body)
