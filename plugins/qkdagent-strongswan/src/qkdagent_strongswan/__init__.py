"""qkdagent plugin `strongswan`: the sink `strongswan-ppk` (IKEv2 PPK, RFC 8784, over VICI)."""

from __future__ import annotations

from collections.abc import Callable

import qkdagent

from .sink import PpkRepair, StrongswanPpkSink

__all__ = ["PpkRepair", "StrongswanPpkSink"]


@qkdagent.hookimpl
def qkdagent_register_sinks(register: Callable[[type[qkdagent.Sink]], None]) -> None:
    register(StrongswanPpkSink)
