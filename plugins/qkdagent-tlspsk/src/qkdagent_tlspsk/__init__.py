"""qkdagent-tlspsk: TLS-PSK secrets files for stunnel, nghttpx, GnuTLS, OpenSSL, patched nginx."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import qkdagent

from .sink import TlsPskSink

__all__ = ["TlsPskSink"]


@qkdagent.hookimpl
def qkdagent_register_sinks(register: Callable[[type[qkdagent.Sink]], None]) -> None:
    register(TlsPskSink)


@qkdagent.hookimpl
def qkdagent_register_services(
    register: Callable[[qkdagent.Service], None], context: qkdagent.PluginContext
) -> None:
    from .service import run_expiry

    register(qkdagent.Service("tls-psk-expiry", partial(run_expiry, context.state_dir)))
