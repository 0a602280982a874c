"""Extending the simulator's throw-away PKI with certificates for new KME and SAE names.

`qkdagent kme-sim --pki DIR --kme KME_C=carol` on a directory made for KME_A/KME_B must not
fail for want of `KME_C.pem`: the missing leaves are issued by the CA already there (its key is
`ca.key`, written by `--make-pki`), with the same profile as `qkdagent.testing.write_test_pki`
(CN = name, SANs name/localhost/127.0.0.1/::1, server and client auth), so the certificates
clients already hold stay valid.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qkdagent import write_secret_file

HOSTS = ("localhost", "127.0.0.1", "::1")
MAX_PEM_BYTES = 64 * 1024


class PkiError(ValueError):
    """The directory cannot serve the requested names (message fit for one CLI line)."""


def safe_name(name: str) -> str:
    """File stem for a certificate name (as `write_test_pki` spells it)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def missing(directory: Path, names: list[str]) -> list[str]:
    """The names without both a certificate and a key file in `directory`."""
    return [
        name
        for name in names
        if not (directory / f"{safe_name(name)}.pem").is_file()
        or not (directory / f"{safe_name(name)}.key").is_file()
    ]


def _read(path: Path, what: str) -> bytes:
    try:
        if not path.is_file():
            raise PkiError(f"{path}: {what} is not a regular file")
        with path.open("rb") as handle:
            data = handle.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise PkiError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    if len(data) > MAX_PEM_BYTES:
        raise PkiError(f"{path}: the {what} is larger than {MAX_PEM_BYTES} bytes")
    return data


def extend_pki(directory: Path, names: list[str]) -> list[str]:
    """Issue a certificate and key for every name in `names` that `directory` lacks, signed by
    its CA; returns the names issued. PkiError if the CA cannot sign (no or bad `ca.key`)."""
    needed = missing(directory, names)
    if not needed:
        return []
    ca_key_path = directory / "ca.key"
    if not ca_key_path.exists():
        raise PkiError(
            f"{directory} has no certificate for {', '.join(needed)} and no ca.key to issue "
            "one: add their .pem/.key files, or use a new directory (created with every name)"
        )
    try:
        ca_cert = x509.load_pem_x509_certificate(_read(directory / "ca.pem", "CA certificate"))
    except ValueError as exc:
        raise PkiError(f"{directory / 'ca.pem'}: not a PEM certificate ({exc})") from None
    try:
        ca_key = serialization.load_pem_private_key(_read(ca_key_path, "CA key"), password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{ca_key_path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or ca_key.public_key() != (
        ca_cert.public_key()
    ):
        raise PkiError(f"{ca_key_path} is not the key of {directory / 'ca.pem'}")
    now = datetime.datetime.now(datetime.UTC)
    start = now - datetime.timedelta(minutes=5)
    end = min(ca_cert.not_valid_after_utc, now + datetime.timedelta(days=30))
    if end <= start:
        raise PkiError(f"{directory / 'ca.pem'} has expired: use a new directory")
    for name in needed:
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            cert = _leaf(name, key, ca_cert, ca_key, start, end)
        except ValueError as exc:
            raise PkiError(f"cannot issue a certificate for {name!r}: {exc}") from None
        stem = safe_name(name)
        try:
            write_secret_file(directory / f"{stem}.key", _key_pem(key))
            (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        except OSError as exc:
            raise PkiError(f"{directory}: cannot write {stem}.pem/.key: {exc.strerror}") from None
    return needed


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _leaf(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    start: datetime.datetime,
    end: datetime.datetime,
) -> x509.Certificate:
    alt: list[x509.GeneralName] = [x509.DNSName(name)]
    for host in HOSTS:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
