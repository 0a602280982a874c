"""TLS identities from configured files (`qkdagent.load_tls_identity`): an encrypted key is a
configuration error naming the file, never a passphrase prompt (OpenSSL's default asks on the
terminal, and a process started from one hangs there), for every context the agent builds."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from qkdagent import Misconfigured, client_ssl_context, load_tls_identity, write_test_pki
from qkdagent.config import TlsFiles
from qkdagent.peering import client_ssl_context as peer_client_context
from qkdagent.peerserver import server_ssl_context
from qkdagent.testing import encrypted_key_copy


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """(cert, key, encrypted key, ca)"""
    pki = write_test_pki(tmp_path / "pki", ["alice"])
    leaf = pki["alice"]
    return leaf.cert, leaf.key, encrypted_key_copy(leaf.key, tmp_path / "enc.key"), pki.ca_cert


def test_an_encrypted_key_is_refused_without_a_prompt(
    files: tuple[Path, Path, Path, Path],
) -> None:
    cert, _, encrypted, _ = files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with pytest.raises(Misconfigured, match=r"^agent\.tls: key file .*enc\.key is encrypted"):
        load_tls_identity(context, cert, encrypted, what="agent.tls")


def test_the_agents_own_contexts_refuse_it_too(files: tuple[Path, Path, Path, Path]) -> None:
    cert, _, encrypted, ca = files
    tls = TlsFiles(cert, encrypted, ca)
    for build in (server_ssl_context, peer_client_context):
        with pytest.raises(Misconfigured, match="is encrypted"):
            build(tls)
    with pytest.raises(Misconfigured, match=r"^source 'kme': key file .* is encrypted"):
        client_ssl_context(cert, encrypted, ca, what="source 'kme'")


def test_a_key_in_the_certificate_file_and_the_errors(
    files: tuple[Path, Path, Path, Path], tmp_path: Path
) -> None:
    cert, key, _, ca = files
    both = tmp_path / "both.pem"
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    load_tls_identity(context, both, None, what="x")  # the key is in the certificate file
    with pytest.raises(Misconfigured, match=r"^x: key file .*nowhere\.key does not exist"):
        load_tls_identity(context, cert, tmp_path / "nowhere.key", what="x")
    with pytest.raises(Misconfigured, match=r"^x: cannot load the TLS certificate and key .*"):
        load_tls_identity(context, str(cert), str(ca), what="x")  # a certificate, not a key
    with pytest.raises(Misconfigured, match=r"and .*ca\.pem: "):  # names both files
        load_tls_identity(context, cert, ca, what="x")
    with pytest.raises(Misconfigured, match=r"^x: ca file .*nowhere\.pem does not exist"):
        client_ssl_context(cert, key, tmp_path / "nowhere.pem", what="x")
