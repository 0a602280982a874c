"""Where distributions install SoftHSM2's PKCS#11 module; the tests and the benchmark look here.

Part of the test bed, not of the wheel: the sink never guesses; its `module` option (default
`/usr/lib/softhsm/libsofthsm2.so`) names the module to load.
"""

from __future__ import annotations

import os

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",  # Debian/Ubuntu (a link), upstream's default prefix
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",  # Debian/Ubuntu multiarch
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",  # Fedora, RHEL
    "/usr/local/lib/softhsm/libsofthsm2.so",  # built from source
)


def find_module(candidates: tuple[str, ...] = MODULE_CANDIDATES) -> str | None:
    """The first SoftHSM2 module that exists, or None."""
    return next((path for path in candidates if os.path.exists(path)), None)
