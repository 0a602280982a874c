"""qkdagent-etsi014: ETSI GS QKD 014 key source (`etsi014`) and KME simulator (`kme-sim`).

Thin on purpose: hook implementations only; importing this module imports no HTTP stack.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import qkdagent
from qkdagent import CommandRegistry, DemoLink, Source

__all__ = ["open_kme_pair", "open_simulator"]


@qkdagent.hookimpl
def qkdagent_register_sources(register: Callable[[type[Source]], None]) -> None:
    from .source import Etsi014Source

    register(Etsi014Source)


@qkdagent.hookimpl
def qkdagent_add_commands(cli: CommandRegistry) -> None:
    from .cli import configure, run

    cli.add("kme-sim", help="run simulated ETSI GS QKD 014 KMEs", configure=configure, run=run)


@qkdagent.hookimpl
def qkdagent_demo_link(directory: Path) -> DemoLink:
    from .demo import demo_link

    return demo_link(directory)


def __getattr__(name: str) -> object:
    if name in ("open_kme_pair", "open_simulator"):
        from . import sim

        return getattr(sim, name)
    raise AttributeError(name)
