"""TLS files an operator could get wrong, for tests of the errors they must give."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization

from ..fileutil import write_secret_file


def encrypted_key_copy(key: Path | str, out: Path, passphrase: bytes = b"passphrase") -> Path:
    """Write `key` (an unencrypted PEM private key) to `out` encrypted under `passphrase`
    (PKCS#8, mode 0600); returns `out`. A process must refuse such a key with a clear error,
    never ask for its passphrase."""
    loaded = serialization.load_pem_private_key(Path(key).read_bytes(), None)
    pem = loaded.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )
    write_secret_file(out, pem)
    return out
