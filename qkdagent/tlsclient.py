"""A plugin's TLS client context from configured files (a KME, a QKD module, a hub), with the
errors an operator can act on."""

from __future__ import annotations

import ssl
from pathlib import Path

from .errors import Misconfigured


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    """An encrypted key fails to load instead of OpenSSL prompting on the terminal."""
    raise _EncryptedKey


def client_ssl_context(cert: Path, key: Path, ca: Path, *, what: str) -> ssl.SSLContext:
    """Mutual-TLS client context: `cert`/`key` our identity, `ca` the server's CA (TLS 1.2 at
    least, hostname checked). `Misconfigured` names `what` (say "source 'kme'") and the file: a
    missing file, an encrypted key (a passphrase is never asked for) or an unusable PEM."""
    for option, path in (("cert", cert), ("key", key), ("ca", ca)):
        if not path.is_file():
            raise Misconfigured(f"{what}: {option} file {path} does not exist")
    try:
        context = ssl.create_default_context(cafile=str(ca))
        context.load_cert_chain(str(cert), str(key), password=_no_password)
    except _EncryptedKey:
        raise Misconfigured(
            f"{what}: key file {key} is encrypted (a passphrase is never asked for: give an "
            "unencrypted key, readable by the agent only)"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raise Misconfigured(f"{what}: cannot load the TLS client identity or CA: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
