"""Who is at the other end of a TLS connection: the names in its certificate, and whether they
name the peer agent a link expects (DESIGN v2 §4, `peer_identity`). Pure, no I/O.

Mutual TLS alone admits every holder of a certificate from the deployment CA; a link only
trusts the one agent configured as its peer. The expected identity is matched against the
certificate's subjectAltName DNS and URI entries; only a certificate without any of those is
matched by its subject common name (RFC 6125's rule, so a SAN-bearing certificate cannot be
passed off by an unrelated CN).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .text import printable


@dataclass(frozen=True)
class PeerIdentity:
    """The names a verified peer certificate carries."""

    dns: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    common_names: tuple[str, ...] = ()

    def matches(self, expected: str) -> bool:
        """Whether the certificate names `expected` (DNS case-insensitively, URI exactly)."""
        if self.dns or self.uris:
            wanted = expected.lower()
            return any(d.lower() == wanted for d in self.dns) or expected in self.uris
        return expected in self.common_names

    def describe(self) -> str:
        """A short, log-safe rendering of the names (for 'certificate names X, not Y')."""
        names = [*self.dns, *self.uris] or list(self.common_names)
        shown = ", ".join(printable(n, 80) for n in names[:4]) or "nothing"
        return shown + (", ..." if len(names) > 4 else "")

    @classmethod
    def from_peercert(cls, cert: Mapping[str, Any] | None) -> PeerIdentity:
        """From `ssl.SSLSocket.getpeercert()`'s dict (a verified certificate); empty if none."""
        if not cert:
            return cls()
        dns: list[str] = []
        uris: list[str] = []
        for kind, value in _pairs(cert.get("subjectAltName", ())):
            if kind == "DNS":
                dns.append(value)
            elif kind == "URI":
                uris.append(value)
        cns = [
            value
            for rdn in cert.get("subject", ())
            for key, value in _pairs(rdn)
            if key == "commonName"
        ]
        return cls(tuple(dns), tuple(uris), tuple(cns))


def _pairs(items: Iterable[Any]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        if isinstance(item, tuple) and len(item) == 2:
            key, value = item
            if isinstance(key, str) and isinstance(value, str):
                pairs.append((key, value))
    return pairs
