"""TLS contexts from configured files (a plugin's client to a KME, a QKD module, a hub; a
simulator's or the agent's server), with the errors an operator can act on, and never a
passphrase prompt."""

from __future__ import annotations

import ssl
from pathlib import Path

from .errors import Misconfigured


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    """An encrypted key fails to load instead of OpenSSL prompting on the terminal."""
    raise _EncryptedKey


def load_tls_identity(
    context: ssl.SSLContext, cert: Path | str, key: Path | str | None, *, what: str
) -> None:
    """Load our certificate chain and key (None: the key is in `cert`) into `context`, a
    client's or a server's. An encrypted key is refused: OpenSSL would otherwise ask for its
    passphrase on the terminal, and a process started from one would hang at start-up.
    `Misconfigured` names `what` and the file (a missing file, that encrypted key, a PEM
    that does not load or a key that does not match the certificate)."""
    cert = Path(cert)
    key = None if key is None else Path(key)
    for option, path in (("cert", cert), ("key", key)):
        if path is not None and not path.is_file():
            raise Misconfigured(f"{what}: {option} file {path} does not exist")
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except _EncryptedKey:
        raise Misconfigured(
            f"{what}: key file {key or cert} is encrypted (a passphrase is never asked for: "
            "give an unencrypted key, readable by this process only)"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        files = cert if key is None else f"{cert} and {key}"
        raise Misconfigured(
            f"{what}: cannot load the TLS certificate and key {files}: {exc}"
        ) from None


def client_ssl_context(cert: Path, key: Path, ca: Path, *, what: str) -> ssl.SSLContext:
    """Mutual-TLS client context: `cert`/`key` our identity, `ca` the server's CA (TLS 1.2 at
    least, hostname checked). `Misconfigured` names `what` (say "source 'kme'") and the file: a
    missing file, an encrypted key (a passphrase is never asked for) or an unusable PEM."""
    if not ca.is_file():
        raise Misconfigured(f"{what}: ca file {ca} does not exist")
    try:
        context = ssl.create_default_context(cafile=str(ca))
    except (ssl.SSLError, OSError) as exc:
        raise Misconfigured(f"{what}: cannot load the CA file {ca}: {exc}") from None
    load_tls_identity(context, cert, key, what=what)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
