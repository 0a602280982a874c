"""qkdagent plugin `wireguard`: installs derived secrets as WireGuard peer pre-shared keys."""

from __future__ import annotations

from collections.abc import Callable

import qkdagent

__version__ = "0.1.0"


@qkdagent.hookimpl
def qkdagent_register_sinks(register: Callable[[type[qkdagent.Sink]], None]) -> None:
    from .sink import WireGuardSink

    register(WireGuardSink)
