"""qkdagent-pqc: an ML-KEM (FIPS 203) key source (`mlkem`) with forward secrecy,
`qkdagent pqc keygen` for its static key pair, and a pqc-only demo link.

Thin on purpose: hook implementations only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import qkdagent
from qkdagent import CommandRegistry, DemoLink, Source


@qkdagent.hookimpl
def qkdagent_register_sources(register: Callable[[type[Source]], None]) -> None:
    from .source import MlkemSource

    register(MlkemSource)


@qkdagent.hookimpl
def qkdagent_add_commands(cli: CommandRegistry) -> None:
    from .cli import configure, run

    cli.add("pqc", help="ML-KEM static keys for the mlkem source", configure=configure, run=run)


@qkdagent.hookimpl
def qkdagent_demo_link(directory: Path) -> DemoLink:
    from .demo import demo_link

    return demo_link(directory)
