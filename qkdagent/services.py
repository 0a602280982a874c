"""Long-running tasks plugins add to an agent (a simulator, an exporter)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio


@dataclass(frozen=True)
class Service:
    """`run(task_status=...)` is started inside the agent's nursery and cancelled at shutdown."""

    name: str
    run: Callable[..., Awaitable[Any]]


async def start_services(nursery: trio.Nursery, services: list[Service]) -> None:
    for service in services:
        await nursery.start(_named(service))


def _named(service: Service) -> Callable[..., Awaitable[Any]]:
    async def run(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        await service.run(task_status=task_status)

    run.__name__ = f"service:{service.name}"
    return run
