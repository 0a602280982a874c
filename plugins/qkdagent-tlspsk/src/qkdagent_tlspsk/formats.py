"""PSK secrets file formats of the supported consumers: render, parse and validate (pure).

Every format is line-oriented `identity<sep>key` except `openssl`, a bare hex key for
`openssl s_server/s_client -psk`. Rendering validates against the strictest known rule of the
consumer, so a file the consumer would reject (and, for stunnel, silently keep the old keys on) is
never written. Error messages name the identity and the rule, never key bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MIN_KEY_BYTES = 16
"""stunnel refuses shorter keys; RFC 4279 keys shorter than 128 bits are weak anyway."""
MAX_KEY_BYTES = 512
"""OpenSSL 3 `PSK_MAX_PSK_LEN`."""
MAX_IDENTITY_BYTES = 255
"""stunnel rejects 256+ (measured); OpenSSL's `PSK_MAX_IDENTITY_LEN` is 256 including the NUL."""

_HEX = re.compile(r"[0-9a-fA-F]+")


class FormatError(ValueError):
    """An identity, key or file does not satisfy the consumer's rules (no key bytes inside)."""


@dataclass(frozen=True)
class Entry:
    """One identity and its key. `repr` hides the key."""

    identity: str
    key: bytes = field(repr=False)


@dataclass(frozen=True)
class PskFormat:
    """One consumer's file format."""

    name: str
    colon_free: bool = True
    """The consumer splits each line at the first colon, so identities cannot contain one."""
    hex_prefix: str = ""
    """Written between the separator and the hex key (`{HEX}` for the nginx ssl_psk_file patch)."""
    comments: bool = False
    """`#` lines are comments (nghttpx); stunnel instead fails on them, so we never write them."""
    hex_identities: bool = False
    """GnuTLS: identities that need it are written as `#` + hex of the UTF-8 bytes."""
    single_key: bool = False
    """The file holds one bare hex key and no identity (openssl -psk)."""
    silent_reload_failure: bool = False
    """A reload with a bad file only logs and keeps the old keys (stunnel): confirm it."""
    experimental: bool = False
    """The line format comes from an incomplete source and was never read by the consumer."""

    # -- validation -------------------------------------------------------------------------

    def check_identity(self, identity: str) -> None:
        if not isinstance(identity, str) or not identity:
            raise FormatError("PSK identity is empty")
        raw = identity.encode("utf-8")
        if len(raw) > MAX_IDENTITY_BYTES:
            raise FormatError(
                f"PSK identity {identity[:40]!r}... is {len(raw)} bytes; the limit is "
                f"{MAX_IDENTITY_BYTES}"
            )
        if not identity.isprintable():
            raise FormatError(f"PSK identity {identity!r} contains control characters")
        if identity != identity.strip():
            raise FormatError(f"PSK identity {identity!r} has leading or trailing whitespace")
        if self.single_key or self.hex_identities:
            return
        if self.colon_free and ":" in identity:
            raise FormatError(
                f"PSK identity {identity!r} contains ':'; {self.name} splits lines at the first "
                "colon (use format 'gnutls', or an identity template without ':')"
            )
        if identity.startswith("#"):
            raise FormatError(
                f"PSK identity {identity!r} starts with '#' (a comment in {self.name})"
            )

    @staticmethod
    def check_key(key: bytes) -> None:
        if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
            raise FormatError(
                f"PSK is {len(key)} bytes; consumers need {MIN_KEY_BYTES}-{MAX_KEY_BYTES} bytes"
            )

    # -- rendering and parsing --------------------------------------------------------------

    def _identity_text(self, identity: str) -> str:
        if self.hex_identities and _gnutls_needs_hex(identity):
            return "#" + identity.encode("utf-8").hex()
        return identity

    def render(self, entries: list[Entry]) -> bytes:
        """The file content for `entries` in order; raises FormatError if any entry is invalid."""
        if self.single_key:
            if len(entries) != 1:
                raise FormatError(f"format {self.name} holds exactly one key, not {len(entries)}")
            self.check_key(entries[0].key)
            return entries[0].key.hex().encode("ascii")
        seen: set[str] = set()
        lines = []
        for entry in entries:
            self.check_identity(entry.identity)
            self.check_key(entry.key)
            if entry.identity in seen:
                raise FormatError(f"PSK identity {entry.identity!r} appears twice")
            seen.add(entry.identity)
            lines.append(
                f"{self._identity_text(entry.identity)}:{self.hex_prefix}{entry.key.hex()}"
            )
        return "".join(line + "\n" for line in lines).encode("utf-8")

    def parse(self, data: bytes) -> list[Entry]:
        """Read back a file this format renders (tolerating blank lines and, where the consumer
        does, comments); raises FormatError naming the line number, never its content."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.name} PSK file is not UTF-8") from None
        if self.single_key:
            stripped = text.strip()
            if not stripped:
                return []
            return [Entry("", _decode_hex(stripped, 1))]
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or (self.comments and line.lstrip().startswith("#")):
                continue
            if ":" not in line:
                raise FormatError(f"line {number} is not in identity:key form")
            identity, _, key_text = line.partition(":")
            if self.hex_identities and identity.startswith("#"):
                try:
                    identity = bytes.fromhex(identity[1:]).decode("utf-8")
                except ValueError:
                    raise FormatError(f"line {number} has a malformed hex identity") from None
            if self.hex_prefix:
                if not key_text.startswith(self.hex_prefix):
                    raise FormatError(f"line {number} key lacks the {self.hex_prefix} prefix")
                key_text = key_text[len(self.hex_prefix) :]
            entries.append(Entry(identity, _decode_hex(key_text, number)))
        return entries


def _decode_hex(text: str, number: int) -> bytes:
    if not _HEX.fullmatch(text) or len(text) % 2:
        raise FormatError(f"line {number} key is not an even-length hex string")
    return bytes.fromhex(text)


def _gnutls_needs_hex(identity: str) -> bool:
    # psktool writes '#'+hex whenever the name would not survive the `user:key` split.
    return ":" in identity or identity.startswith("#") or not identity.isascii()


FORMATS: dict[str, PskFormat] = {
    "stunnel": PskFormat("stunnel", silent_reload_failure=True),
    "nghttpx": PskFormat("nghttpx", comments=True),
    "gnutls": PskFormat("gnutls", hex_identities=True),
    "openssl": PskFormat("openssl", single_key=True),
    "nginx-patch": PskFormat("nginx-patch", hex_prefix="{HEX}", experimental=True),
}
