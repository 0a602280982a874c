"""qkdagent plugin `bb84`: a simulated BB84 link with the full post-processing stack.

The engine (`physics`, `engine`, `cascade`, `hashing`, `finitekey`) is pure numpy; `source`
adapts it to the agent. Importing this module does no I/O.
"""

from __future__ import annotations

from collections.abc import Callable

from qkdagent import Source, hookimpl

from .source import Bb84Source

__version__ = "0.1.0"


@hookimpl
def qkdagent_register_sources(register: Callable[[type[Source]], None]) -> None:
    register(Bb84Source)


__all__ = ["Bb84Source"]
