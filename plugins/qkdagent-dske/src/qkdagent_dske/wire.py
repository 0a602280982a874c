"""dske-python's wire format (REFERENCE §7.1): allocations, `DSKE-Signature`, JSON bodies.

Pure: bytes in, typed values or `WireError` out. Everything parsed here comes from a peer, so
every field is bounded and type-checked, and signatures are compared in constant time.

Signature header: `DSKE-Signature: <uuid>:<start>:<size>[,...]%<base64 HMAC-SHA256>`; the
HMAC key is the 32 PSRD bytes the fragment list names, the message is the raw query string
followed by the raw body for a request, the body for a response.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import uuid
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Any

SIGNATURE_HEADER = "DSKE-Signature"
SIGNING_KEY_SIZE = 32
MAC_SIZE = 32
MAX_FRAGMENTS = 16
MAX_HEADER = 2048
MAX_BODY = 64 * 1024
MAX_BODY_PIECES = 4096
"""Reads (h11 `Data` events) one HTTP body, request or reply, may come in (`body_pieces`). An
honest body arrives in TLS records of up to 16 KiB (a 2 MiB PSRD reply in about 170); one sent
in thousands of one-byte chunks costs about 5 us each to parse, seconds for a few hundred KiB."""


def body_pieces(limit: int) -> int:
    """The reads a body of at most `limit` bytes may come in: `MAX_BODY_PIECES`, or one per
    8 KiB of a larger bound (a 64 MiB PSRD block's base64 is about 5,500 records of 16 KiB)."""
    return max(MAX_BODY_PIECES, limit // 8192)


MAX_SHARE = 1024
MAX_BLOCK_SIZE = 64 << 20
MAX_NAMES = 64

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""Client, hub and SAE names: also path segments, so no '/' and no '%'."""
KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class WireError(ValueError):
    """A message that does not follow the wire format (the peer's fault: a 4xx)."""


@dataclass(frozen=True)
class Fragment:
    block_uuid: str
    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class Allocation:
    """Byte ranges of PSRD blocks, named on the wire instead of the bytes themselves."""

    fragments: tuple[Fragment, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.fragments)

    def header_text(self) -> str:
        return ",".join(f"{f.block_uuid}:{f.start}:{f.size}" for f in self.fragments)

    def to_json(self) -> dict[str, Any]:
        return {
            "fragments": [
                {"block_uuid": f.block_uuid, "start": f.start, "size": f.size}
                for f in self.fragments
            ]
        }

    def json_text(self) -> str:
        """`dump_json(self.to_json())`, written out: bodies are built per share (hot path)."""
        parts = ",".join(
            f'{{"block_uuid":{_string(f.block_uuid)},"start":{f.start},"size":{f.size}}}'
            for f in self.fragments
        )
        return f'{{"fragments":[{parts}]}}'


def _string(text: str) -> str:
    """A JSON string, exactly as `dump_json` writes it (ASCII, escaped)."""
    return encode_basestring_ascii(text)


def _uuid(text: object) -> str:
    if not isinstance(text, str) or len(text) != 36:
        raise WireError("a block UUID must be a 36-character UUID string")
    try:
        canonical = str(uuid.UUID(text))
    except ValueError:
        raise WireError("a block UUID must be a UUID") from None
    if canonical != text.lower():
        raise WireError("a block UUID must be in canonical form")
    return text.lower()


def canonical_uuid(text: object) -> str:
    """A block UUID in canonical form (also a safe file name), or `WireError`."""
    return _uuid(text)


def _count(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise WireError(f"{what} must be an integer in {low}..{high}")
    return value


def _fragments(items: list[tuple[object, object, object]]) -> Allocation:
    if not 1 <= len(items) <= MAX_FRAGMENTS:
        raise WireError(f"an allocation has 1..{MAX_FRAGMENTS} fragments")
    fragments = tuple(
        Fragment(
            _uuid(u), _count(s, "start", 0, MAX_BLOCK_SIZE), _count(n, "size", 1, MAX_BLOCK_SIZE)
        )
        for u, s, n in items
    )
    return Allocation(fragments)


def parse_allocation_text(text: str) -> Allocation:
    items: list[tuple[object, object, object]] = []
    for part in text.split(",", MAX_FRAGMENTS):
        fields = part.split(":")
        if len(fields) != 3 or not all(f.isdigit() and f.isascii() for f in fields[1:]):
            raise WireError("an allocation is <uuid>:<start>:<size>[,...]")
        if any(len(f) > 9 for f in fields[1:]):
            raise WireError("an allocation offset is out of range")
        items.append((fields[0], int(fields[1]), int(fields[2])))
    return _fragments(items)


def parse_allocation_json(value: object) -> Allocation:
    if not isinstance(value, dict) or set(value) != {"fragments"}:
        raise WireError('an allocation is {"fragments": [...]}')
    fragments = value["fragments"]
    if not isinstance(fragments, list) or len(fragments) > MAX_FRAGMENTS:
        raise WireError(f"fragments must be a list of at most {MAX_FRAGMENTS}")
    items: list[tuple[object, object, object]] = []
    for item in fragments:
        if not isinstance(item, dict) or set(item) != {"block_uuid", "start", "size"}:
            raise WireError('a fragment is {"block_uuid", "start", "size"}')
        items.append((item["block_uuid"], item["start"], item["size"]))
    return _fragments(items)


# -- signatures ---------------------------------------------------------------------------------


def mac(key: bytes, query: bytes, body: bytes) -> bytes:
    """The HMAC-SHA256 of the query string bytes then the body bytes (b"" for a response)."""
    if len(key) != SIGNING_KEY_SIZE:
        raise ValueError("a signing key is 32 PSRD bytes")
    return hmac.new(key, query + body, hashlib.sha256).digest()


def signature_header(allocation: Allocation, key: bytes, query: bytes, body: bytes) -> str:
    tag = base64.b64encode(mac(key, query, body)).decode("ascii")
    return f"{allocation.header_text()}%{tag}"


@dataclass(frozen=True)
class Signature:
    allocation: Allocation
    allocation_text: str
    tag: bytes

    def verify(self, key: bytes, query: bytes, body: bytes) -> bool:
        """Constant-time: the tag against the MAC under `key` (the named PSRD bytes)."""
        return hmac.compare_digest(self.tag, mac(key, query, body))


def parse_signature(header: str | bytes | None) -> Signature:
    if header is None:
        raise WireError(f"the {SIGNATURE_HEADER} header is missing")
    if isinstance(header, bytes):
        try:
            header = header.decode("ascii")
        except UnicodeDecodeError:
            raise WireError(f"the {SIGNATURE_HEADER} header is not ASCII") from None
    if len(header) > MAX_HEADER:
        raise WireError(f"the {SIGNATURE_HEADER} header is too long")
    text, sep, tag_text = header.strip().partition("%")
    if not sep:
        raise WireError(f"the {SIGNATURE_HEADER} header is <allocation>%<base64 MAC>")
    allocation = parse_allocation_text(text)
    if allocation.size != SIGNING_KEY_SIZE:
        raise WireError(f"a signing key allocation is {SIGNING_KEY_SIZE} bytes")
    tag = b64decode(tag_text, "the signature", MAC_SIZE)
    if len(tag) != MAC_SIZE:
        raise WireError("a signature is a 32-byte HMAC-SHA256")
    return Signature(allocation, text, tag)


# -- JSON bodies ---------------------------------------------------------------------------------


def b64decode(text: object, what: str, limit: int) -> bytes:
    if not isinstance(text, str) or len(text) > 4 * (limit // 3 + 1):
        raise WireError(f"{what} must be base64 of at most {limit} bytes")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise WireError(f"{what} is not standard padded base64") from None


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def load_json(body: bytes) -> Any:
    if len(body) > MAX_BODY:
        raise WireError("the body is too large")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise WireError("the body is not JSON") from None


def dump_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("ascii")


def json_object(
    value: object, keys: AbstractSet[str], optional: AbstractSet[str] = frozenset()
) -> dict:
    """`value` as a JSON object with exactly `keys` and any of `optional`, or `WireError`."""
    if not isinstance(value, dict):
        raise WireError("the body must be a JSON object")
    if value.keys() == keys:  # the usual case, compared in C
        return value
    missing = keys - set(value)
    if missing:
        raise WireError(f"the body lacks {sorted(missing)[0]!r}")
    extra = set(value) - keys - optional
    if extra:
        raise WireError(f"the body has an unknown field {sorted(extra)[0]!r}")
    return value


def name(value: object, what: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise WireError(f"{what} must be a name of 1..64 letters, digits, '.', '_' or '-'")
    return value


def key_id(value: object) -> str:
    if not isinstance(value, str) or not KEY_ID.fullmatch(value):
        raise WireError("a key ID must be 1..128 letters, digits, '.', '_' or '-'")
    return value


@dataclass(frozen=True)
class Registration:
    client_name: str
    encryptor_names: tuple[str, ...]

    def encode(self) -> bytes:
        return dump_json(
            {"client_name": self.client_name, "encryptor_names": list(self.encryptor_names)}
        )


def parse_registration(body: bytes) -> Registration:
    obj = json_object(load_json(body), {"client_name"}, frozenset({"encryptor_names"}))
    names = obj.get("encryptor_names", [])
    if not isinstance(names, list) or len(names) > MAX_NAMES:
        raise WireError(f"encryptor_names must be a list of at most {MAX_NAMES} names")
    client = name(obj["client_name"], "client_name")
    return Registration(client, tuple(name(n, "an encryptor name") for n in names))


def parse_hub_name(body: bytes) -> str:
    return name(json_object(load_json(body), {"hub_name"})["hub_name"], "hub_name")


@dataclass(frozen=True, repr=False)
class PsrdBlock:
    block_uuid: str
    data: bytes

    def __repr__(self) -> str:  # PSRD is key material: never shown
        return f"<PsrdBlock {self.block_uuid} {len(self.data)} bytes>"

    def encode(self) -> bytes:
        return dump_json({"block_uuid": self.block_uuid, "data": b64encode(self.data)})


def parse_psrd_block(body: bytes, *, limit: int) -> PsrdBlock:
    if len(body) > 4 * (limit // 3 + 1) + 200:
        raise WireError("the PSRD block is larger than asked for")
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        raise WireError("the body is not JSON") from None
    obj = json_object(obj, {"block_uuid", "data"})
    data = b64decode(obj["data"], "data", limit)
    if not data:
        raise WireError("a PSRD block is not empty")
    return PsrdBlock(_uuid(obj["block_uuid"]), data)


@dataclass(frozen=True, repr=False)
class SharePost:
    master_client_name: str
    master_sae_id: str
    slave_sae_id: str
    user_key_id: str
    share_index: int
    encryption_key_allocation: Allocation
    encrypted_share_value: bytes

    def __repr__(self) -> str:
        return f"<SharePost {self.user_key_id} index={self.share_index}>"

    def encode(self) -> bytes:
        """The body `dump_json` would give for these fields, byte for byte (test_wire)."""
        return (
            f'{{"master_client_name":{_string(self.master_client_name)},'
            f'"master_sae_id":{_string(self.master_sae_id)},'
            f'"slave_sae_id":{_string(self.slave_sae_id)},'
            f'"user_key_id":{_string(self.user_key_id)},'
            f'"share_index":{int(self.share_index)},'
            f'"encryption_key_allocation":{self.encryption_key_allocation.json_text()},'
            f'"encrypted_share_value":"{b64encode(self.encrypted_share_value)}"}}'
        ).encode("ascii")


def _share_fields(obj: dict) -> tuple[int, Allocation, bytes]:
    index = _count(obj["share_index"], "share_index", 0, 253)
    allocation = parse_allocation_json(obj["encryption_key_allocation"])
    value = b64decode(obj["encrypted_share_value"], "encrypted_share_value", MAX_SHARE)
    if not value or len(value) != allocation.size:
        raise WireError("the encryption key allocation must be as long as the share")
    return index, allocation, value


SHARE_POST_KEYS = frozenset(
    {
        "master_client_name",
        "master_sae_id",
        "slave_sae_id",
        "user_key_id",
        "share_index",
        "encryption_key_allocation",
        "encrypted_share_value",
    }
)
SHARE_REPLY_KEYS = frozenset({"share_index", "encryption_key_allocation", "encrypted_share_value"})


def parse_share_post(body: bytes) -> SharePost:
    return share_post_from(load_json(body))


def share_post_from(value: object) -> SharePost:
    """A share POST from its parsed JSON (also one item of a batch)."""
    obj = json_object(value, SHARE_POST_KEYS)
    index, allocation, value = _share_fields(obj)
    return SharePost(
        name(obj["master_client_name"], "master_client_name"),
        name(obj["master_sae_id"], "master_sae_id"),
        name(obj["slave_sae_id"], "slave_sae_id"),
        key_id(obj["user_key_id"]),
        index,
        allocation,
        value,
    )


@dataclass(frozen=True, repr=False)
class ShareReply:
    share_index: int
    encryption_key_allocation: Allocation
    encrypted_share_value: bytes

    def __repr__(self) -> str:
        return f"<ShareReply index={self.share_index}>"

    def encode(self) -> bytes:
        return ("{" + self.json_fields() + "}").encode("ascii")

    def json_fields(self) -> str:
        """The body's fields without the braces (a batch item adds its own)."""
        return (
            f'"share_index":{int(self.share_index)},'
            f'"encryption_key_allocation":{self.encryption_key_allocation.json_text()},'
            f'"encrypted_share_value":"{b64encode(self.encrypted_share_value)}"'
        )


def parse_share_reply(body: bytes) -> ShareReply:
    return share_reply_from(load_json(body))


def share_reply_from(value: object, extra: frozenset[str] = frozenset()) -> ShareReply:
    """A share GET's answer from its parsed JSON; `extra` keys are allowed (a batch item's)."""
    return ShareReply(*_share_fields(json_object(value, SHARE_REPLY_KEYS, extra)))


def xor(data: bytes, pad: bytes) -> bytes:
    if len(data) != len(pad):
        raise ValueError("a one-time pad is as long as the data")
    return (int.from_bytes(data, "big") ^ int.from_bytes(pad, "big")).to_bytes(len(data), "big")
