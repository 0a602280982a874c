"""Mutual TLS for the classical channel: contexts from configured files, the peer's name checked.

Both ends present a certificate from the configured CA (TLS >= 1.2). The initiator checks the
responder's certificate against `peer_name` as a hostname (the `ssl` module's own check); the
responder checks the initiator's certificate names against its `peer_name` itself (a server has
no hostname to check): DNS names case-insensitively, URIs exactly, the common name only when the
certificate has no subject alternative names.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkdagent import load_tls_identity

ALPN = "qkdagent-bb84/1"


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path


def _load(ctx: ssl.SSLContext, files: TlsFiles) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(files.ca))
    load_tls_identity(ctx, files.cert, files.key, what="TLS")
    ctx.set_alpn_protocols([ALPN])
    return ctx


def server_context(files: TlsFiles) -> ssl.SSLContext:
    return _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), files)


def client_context(files: TlsFiles) -> ssl.SSLContext:
    ctx = _load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), files)
    ctx.check_hostname = True
    return ctx


def _pairs(items: Iterable[Any]) -> Iterable[tuple[str, str]]:
    for item in items:
        if isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item):
            yield item


def certificate_names(cert: Mapping[str, Any] | None) -> tuple[list[str], list[str], list[str]]:
    """(DNS names, URIs, common names) of a verified peer certificate (`getpeercert()`)."""
    if not cert:
        return [], [], []
    san = list(_pairs(cert.get("subjectAltName", ())))
    dns = [v for k, v in san if k == "DNS"]
    uris = [v for k, v in san if k == "URI"]
    cns = [v for rdn in cert.get("subject", ()) for k, v in _pairs(rdn) if k == "commonName"]
    return dns, uris, cns


def names_peer(cert: Mapping[str, Any] | None, expected: str) -> bool:
    dns, uris, cns = certificate_names(cert)
    if dns or uris:
        return any(d.lower() == expected.lower() for d in dns) or expected in uris
    return expected in cns
