"""qkdagent-etsi004: ETSI GS QKD 004 key source (`etsi004`) and QKD module simulator (`qkdm-sim`).

Thin on purpose: hook implementations only; importing this module imports no network code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import qkdagent
from qkdagent import CommandRegistry, DemoLink, Source


@qkdagent.hookimpl
def qkdagent_register_sources(register: Callable[[type[Source]], None]) -> None:
    from .source import Etsi004Source

    register(Etsi004Source)


@qkdagent.hookimpl
def qkdagent_add_commands(cli: CommandRegistry) -> None:
    from .cli import configure, run

    cli.add("qkdm-sim", help="run simulated ETSI GS QKD 004 modules", configure=configure, run=run)


@qkdagent.hookimpl
def qkdagent_demo_link(directory: Path) -> DemoLink:
    from .demo import demo_link

    return demo_link(directory)
