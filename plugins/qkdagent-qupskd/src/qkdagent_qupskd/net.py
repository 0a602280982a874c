"""Where the protocol's bytes go: TCP by default; tests put an in-memory network here so the
whole exchange runs under trio's virtual clock."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

Handler = Callable[[trio.abc.Stream], Awaitable[None]]


class Network(Protocol):
    async def serve(
        self, host: str, port: int, handler: Handler, *, task_status: trio.TaskStatus[None]
    ) -> None:
        """Listen on `host:port` only and run `handler` per connection until cancelled."""

    async def connect(self, host: str, port: int) -> trio.abc.Stream: ...


class TcpNetwork:
    async def serve(
        self,
        host: str,
        port: int,
        handler: Handler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        task_status.started()
        await trio.serve_listeners(handler, listeners)

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        return await trio.open_tcp_stream(host, port)


class _Default:
    network: Network = TcpNetwork()


def network() -> Network:
    return _Default.network


def use_network(replacement: Network) -> Network:
    """Swap the network (tests); returns the previous one."""
    previous, _Default.network = _Default.network, replacement
    return previous
