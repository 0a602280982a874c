"""Throw-away PKI for demos, simulators and tests: one CA and leaf certificates usable for
mutual TLS, and a way to add leaves for new names to an existing one.

Not for production: keys are generated here and written unencrypted (mode 0600).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .fileutil import write_secret_file

HOSTS = ("localhost", "127.0.0.1", "::1")
MAX_PEM_BYTES = 64 * 1024


class PkiError(ValueError):
    """A PKI directory cannot serve the requested names (message fit for one CLI line)."""


@dataclass(frozen=True)
class LeafFiles:
    name: str
    cert: Path
    key: Path


@dataclass(frozen=True)
class PkiFiles:
    ca_cert: Path
    ca_key: Path
    leaves: dict[str, LeafFiles]

    def __getitem__(self, name: str) -> LeafFiles:
        return self.leaves[name]


def file_stem(name: str) -> str:
    """The file name (without .pem/.key) of `name`'s certificate and key."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_test_pki(
    directory: str | Path,
    names: list[str],
    *,
    ca_name: str = "qkdagent test CA",
    hosts: tuple[str, ...] = HOSTS,
    days: int = 30,
) -> PkiFiles:
    """Create a CA and one certificate per name (CN = name, SAN = name + `hosts`).

    Every leaf is valid for both TLS server and client authentication, so one certificate serves
    an agent's listener and its outgoing calls.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(ca_name))
        .issuer_name(_name(ca_name))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_cert_path, ca_key_path = directory / "ca.pem", directory / "ca.key"
    ca_cert_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    write_secret_file(ca_key_path, _key_pem(ca_key))
    leaves = {
        name: _write_leaf(directory, name, ca_cert, ca_key, hosts, start, end) for name in names
    }
    return PkiFiles(ca_cert_path, ca_key_path, leaves)


def extend_test_pki(
    directory: str | Path, names: list[str], *, hosts: tuple[str, ...] = HOSTS, days: int = 30
) -> list[str]:
    """Issue a certificate and key, from the CA already in `directory` (`ca.pem`, `ca.key`),
    for every name in `names` that has none; returns the names issued. Certificates already
    there, and the CA, stay as they are, so what clients hold stays valid. `PkiError` if the
    CA cannot sign (no, bad or expired `ca.key`/`ca.pem`) or a file cannot be written."""
    directory = Path(directory)
    needed = [
        name
        for name in names
        if not (directory / f"{file_stem(name)}.pem").is_file()
        or not (directory / f"{file_stem(name)}.key").is_file()
    ]
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
    end = min(ca_cert.not_valid_after_utc, now + datetime.timedelta(days=days))
    if end <= start:
        raise PkiError(f"{directory / 'ca.pem'} has expired: use a new directory")
    for name in needed:
        try:
            _write_leaf(directory, name, ca_cert, ca_key, hosts, start, end)
        except ValueError as exc:
            raise PkiError(f"cannot issue a certificate for {name!r}: {exc}") from None
        except OSError as exc:
            raise PkiError(f"{directory}: cannot write {file_stem(name)}.pem/.key: {exc}") from None
    return needed


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


def _write_leaf(
    directory: Path,
    name: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: tuple[str, ...],
    start: datetime.datetime,
    end: datetime.datetime,
) -> LeafFiles:
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = [x509.DNSName(name)]
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
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
    stem = file_stem(name)
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    write_secret_file(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return LeafFiles(name, cert_path, key_path)
