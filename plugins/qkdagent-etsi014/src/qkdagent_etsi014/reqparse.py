"""ETSI GS QKD 014 requests, KME side: pure parsing of query strings and JSON bodies.

Each parser returns a typed request or raises a 400 `ApiError` whose message names the field, so
hostile input never reaches the key store. Range checks that depend on the KME's limits (number,
size) are made by `KmeNetwork`, also before any key is taken.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

from .network import ApiError, KeyRequest
from .wire import MAX_KEY_ID_BYTES, WireError, loads, utf8_length

_DECIMAL = re.compile(r"^[0-9]{1,9}$")
MAX_QUERY_FIELDS = 8


def bad(message: str) -> ApiError:
    return ApiError(400, message)


def _query(query: bytes, allowed: tuple[str, ...]) -> dict[str, str]:
    try:
        text = query.decode("ascii")
    except UnicodeDecodeError:
        raise bad("query string is not ASCII") from None
    if not text:
        return {}
    try:
        pairs = parse_qsl(
            text,
            keep_blank_values=True,
            strict_parsing=True,
            max_num_fields=MAX_QUERY_FIELDS,
            errors="strict",
        )
    except (ValueError, UnicodeDecodeError):
        raise bad("query string is malformed") from None
    result: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            raise bad(f"query parameter {_shown(name)} is not allowed here")
        if name in result:
            raise bad(f"query parameter {name} is given twice")
        result[name] = value
    return result


def _decimal(name: str, value: str) -> int:
    if not _DECIMAL.match(value):
        raise bad(f"{name} must be a positive decimal integer")
    return int(value)


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{name} must be an integer")
    if not 0 <= value < 2**31:
        raise bad(f"{name} is out of range")
    return value


def _body_object(body: bytes, *, empty_ok: bool) -> Mapping[str, Any]:
    if not body.strip() and empty_ok:
        return {}
    try:
        data = loads(body)
    except WireError as exc:
        raise bad(f"request body: {exc}") from None
    if not isinstance(data, Mapping):
        raise bad("request body must be a JSON object")
    return data


def _extensions(name: str, value: Any) -> tuple[str, ...]:
    """An array of single-member objects (`[{"abc_route_type": "direct"}]`); returns the names."""
    if not isinstance(value, list):
        raise bad(f"{name} must be an array of objects")
    names = []
    for index, item in enumerate(value):
        if not isinstance(item, Mapping) or len(item) != 1:
            raise bad(f"{name}[{index}] must be an object with exactly one member")
        names.append(next(iter(item)))
    return tuple(names)


def enc_get(query: bytes) -> KeyRequest:
    params = _query(query, ("number", "size"))
    return KeyRequest(
        number=_decimal("number", params["number"]) if "number" in params else None,
        size=_decimal("size", params["size"]) if "size" in params else None,
    )


_ENC_FIELDS = {
    "number",
    "size",
    "additional_slave_SAE_IDs",
    "extension_mandatory",
    "extension_optional",
}


def enc_post(body: bytes) -> KeyRequest:
    data = _body_object(body, empty_ok=True)
    for name in data:
        if name not in _ENC_FIELDS:
            raise bad(f"unknown member {_shown(name)} in Key request")
    number = _integer("number", data["number"]) if "number" in data else None
    size = _integer("size", data["size"]) if "size" in data else None
    extra: tuple[str, ...] = ()
    if "additional_slave_SAE_IDs" in data:
        value = data["additional_slave_SAE_IDs"]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise bad("additional_slave_SAE_IDs must be an array of non-empty strings")
        if len(value) > 64:
            raise bad("additional_slave_SAE_IDs is too long")
        extra = tuple(value)
    mandatory: tuple[str, ...] = ()
    if "extension_mandatory" in data:
        mandatory = _extensions("extension_mandatory", data["extension_mandatory"])
    if "extension_optional" in data:
        _extensions("extension_optional", data["extension_optional"])  # shape only; ignored
    return KeyRequest(number, size, extra, mandatory)


def _key_id(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise bad(f"{name} must be a non-empty string")
    if utf8_length(value) > MAX_KEY_ID_BYTES:
        raise bad(f"{name} is not Unicode or longer than {MAX_KEY_ID_BYTES} bytes")
    return value


def dec_get(query: bytes) -> list[str]:
    params = _query(query, ("key_ID",))
    if "key_ID" not in params:
        raise bad("key_ID query parameter is required")
    return [_key_id("key_ID", params["key_ID"])]


def dec_post(body: bytes) -> list[str]:
    data = _body_object(body, empty_ok=False)
    for name in data:
        if name not in ("key_IDs", "key_IDs_extension"):
            raise bad(f"unknown member {_shown(name)} in Key IDs")
    items = data.get("key_IDs")
    if not isinstance(items, list) or not items:
        raise bad("key_IDs must be a non-empty array")
    ids = []
    for index, item in enumerate(items):
        if not isinstance(item, Mapping) or "key_ID" not in item:
            raise bad(f"key_IDs[{index}] must be an object with a key_ID")
        for name in item:
            if name not in ("key_ID", "key_ID_extension"):
                raise bad(f"unknown member {_shown(name)} in key_IDs[{index}]")
        ids.append(_key_id(f"key_IDs[{index}].key_ID", item["key_ID"]))
    return ids


def _shown(value: str, limit: int = 40) -> str:
    text = "".join(c if c.isprintable() else "?" for c in value)
    return repr(text[:limit] + ("..." if len(text) > limit else ""))
