"""Built-in plugin `memory`: the test kit's simulated sources and its recording sink."""

from __future__ import annotations

from collections.abc import Callable

from ..hookspecs import hookimpl
from ..interfaces import Sink, Source
from ..testing.keydir import KeyDirSource
from ..testing.memory import MemorySource, RecordingSink


@hookimpl
def qkdagent_register_sources(register: Callable[[type[Source]], None]) -> None:
    register(MemorySource)
    register(KeyDirSource)


@hookimpl
def qkdagent_register_sinks(register: Callable[[type[Sink]], None]) -> None:
    register(RecordingSink)
