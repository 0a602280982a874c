"""ETSI GS QKD 014 wire format, client side: pure parsing and validation of KME answers.

Everything a KME sends is untrusted input. These functions turn a response body into validated
`(key_ID, bytes)` pairs or raise `WireError` naming the field that is wrong; nothing here does I/O,
so the checks are unit-tested without a server. Error texts never contain key material.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

MAX_KEY_ID_BYTES = 256
UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)

# Messages ETSI GS QKD 014 V1.1.1 mandates for 400 answers (§6, Table 10 and the method tables).
MSG_SIZE_MULTIPLE_OF_8 = "size shall be a multiple of 8"
MSG_EXT_MANDATORY_UNSUPPORTED = "not all extension_mandatory parameters are supported"
MSG_KEYS_NOT_FOUND = "one or more keys specified are not found on KME"
MSG_KEY_ACCESS_ERROR = "key data access error"

STATUS_INT_FIELDS = (
    "key_size",
    "stored_key_count",
    "max_key_count",
    "max_key_per_request",
    "max_key_size",
    "min_key_size",
    "max_SAE_ID_count",
)
STATUS_STR_FIELDS = ("source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID")


class WireError(ValueError):
    """A KME answer does not follow ETSI GS QKD 014; the message names the field."""


@dataclass(frozen=True)
class KmeStatus:
    """The Status object of Get status (sizes in bits)."""

    source_kme_id: str
    target_kme_id: str
    master_sae_id: str
    slave_sae_id: str
    key_size: int
    stored_key_count: int
    max_key_count: int
    max_key_per_request: int
    max_key_size: int
    min_key_size: int
    max_sae_id_count: int

    def describe(self) -> str:
        return (
            f"KME {self.source_kme_id} -> {self.target_kme_id}: default key size {self.key_size} "
            f"bits (min {self.min_key_size}, max {self.max_key_size}), up to "
            f"{self.max_key_per_request} keys per request, {self.stored_key_count}/"
            f"{self.max_key_count} keys stored, multicast to {self.max_sae_id_count} extra SAEs"
        )

    def mismatch(self, key_size: int, kme_id: str | None, sae_id: str | None) -> str | None:
        """Why this KME cannot serve a source so configured; None when it can."""
        if kme_id is not None and self.source_kme_id != kme_id:
            return f"the KME says it is KME {self.source_kme_id!r}, kme_id is {kme_id!r}"
        if sae_id is not None and self.master_sae_id != sae_id:
            return (
                f"the KME identifies this certificate as SAE {self.master_sae_id!r}, "
                f"sae_id is {sae_id!r}"
            )
        if not self.min_key_size <= key_size <= self.max_key_size:
            return (
                f"key_size {key_size} is outside the KME's range "
                f"{self.min_key_size}..{self.max_key_size} bits"
            )
        return None


def loads(body: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate member names."""

    def no_constants(name: str) -> Any:
        raise WireError(f"JSON constant {name} is not allowed")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for name, value in pairs:
            if name in result:
                raise WireError(f"member {_shown(name)} appears twice")
            result[name] = value
        return result

    try:
        text = body.decode("utf-8")
        return json.loads(text, parse_constant=no_constants, object_pairs_hook=no_duplicates)
    except UnicodeDecodeError:
        raise WireError("body is not UTF-8") from None
    except RecursionError:
        raise WireError("JSON is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise WireError(f"body is not JSON ({exc.msg} at position {exc.pos})") from None
    except WireError:
        raise
    except ValueError:  # an integer of more than 4300 digits (int max_str_digits)
        raise WireError("body is not acceptable JSON (a number is too long)") from None


def parse_status(data: Any) -> KmeStatus:
    if not isinstance(data, Mapping):
        raise WireError("Status is not a JSON object")
    values: dict[str, Any] = {}
    for name in STATUS_STR_FIELDS:
        value = data.get(name)
        if not isinstance(value, str) or not value:
            raise WireError(f"Status field {name} is missing or not a string")
        values[name] = value
    for name in STATUS_INT_FIELDS:
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise WireError(f"Status field {name} is missing or not a non-negative integer")
        values[name] = value
    return KmeStatus(
        values["source_KME_ID"],
        values["target_KME_ID"],
        values["master_SAE_ID"],
        values["slave_SAE_ID"],
        values["key_size"],
        values["stored_key_count"],
        values["max_key_count"],
        values["max_key_per_request"],
        values["max_key_size"],
        values["min_key_size"],
        values["max_SAE_ID_count"],
    )


def utf8_length(text: str) -> int:
    """Length in UTF-8; a string with a lone surrogate (JSON "\\ud800") counts as too long."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return 1 << 62


def check_key_id(value: Any, *, strict_uuid: bool) -> str:
    if not isinstance(value, str):
        raise WireError("key_ID is not a string")
    if not value or utf8_length(value) > MAX_KEY_ID_BYTES:
        raise WireError(f"key_ID is empty, not Unicode or longer than {MAX_KEY_ID_BYTES} bytes")
    if strict_uuid and not UUID_RE.match(value):
        raise WireError(f"key_ID {_shown(value)} is not a UUID")
    if not value.isprintable():
        raise WireError("key_ID contains control characters")
    return value


def decode_key(value: Any, size_bits: int) -> bytes:
    """Strict standard base64 (RFC 4648 §4, padded) of exactly `size_bits` bits."""
    if not isinstance(value, str):
        raise WireError("key is not a string")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise WireError("key is not strict standard base64") from None
    if base64.b64encode(raw).decode("ascii") != value:
        raise WireError("key is not canonical base64 (bad padding or trailing bits)")
    expected = (size_bits + 7) // 8
    if len(raw) != expected:
        raise WireError(f"key holds {len(raw) * 8} bits, {size_bits} were requested")
    return raw


MAX_VARIANT = 32
"""Longest member name taken as a case/underscore variant of a standard one (`KeyId`,
`key_id`, `KEY_ID`): a KME could otherwise pad `k___...___ey` to a megabyte, which the
source's warning would quote and remember."""


def _field(obj: Mapping[str, Any], name: str, variants: list[str]) -> Any:
    """Member `name`, or a case/underscore variant of it (recorded in `variants`)."""
    if name in obj:
        return obj[name]
    wanted = name.lower().replace("_", "")
    matches = [
        k
        for k in obj
        if isinstance(k, str) and len(k) <= MAX_VARIANT and k.lower().replace("_", "") == wanted
    ]
    if len(matches) > 1:
        raise WireError(f"members {', '.join(map(_shown, matches))} are ambiguous")
    if matches:
        variants.append(f"{_shown(matches[0])} for {name!r}")
        return obj[matches[0]]
    return None


def parse_key_container(
    data: Any,
    *,
    number: int,
    size_bits: int,
    strict_uuid: bool = True,
    expected_ids: list[str] | None = None,
    on_variant: Callable[[str], None] | None = None,
    at_most: bool = False,
) -> list[tuple[str, bytes]]:
    """Validate a Key container and return `(key_ID, key bytes)` in the KME's order.

    `at_most`: 1 to `number` keys (and of `expected_ids`, some) are accepted, for an answer to a
    call for several keys from a KME that gives fewer than asked for (the caller checks the count).

    Accepts `keys`/`Keys` (Table 11 vs the JSON example) and, reporting them through `on_variant`,
    other spellings (`key_id`) and a bare key object in place of a one-element array.
    """
    variants: list[str] = []
    if not isinstance(data, Mapping):
        raise WireError("Key container is not a JSON object")
    keys = data.get("keys", data.get("Keys"))
    if "keys" in data and "Keys" in data:
        raise WireError("Key container has both 'keys' and 'Keys'")
    if keys is None:
        keys = _field(data, "keys", variants)
    if isinstance(keys, Mapping):
        variants.append("a key object instead of an array for 'keys'")
        keys = [keys]
    if not isinstance(keys, list):
        raise WireError("Key container has no 'keys' array")
    if not (1 <= len(keys) <= number if at_most else len(keys) == number):
        raise WireError(f"Key container holds {len(keys)} keys, {number} were requested")
    result: list[tuple[str, bytes]] = []
    seen: set[str] = set()
    for index, item in enumerate(keys):
        if not isinstance(item, Mapping):
            raise WireError(f"keys[{index}] is not an object")
        try:
            key_id = check_key_id(_field(item, "key_ID", variants), strict_uuid=strict_uuid)
            raw = decode_key(_field(item, "key", variants), size_bits)
        except WireError as exc:
            raise WireError(f"keys[{index}]: {exc}") from None
        if key_id in seen:
            raise WireError(f"keys[{index}]: key_ID {_shown(key_id)} appears twice")
        seen.add(key_id)
        result.append((key_id, raw))
    if expected_ids is not None and (
        not seen.issubset(expected_ids) if at_most else sorted(seen) != sorted(expected_ids)
    ):
        raise WireError("Key container holds other key_IDs than the ones requested")
    if variants and on_variant is not None:
        for variant in dict.fromkeys(variants):
            on_variant(variant)
    return result


def error_message(body: bytes, limit: int = 200) -> str | None:
    """The `message` of an Error object, sanitised and shortened; None if there is none."""
    try:
        data = loads(body)
    except WireError:
        return None
    if not isinstance(data, Mapping) or not isinstance(data.get("message"), str):
        return None
    text = "".join(c if c.isprintable() else "?" for c in data["message"])
    return text[:limit] + ("..." if len(text) > limit else "")


def _shown(value: str, limit: int = 64) -> str:
    """A value from a peer, safe to print: printable and bounded."""
    text = "".join(c if c.isprintable() else "?" for c in value)
    return repr(text[:limit] + ("..." if len(text) > limit else ""))
