"""Parse the token-selecting subset of PKCS#11 URIs (RFC 7512) and match tokens against it.

`pkcs11:token=qkdagent;serial=437b30905126d867?module-path=/usr/lib/softhsm/libsofthsm2.so`
selects a token. Object attributes (`object`, `id`, `type`) are refused, since this sink names
its objects itself, and so is `pin-value`, since PINs are given by reference, never inline.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from qkdagent import decimal

TOKEN_ATTRS = {
    "token": "label",
    "manufacturer": "manufacturer",
    "serial": "serial",
    "model": "model",
}
SLOT_ATTRS = {"slot-id"}
IGNORED_LIBRARY_ATTRS = {"library-manufacturer", "library-description", "library-version"}
OBJECT_ATTRS = {"object", "id", "type"}


class UriError(ValueError):
    """The URI is malformed or asks for something this sink does not support."""


@dataclass(frozen=True)
class TokenSelector:
    """Which token to use: every given field must match (a token label alone is typical)."""

    label: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    slot_id: int | None = None

    def matches(
        self, *, label: str, manufacturer: str, serial: str, model: str, slot_id: int
    ) -> bool:
        wanted = (
            (self.label, label),
            (self.manufacturer, manufacturer),
            (self.serial, serial),
            (self.model, model),
        )
        if any(want is not None and want != have.strip() for want, have in wanted):
            return False
        return self.slot_id is None or self.slot_id == slot_id

    def describe(self) -> str:
        parts = [
            f"{name}={value!r}"
            for name, value in (
                ("token", self.label),
                ("manufacturer", self.manufacturer),
                ("serial", self.serial),
                ("model", self.model),
                ("slot-id", self.slot_id),
            )
            if value is not None
        ]
        return ", ".join(parts) or "any token"


@dataclass(frozen=True)
class ParsedUri:
    selector: TokenSelector
    module_path: str | None


def _decode(value: str, name: str) -> str:
    try:
        return unquote_to_bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UriError(f"attribute {name!r} is not valid UTF-8 after percent-decoding") from exc


def _pairs(part: str, sep: str) -> list[tuple[str, str]]:
    pairs = []
    for item in part.split(sep):
        if not item:
            continue
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise UriError(f"attribute {item!r} is not name=value")
        pairs.append((name.lower(), _decode(value, name)))
    return pairs


def parse_uri(uri: str) -> ParsedUri:
    """Parse a PKCS#11 URI that selects a token; raise `UriError` saying what is wrong."""
    scheme, colon, rest = uri.partition(":")
    if not colon or scheme.lower() != "pkcs11":
        raise UriError("must start with 'pkcs11:'")
    path, _, query = rest.partition("?")
    fields: dict[str, str] = {}
    slot_id: int | None = None
    seen: set[str] = set()
    for name, value in _pairs(path, ";"):
        if name in seen:
            raise UriError(f"attribute {name!r} is given twice")
        seen.add(name)
        if name in OBJECT_ATTRS:
            raise UriError(f"attribute {name!r} names an object; the sink names its objects itself")
        if name in TOKEN_ATTRS:
            fields[TOKEN_ATTRS[name]] = value
        elif name in SLOT_ATTRS:
            slot_id = decimal(value, 20)
            if slot_id is None:
                raise UriError("slot-id must be a decimal number")
        elif name not in IGNORED_LIBRARY_ATTRS and not name.startswith("slot-"):
            raise UriError(f"unknown path attribute {name!r}")
    module_path = None
    for name, value in _pairs(query, "&"):
        if name == "pin-value":
            raise UriError(
                "pin-value is not accepted; give the PIN as pin = {file=...} or {env=...}"
            )
        if name == "pin-source":
            raise UriError("pin-source is not supported; give the PIN as pin = {file=...}")
        if name == "module-path":
            if module_path is not None:
                raise UriError("module-path is given twice")
            module_path = value
        elif name != "module-name":
            raise UriError(f"unknown query attribute {name!r}")
    if not fields and slot_id is None:
        raise UriError("selects no token (give at least token=<label> or serial=<serial>)")
    return ParsedUri(TokenSelector(**fields, slot_id=slot_id), module_path)
