"""qkdagent plugin `bb84`: a simulated BB84 link with the full post-processing stack.

The engine (`physics`, `engine`, `cascade`, `hashing`, `finitekey`) is pure numpy; `source`
adapts it to the agent. Importing this module does no I/O.
"""

from __future__ import annotations

from collections.abc import Callable

from qkdagent import CommandRegistry, Source, hookimpl

from .source import Bb84Source

__version__ = "0.1.0"


@hookimpl
def qkdagent_register_sources(register: Callable[[type[Source]], None]) -> None:
    register(Bb84Source)


@hookimpl
def qkdagent_add_commands(cli: CommandRegistry) -> None:
    from .cli import configure, run

    cli.add("bb84", help="run a simulated BB84 link (run: per block; sweep: CSV, plot)",
            configure=configure, run=run)  # fmt: skip


__all__ = ["Bb84Source"]
