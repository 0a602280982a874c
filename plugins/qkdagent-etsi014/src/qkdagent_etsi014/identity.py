"""Which SAE (or KME) a verified TLS certificate names, never taken from the request.

ETSI GS QKD 014 leaves open which certificate field carries the SAE ID, so the rule is
configurable: the subject CN (default, as most implementations do), the first DNS or URI subject
alternative name, or an explicit table of SHA-256 certificate fingerprints. The same rules let an
SAE confirm its KME's ID from the KME's server certificate (§1.1), not from what the KME says.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.x509.oid import NameOID

MODES = ("cn", "san-dns", "san-uri", "fingerprint")


def fingerprint(der: bytes) -> str:
    """SHA-256 of the DER certificate, lower-case hex without separators."""
    return hashlib.sha256(der).hexdigest()


def normalise_fingerprint(text: str) -> str:
    value = text.replace(":", "").strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"{text!r} is not a SHA-256 fingerprint (64 hex digits)")
    return value


@dataclass(frozen=True)
class IdentityRule:
    mode: str = "cn"
    fingerprints: Mapping[str, str] = field(default_factory=dict)
    """SHA-256 fingerprint -> SAE ID, for mode "fingerprint"."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"identity must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.mode == "fingerprint" and not self.fingerprints:
            raise ValueError('identity "fingerprint" needs a fingerprint table')
        object.__setattr__(
            self,
            "fingerprints",
            {normalise_fingerprint(k): v for k, v in self.fingerprints.items()},
        )

    def identify(self, der: bytes | None) -> str | None:
        """The SAE ID of a (TLS-verified) certificate, or None if the rule finds none."""
        if not der:
            return None
        if self.mode == "fingerprint":
            return self.fingerprints.get(fingerprint(der))
        cert = x509.load_der_x509_certificate(der)
        if self.mode == "cn":
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            value = names[0].value if len(names) == 1 else None
            return value if isinstance(value, str) and value else None
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return None
        kind = x509.DNSName if self.mode == "san-dns" else x509.UniformResourceIdentifier
        values = san.get_values_for_type(kind)
        return values[0] if values else None


def mismatch(rule: IdentityRule, der: bytes | None, expected: str) -> str | None:
    """Why the certificate `der` does not name `expected` under `rule`; None when it does."""
    try:
        found = rule.identify(der)
    except ValueError:  # not parseable as X.509 (cannot happen after a TLS verification)
        found = None
    if found == expected:
        return None
    field = {"cn": "subject CN", "san-dns": "first DNS SAN", "san-uri": "first URI SAN"}
    if not der:
        return "no certificate is available"
    if found is None:
        if rule.mode == "fingerprint":
            return "its SHA-256 fingerprint is not in the fingerprint table"
        return f"it has no usable {field[rule.mode]}"
    how = "its fingerprint maps to" if rule.mode == "fingerprint" else f"its {field[rule.mode]} is"
    shown = "".join(c if c.isprintable() else "?" for c in found)[:80]
    return f"{how} {shown!r}"
