"""qkdm-sim's key supplies: the core seam (`qkdagent.KeySupply`, `CsprngSupply`,
entry-point supplies, `prebuilt_supplies`) with qkdm-sim's flags."""

from __future__ import annotations

from collections.abc import Iterable

from qkdagent import SupplyFactory, prebuilt_supplies

BUILTIN = "csprng"


def supplies_for(spec: str | None, links: Iterable[tuple[str, str]]) -> SupplyFactory | None:
    """`--supply spec`'s factory with its supplies made for `links` (None: the CSPRNG one)."""
    return prebuilt_supplies(spec, links, builtin_flags="--rate")
