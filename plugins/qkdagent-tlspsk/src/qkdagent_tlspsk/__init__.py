"""qkdagent-tlspsk: TLS-PSK secrets files for stunnel, nghttpx, GnuTLS, OpenSSL, patched nginx."""

from __future__ import annotations

from collections.abc import Callable

import qkdagent

from .sink import TlsPskSink

__all__ = ["TlsPskSink"]


@qkdagent.hookimpl
def qkdagent_register_sinks(register: Callable[[type[qkdagent.Sink]], None]) -> None:
    register(TlsPskSink)
