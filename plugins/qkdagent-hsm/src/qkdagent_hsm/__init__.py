"""qkdagent-hsm: sink type `pkcs11`, storing each link's derived secret in a PKCS#11 token.

Importing this package loads no PKCS#11 code; `python-pkcs11` is imported in the worker thread
when a sink is prepared.
"""

from __future__ import annotations

from collections.abc import Callable

import qkdagent

from .sink import Pkcs11Sink

__all__ = ["Pkcs11Sink"]


@qkdagent.hookimpl
def qkdagent_register_sinks(register: Callable[[type[qkdagent.Sink]], None]) -> None:
    register(Pkcs11Sink)
