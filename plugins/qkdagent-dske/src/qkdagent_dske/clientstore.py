"""The client's PSRD pools, one pair per hub, durable in SQLite.

Allocations are committed to disk before their bytes are returned (a crash after that loses
the bytes, never reuses them); the hub's allocations are checked against the ranges it has used
before, and recorded only once the answer they sign has verified.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import trio

from . import wire
from .pool import Change, PoolBook, PsrdDb, PsrdError, PsrdExhausted


class BadReply(Exception):
    """A hub's answer failed a check (signature, allocation, format): the hub is not trusted
    for this exchange."""


class ClientPsrd:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.db: PsrdDb | None = None
        self.book = PoolBook()
        self.lock = trio.Lock()

    async def open(self) -> None:
        if self.db is None:
            db = await trio.to_thread.run_sync(PsrdDb, self.path)
            self.book = await trio.to_thread.run_sync(db.load)
            self.db = db

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    def __repr__(self) -> str:
        return f"<ClientPsrd {self.path} blocks={len(self.book.blocks)}>"

    async def _commit(self, changes: Sequence[Change]) -> None:
        """Commit, then apply in memory; shielded, so a cancellation cannot leave memory behind
        the disk (which would hand out the same PSRD again)."""
        assert self.db is not None
        sql = [s for c in changes for s in c.sql]
        with trio.CancelScope(shield=True):
            if sql:
                await trio.to_thread.run_sync(self.db.commit, sql)
            for change in changes:
                self.book.apply(change)

    def free(self, hub: str, owner: str) -> int:
        return self.book.free(hub, owner, mine=owner == "client")

    async def add_block(self, hub: str, owner: str, block: wire.PsrdBlock) -> None:
        async with self.lock:
            await self._commit([self.book.add(hub, owner, block.block_uuid, block.data)])

    async def allocate(
        self, wanted: Mapping[str, Sequence[int]]
    ) -> dict[str, list[tuple[wire.Allocation, bytes]]]:
        """Client-owned allocations per hub in one durable transaction; a hub whose pool is
        too low is left out (its share is not sent)."""
        async with self.lock:
            out: dict[str, list[tuple[wire.Allocation, bytes]]] = {}
            changes = []
            for hub, sizes in wanted.items():
                try:
                    allocated, change = self.book.allocate(hub, "client", sizes)
                except PsrdExhausted:
                    continue
                # pools of different hubs are disjoint: applying in turn is safe
                out[hub] = allocated
                changes.append(change)
            await self._commit(changes)
            return out

    async def verify_reply(
        self, hub: str, signature: str | None, body: bytes, others: Sequence[wire.Allocation]
    ) -> list[bytes]:
        """Check the hub's signature over `body` and record the hub-owned PSRD it and `others`
        used; the bytes of `others` (the pad of a returned share)."""
        try:
            parsed = wire.parse_signature(signature)
        except wire.WireError as exc:
            raise BadReply(str(exc)) from None
        async with self.lock:
            try:
                key, *rest = self.book.peek(hub, "hub", [parsed.allocation, *others])
            except PsrdError as exc:
                raise BadReply(str(exc)) from None
            if not parsed.verify(key, b"", body):
                raise BadReply("bad DSKE-Signature on the answer")
            await self._commit([self.book.consume([parsed.allocation, *others])])
            return rest
