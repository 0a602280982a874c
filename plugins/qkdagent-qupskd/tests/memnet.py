"""An in-memory network for the protocol's `Network` seam, so agents and the test quPSKd peer
talk under trio's virtual clock. Connecting to an address nobody listens on is refused, as TCP
would; `down` makes an address unreachable (a partition)."""

from __future__ import annotations

import trio
import trio.testing
from qkdagent_qupskd.net import Handler


class MemoryNetwork:
    def __init__(self) -> None:
        self.listeners: dict[tuple[str, int], tuple[trio.Nursery, Handler]] = {}
        self.down: set[tuple[str, int]] = set()
        self.connections: dict[tuple[str, int], int] = {}

    async def serve(
        self,
        host: str,
        port: int,
        handler: Handler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        address = (host, port)
        if address in self.listeners:
            raise OSError(98, f"address {host}:{port} in use")
        try:
            async with trio.open_nursery() as nursery:
                self.listeners[address] = (nursery, handler)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.listeners.pop(address, None)

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        address = (host, port)
        if address in self.down or address not in self.listeners:
            raise ConnectionRefusedError(111, f"connection to {host}:{port} refused")
        nursery, handler = self.listeners[address]
        client, server = trio.testing.memory_stream_pair()
        self.connections[address] = self.connections.get(address, 0) + 1
        nursery.start_soon(handler, server)
        return client
