"""qkdagent plugin `example`: the `example-shareddir` source and the `example-file` sink.

The module named by the entry point implements the registration hooks; it must import quickly
and do no I/O (the agent imports it at start-up, `qkdagent check` too).
"""

from __future__ import annotations

from collections.abc import Callable

from qkdagent import Sink, Source, hookimpl

from .sink import FileSink
from .source import SharedDirSource

__version__ = "0.1.0"


@hookimpl
def qkdagent_register_sources(register: Callable[[type[Source]], None]) -> None:
    register(SharedDirSource)


@hookimpl
def qkdagent_register_sinks(register: Callable[[type[Sink]], None]) -> None:
    register(FileSink)


__all__ = ["FileSink", "SharedDirSource"]
