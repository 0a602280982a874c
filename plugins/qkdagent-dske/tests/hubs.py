"""In-process security hubs on loopback HTTPS (mutual TLS) for the tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import trio.testing
from qkdagent_dske import batchwire, wire
from qkdagent_dske.hubapp import Hub, HubSettings, Request, Response
from qkdagent_dske.hubserver import serve_hub, server_ssl_context

from qkdagent.testing import PkiFiles, write_test_pki


class LyingHub(Hub):
    """A malicious hub: it hands out a changed share (correctly signed and encrypted)."""

    def _tamper(self) -> None:
        for share in self.shares.values():
            share.value = bytes([share.value[0] ^ 0xA5]) + share.value[1:]

    async def _get_share(self, request: Request) -> Response:
        self._tamper()
        return await super()._get_share(request)

    async def _fetch_batch(self, request: Request) -> Response:
        self._tamper()
        return await super()._fetch_batch(request)


class NoBatchHub(Hub):
    """A hub as dske-python's: no batch routes (404, as FastAPI answers an unknown path)."""

    async def handle(self, request: Request) -> Response:
        if request.path.endswith(("/key-shares", "/key-shares-fetch")):
            return Response(404, b'{"detail":"Not Found"}')
        return await super().handle(request)


class ReorderingHub(Hub):
    """A malicious hub: it answers a batch fetch with its items reversed, signed afresh (it
    holds the hub-owned PSRD)."""

    reordered = 0

    async def _fetch_batch(self, request: Request) -> Response:
        response = await super()._fetch_batch(request)
        answer = json.loads(response.body)
        if response.status != 200 or len(answer["shares"]) < 2:
            return response
        self.reordered += 1
        body = json.dumps({"shares": answer["shares"][::-1]}).encode()
        client = json.loads(request.body)["client_name"]
        ((alloc, key),), _ = self.book.allocate(client, "hub", [wire.SIGNING_KEY_SIZE])
        return Response(
            200, body, ((wire.SIGNATURE_HEADER, wire.signature_header(alloc, key, b"", body)),)
        )


class ForgingHub(Hub):
    """A hub (or whoever sits in its place) whose batch post answers carry a forged MAC."""

    async def _post_batch(self, request: Request) -> Response:
        response = await super()._post_batch(request)
        if response.status != 200 or request.method != "POST":
            return response
        header = dict(response.headers)[wire.SIGNATURE_HEADER]
        allocation, mac = header.split("%")
        forged = allocation + "%" + ("A" if mac[0] != "A" else "B") + mac[1:]
        return Response(200, response.body, ((wire.SIGNATURE_HEADER, forged),))


class SmallBatchHub(Hub):
    """A hub that takes batches of at most `max_batch` items (its probe answer says so, and
    it refuses larger batches with 413)."""

    max_batch = 2

    async def handle(self, request: Request) -> Response:
        if request.path.endswith(("/key-shares", "/key-shares-fetch")):
            if request.method == "GET":
                return Response(200, batchwire.encode_capabilities(self.max_batch))
            try:
                count = len(batchwire.parse_post_batch(request.body).shares)
            except batchwire.WireError:
                count = len(batchwire.parse_fetch_batch(request.body).key_ids)
            if count > self.max_batch:
                return Response(413, b'{"detail":"too many items"}')
        return await super().handle(request)


@dataclass
class RunningHub:
    name: str
    db_path: Path
    pki: PkiFiles
    nursery: trio.Nursery
    port: int = 0
    hub: Hub | None = None
    scope: trio.CancelScope | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    lying: bool = False
    batches: bool = True
    small_batches: bool = False
    kind: type[Hub] | None = None
    """A hub class to run instead (a hostile one)."""

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/hub/{self.name}"

    async def start(self) -> None:
        cls = LyingHub if self.lying else Hub if self.batches else NoBatchHub
        cls = SmallBatchHub if self.small_batches else self.kind or cls
        self.hub = cls(HubSettings(self.name, **self.settings), self.db_path)
        leaf = self.pki[self.name]
        context = server_ssl_context(leaf.cert, leaf.key, self.pki.ca_cert)
        self.scope = trio.CancelScope()
        hub, scope = self.hub, self.scope

        async def serve(task_status: trio.TaskStatus[int]) -> None:
            with scope:
                try:
                    await serve_hub(
                        hub, port=self.port, ssl_context=context, task_status=task_status
                    )
                finally:
                    hub.close()

        self.port = await self.nursery.start(serve)

    def stop(self) -> None:
        """Take the hub down (its port stays reserved for `start`)."""
        assert self.scope is not None
        self.scope.cancel()

    async def restart(self) -> None:
        self.stop()
        await trio.testing.wait_all_tasks_blocked()
        await self.start()


def hub_table(pki: PkiFiles, hubs: list[RunningHub], agent: str) -> dict[str, Any]:
    leaf = pki[agent]
    return {
        h.name: {"url": h.url, "ca": str(pki.ca_cert), "cert": str(leaf.cert), "key": str(leaf.key)}
        for h in hubs
    }


@asynccontextmanager
async def open_hubs(
    directory: Path, names: list[str], agents: tuple[str, ...] = ("alice", "bob"), **settings: Any
) -> AsyncIterator[tuple[PkiFiles, list[RunningHub]]]:
    pki = write_test_pki(directory / "pki", [*names, *agents])
    async with trio.open_nursery() as nursery:
        hubs = [
            RunningHub(n, directory / "hubs" / f"{n}.sqlite", pki, nursery, settings=settings)
            for n in names
        ]
        (directory / "hubs").mkdir(parents=True, exist_ok=True)
        for hub in hubs:
            await hub.start()
        yield pki, hubs
        nursery.cancel_scope.cancel()
