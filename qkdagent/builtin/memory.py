"""Built-in plugin `memory`: the simulated link source and the recording sink of the test kit."""

from __future__ import annotations

from collections.abc import Callable

from ..hookspecs import hookimpl
from ..interfaces import Sink, Source
from ..testing.memory import MemorySource, RecordingSink


@hookimpl
def qkdagent_register_sources(register: Callable[[type[Source]], None]) -> None:
    register(MemorySource)


@hookimpl
def qkdagent_register_sinks(register: Callable[[type[Sink]], None]) -> None:
    register(RecordingSink)
