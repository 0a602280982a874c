"""The client's PSRD pools, one pair per hub, durable in a `PsrdStore`.

Allocations are on disk before their bytes are returned (a crash after that wastes the bytes,
never reuses them); the hub's allocations are checked against the ranges it has used before,
and marked used (their bytes zeroed) once the answer they sign has verified; the source records
them durably, one batch for all hubs of a key, before it returns or uses the key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import trio

from . import wire
from .pool import Change, PoolBook, PsrdError, PsrdExhausted
from .store import PsrdStore


class BadReply(Exception):
    """A hub's answer failed a check (signature, allocation, format): the hub is not trusted
    for this exchange."""


SIGNING_RESERVE = 8
"""Batch signing keys allocated per durable commit (a crash wastes at most these)."""


class ClientPsrd:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.store: PsrdStore | None = None
        self.book = PoolBook()
        self._signing: dict[str, list[tuple[wire.Allocation, bytes]]] = {}
        """Per hub, client-owned signing keys allocated (durably) and not used yet."""

    async def open(self) -> None:
        if self.store is None:
            store = await trio.to_thread.run_sync(PsrdStore, self.path, "client")
            try:
                self.book = await trio.to_thread.run_sync(store.load)
            except BaseException:
                store.close()
                raise
            self.store = store

    def close(self) -> None:
        self._signing.clear()
        if self.store is not None:
            self.store.close()
            self.store = None

    def __repr__(self) -> str:
        return f"<ClientPsrd {self.path} blocks={len(self.book.blocks)}>"

    async def _durable(self, change: Change) -> None:
        assert self.store is not None
        await self.store.durable(change)

    def free(self, hub: str, owner: str) -> int:
        return self.book.free(hub, owner, mine=owner == "client")

    async def add_block(self, hub: str, owner: str, block: wire.PsrdBlock) -> None:
        await self._durable(self.book.add(hub, owner, block.block_uuid, block.data))

    async def allocate(
        self, wanted: Mapping[str, Sequence[int]]
    ) -> dict[str, list[tuple[wire.Allocation, bytes]]]:
        """Client-owned allocations per hub, durable together; a hub whose pool is too low is
        left out (its share is not sent)."""
        out: dict[str, list[tuple[wire.Allocation, bytes]]] = {}
        change = Change()
        for hub, sizes in wanted.items():
            try:
                allocated, one = self.book.allocate(hub, "client", sizes)
            except PsrdExhausted:
                continue
            out[hub] = allocated
            change.merge(one)
        await self._durable(change)
        return out

    async def signing_key(self, hub: str) -> tuple[wire.Allocation, bytes]:
        """32 client-owned bytes to sign one batch: from a reserve that is allocated
        `SIGNING_RESERVE` at a time in one durable commit (`PsrdExhausted` if the pool is)."""
        reserve = self._signing.setdefault(hub, [])
        if not reserve:
            sizes = [wire.SIGNING_KEY_SIZE] * SIGNING_RESERVE
            try:
                allocated, change = self.book.allocate(hub, "client", sizes)
            except PsrdExhausted:
                allocated, change = self.book.allocate(hub, "client", sizes[:1])
            await self._durable(change)
            reserve.extend(reversed(allocated))
        return reserve.pop()

    def reserved(self) -> list[wire.Allocation]:
        """Signing keys allocated and not used yet (spent here, still unspent at the hub)."""
        return [a for keys in self._signing.values() for a, _ in keys]

    def check_reply(
        self, hub: str, signature: str | None, body: bytes, others: Sequence[wire.Allocation]
    ) -> tuple[list[bytes], Change]:
        """Check the hub's signature over `body` and mark the hub-owned PSRD it and `others`
        used (in memory, at once: concurrent replies cannot both pass); the bytes of `others`
        (the pad of a returned share) and the change that records them, which the caller
        makes durable (`record`, one for all hubs of a key) before acting on the answer."""
        try:
            parsed = wire.parse_signature(signature)
        except wire.WireError as exc:
            raise BadReply(str(exc)) from None
        try:
            key, *rest = self.book.peek(hub, "hub", [parsed.allocation, *others])
        except PsrdError as exc:
            raise BadReply(str(exc)) from None
        if not parsed.verify(key, b"", body):
            raise BadReply("bad DSKE-Signature on the answer")
        return rest, self.book.consume([parsed.allocation, *others])

    async def record(self, change: Change) -> None:
        """Make `change` (from `check_reply`) durable."""
        await self._durable(change)
