"""qkdagent-dske: DSKE client source (`dske`) and security hub (`qkdagent dske-hub`).

Speaks dske-python's wire format (REFERENCE §7.1). Thin on purpose: hook implementations only;
importing this module imports no HTTP stack.
"""

from __future__ import annotations

from collections.abc import Callable

import qkdagent
from qkdagent import CommandRegistry, Source


@qkdagent.hookimpl
def qkdagent_register_sources(register: Callable[[type[Source]], None]) -> None:
    from .source import DskeSource

    register(DskeSource)


@qkdagent.hookimpl
def qkdagent_add_commands(cli: CommandRegistry) -> None:
    from .cli import configure, run

    cli.add("dske-hub", help="run a DSKE security hub", configure=configure, run=run)
