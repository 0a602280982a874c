"""CLI subcommands contributed by plugins."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .services import Service


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class CommandRegistry:
    """Passed to `qkdagent_add_commands`; collects the commands a plugin adds."""

    def __init__(self) -> None:
        self.commands: dict[str, Command] = {}

    def add(
        self,
        name: str,
        *,
        help: str,
        configure: Callable[[argparse.ArgumentParser], None],
        run: Callable[[argparse.Namespace], int],
    ) -> None:
        """`configure(parser)` adds arguments; `run(args)` returns the exit code."""
        if name in self.commands:
            raise ValueError(f"command {name!r} is added twice")
        self.commands[name] = Command(name, help, configure, run)


@dataclass(frozen=True)
class DemoLink:
    """A key source for the demo: `service` runs the simulator, the dicts are source tables."""

    description: str
    service: Service
    alice_sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    bob_sources: dict[str, dict[str, Any]] = field(default_factory=dict)
