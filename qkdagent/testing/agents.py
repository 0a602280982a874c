"""Two real agents, `alice` and `bob`, in this process over loopback HTTPS with mutual TLS.

    async with open_agent_pair(tmp_path, alice={"sinks": {...}}, bob={"sinks": {...}},
                               link={"interval": 2, "reject_after": 6}) as pair:
        await pair.wait_for_epoch(3)
        pair.secret("alice", "wg")          # the Secret alice derived for sink "wg"
        pair.alice.components.sinks["wg"].sink   # or pair.sink("alice", "wg")
        await pair.stop("bob")

Each side's dict may hold `sources` and `sinks` tables (as in a config file), `plugins` (names
to load) and `agent` (extra `[agent]` settings). Without `sources`, both sides share a fresh
simulated link (`memory` source, pool named after the pair). The link is named `alice-bob`;
`alice` sorts first and is the initiator unless `link` sets roles.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from ..agent import Agent
from ..builtin.loopback import LINK, pair_configs
from ..config import parse_config
from ..secret import Secret
from .local import LocalNetwork


class AgentPair:
    def __init__(
        self, nursery: trio.Nursery, configs: dict[str, dict[str, Any]], network: Any = None
    ) -> None:
        self._nursery = nursery
        self.network = network
        self.configs = configs
        self.agents: dict[str, Agent] = {}
        self._stops: dict[str, trio.Event] = {}
        self._done: dict[str, trio.Event] = {}

    @property
    def alice(self) -> Agent:
        return self.agents["alice"]

    @property
    def bob(self) -> Agent:
        return self.agents["bob"]

    async def start(self, name: str) -> Agent:
        """Start (or restart, with the same state dir) one side."""
        config = parse_config(self.configs[name])
        transport = None
        if self.network is not None:
            transport = self.network.transport(name, f"https://{config.agent.listen}")
        agent = Agent(config, transport=transport)
        stop, done = trio.Event(), trio.Event()

        async def run(task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await agent.run(shutdown_trigger=stop.wait, task_status=task_status)
            finally:
                done.set()

        await self._nursery.start(run)
        self.agents[name], self._stops[name], self._done[name] = agent, stop, done
        return agent

    async def stop(self, name: str) -> None:
        """Graceful stop of one side (as SIGTERM would)."""
        self._stops[name].set()
        await self._done[name].wait()

    def epoch(self, name: str) -> int:
        record = self.agents[name].link(LINK).record
        return record.epoch if record else 0

    def secret(self, name: str, sink: str) -> Secret:
        """The secret `name` derived for its sink `sink` in its current epoch."""
        agent = self.agents[name]
        runtime = agent.link(LINK)
        assert runtime.record is not None
        return runtime.record.outputs[agent.components.sinks[sink].label]

    def sink(self, name: str, sink: str) -> Any:
        return self.agents[name].components.sinks[sink].sink

    async def wait_for_epoch(self, epoch: int, *, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Wait until both sides have committed `epoch` or later (bounded, polls every 10 ms)."""
        with trio.fail_after(timeout):
            while min(self.epoch(n) for n in self.agents) < epoch:  # noqa: ASYNC110
                await trio.sleep(0.01)

    async def wait_for_installs(
        self,
        epoch: int,
        sink: str,
        *,
        timeout: float = 30.0,  # noqa: ASYNC109
    ) -> None:
        """Wait until both sides' `recording` sink `sink` holds an install of `epoch` or later.

        A side commits an epoch before it installs it, so right after `wait_for_epoch` the
        last install may still be under way (bounded, polls every 10 ms)."""

        def installed(name: str) -> int:
            return max((r.epoch for r in self.sink(name, sink).installs), default=0)

        with trio.fail_after(timeout):
            while min(installed(n) for n in self.agents) < epoch:  # noqa: ASYNC110
                await trio.sleep(0.01)


@asynccontextmanager
async def open_agent_pair(
    directory: Path,
    *,
    alice: Mapping[str, Any] | None = None,
    bob: Mapping[str, Any] | None = None,
    link: Mapping[str, Any] | None = None,
    start: bool = True,
    local: bool = False,
) -> AsyncIterator[AgentPair]:
    """`local=True` connects the agents in-process (no sockets, no threads): use it under
    trio's virtual clock. Otherwise they talk HTTPS with mutual TLS over loopback."""
    configs = pair_configs(Path(directory), alice=alice, bob=bob, link=link)
    network = LocalNetwork() if local else None
    async with trio.open_nursery() as nursery:
        pair = AgentPair(nursery, configs, network)
        if start:
            # bob (responder) first so alice's first rotation finds him listening
            await pair.start("bob")
            await pair.start("alice")
        try:
            yield pair
        finally:
            for name in list(pair.agents):
                if not pair._done[name].is_set():
                    pair._stops[name].set()
