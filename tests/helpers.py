"""Shared helpers for the core tests."""

from __future__ import annotations

import base64
import collections
import os
from collections.abc import Callable
from pathlib import Path
from typing import Self

import trio

from qkdagent.fileutil import write_secret_file
from qkdagent.pki import write_test_pki


def write_agent_files(directory: Path, names: tuple[str, ...] = ("alice", "bob")) -> dict[str, str]:
    """PKI and a bootstrap secret; returns paths usable in a config template."""
    pki = write_test_pki(directory / "pki", list(names))
    bootstrap = directory / "bootstrap.key"
    write_secret_file(bootstrap, base64.b64encode(os.urandom(32)))
    paths = {"ca": str(pki.ca_cert), "bootstrap": str(bootstrap), "dir": str(directory)}
    for name in names:
        paths[f"{name}_cert"] = str(pki[name].cert)
        paths[f"{name}_key"] = str(pki[name].key)
    return paths


def alice_config(paths: dict[str, str], extra: str = "", link: str = "") -> str:
    return f"""
[agent]
name = "alice"
listen = "127.0.0.1:17447"
state_dir = "{paths["dir"]}/state"
plugins = ["memory"]

[agent.tls]
cert = "{paths["alice_cert"]}"
key = "{paths["alice_key"]}"
ca = "{paths["ca"]}"

[links.alice-bob]
peer = "bob"
peer_url = "https://127.0.0.1:17448"
bootstrap = {{ file = "{paths["bootstrap"]}" }}
sources = ["sim"]
sinks = ["psk"]
{link}

[sources.sim]
type = "memory"

[sinks.psk]
type = "file"
path = "{paths["dir"]}/psk.key"
{extra}
"""


async def until(predicate: Callable[[], bool], limit: float = 600, every: float = 1) -> None:
    """Wait (bounded, polling every `every` seconds: each second suits trio's virtual clock)
    until `predicate()`."""
    with trio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110 - virtual clock
            await trio.sleep(every)


class _Installed(trio.abc.Instrument):
    """An instrument installed on the running loop for the length of a `with` block."""

    def __enter__(self) -> Self:
        trio.lowlevel.add_instrument(self)
        return self

    def __exit__(self, *exc: object) -> None:
        trio.lowlevel.remove_instrument(self)


class ScheduleCount(_Installed):
    """Counts the schedule points the current task passes while installed (each one is a step
    of the task more): a deterministic check that a call does or does not yield."""

    def __init__(self) -> None:
        self.task = trio.lowlevel.current_task()
        self.points = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.points += 1


class TaskSteps(_Installed):
    """Counts the steps of every task (each time the scheduler resumes one) while installed:
    how often tasks were woken, as deterministic as the code under test."""

    def __init__(self) -> None:
        self.by_task: collections.Counter[trio.lowlevel.Task] = collections.Counter()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.by_task[task] += 1

    @property
    def total(self) -> int:
        return self.by_task.total()

    def of_tasks_named(self, suffix: str) -> int:
        """Steps of the tasks whose name ends with `suffix` (a function's qualified name)."""
        return sum(n for task, n in self.by_task.items() if task.name.endswith(suffix))
