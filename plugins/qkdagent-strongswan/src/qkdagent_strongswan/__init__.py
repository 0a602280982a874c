"""qkdagent plugin `strongswan`: the sink `strongswan-ppk` (IKEv2 PPK, RFC 8784, over VICI)."""

from __future__ import annotations

from collections.abc import Callable

import qkdagent

from .sink import PpkRepair, StrongswanPpkSink
from .watch import service

__all__ = ["PpkRepair", "StrongswanPpkSink"]


@qkdagent.hookimpl
def qkdagent_register_sinks(register: Callable[[type[qkdagent.Sink]], None]) -> None:
    register(StrongswanPpkSink)


@qkdagent.hookimpl
def qkdagent_register_services(
    register: Callable[[qkdagent.Service], None], context: qkdagent.PluginContext
) -> None:
    """The periodic check that re-pushes PPKs an operator's swanctl reload removed."""
    register(service(context))
