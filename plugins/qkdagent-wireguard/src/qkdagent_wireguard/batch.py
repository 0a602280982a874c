"""Coalesce concurrent PSK operations on one interface into one backend round trip.

A gateway rotates many peers of one interface at about the same time. Each batch costs one
device round trip (the writes and one listing of the device, sent together), so serving every
waiting operation in the same batch keeps 1,000 peers well under a second while every install
still gets fresh evidence from the device. Whoever holds the lock runs the next batch for
everyone queued (group commit). The agent's open backends live in its stash (`OPEN_BACKENDS`), so
two agents in one process share neither sockets nor batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from qkdagent import StashKey

from .backend import Backend, BackendError, Op, Outcome
from .drive import drive


@dataclass(eq=False)
class _Entry:
    op: Op
    outcome: Outcome | None = None
    error: BaseException | None = None
    taken: bool = False


@dataclass(eq=False)
class Shared:
    """A backend shared by every sink of one agent that uses the same spec; refcounted."""

    backend: Backend
    """Exchanges of different interfaces may interleave; one batch at a time per interface is
    the batcher's job."""
    users: int = 0
    batchers: dict[str, Batcher] = field(default_factory=dict)

    def batcher(self, interface: str) -> Batcher:
        batcher = self.batchers.get(interface)
        if batcher is None:
            batcher = self.batchers[interface] = Batcher(self, interface)
        return batcher


@dataclass(eq=False)
class Batcher:
    """One per (backend, interface) per agent; ops for distinct peers share a batch."""

    shared: Shared
    interface: str
    max_batch: int = 4096
    _queue: list[_Entry] = field(default_factory=list)
    _lock: trio.Lock = field(default_factory=trio.Lock)
    batches: int = 0
    what: str = field(init=False, default="")
    """How errors name this interface (formatted once, not per install)."""

    def __post_init__(self) -> None:
        backend = self.shared.backend
        self.what = f"WireGuard ({backend.name}, {self.interface})"

    async def submit(self, op: Op) -> Outcome:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.shared.users == 1 and not self._lock.locked():
            return await self._alone(op)
        entry = _Entry(op)
        self._queue.append(entry)
        try:
            if self._lock.locked():
                await self._lock.acquire()
            else:
                self._lock.acquire_nowait()  # idle interface: no scheduler round trip
            try:
                if (
                    not entry.taken
                    and self.shared.users > 1
                    and trio.lowlevel.current_statistics().tasks_runnable
                ):
                    # Other tasks are ready to run (e.g. 1,000 rotations started at once):
                    # let them queue behind this batch first. Backends that answer without
                    # sleeping (netlink, uapi within its spin) would otherwise serve them
                    # one batch each. With one sink on the backend there is nobody to wait
                    # for (and the statistics call costs more than the rest of the batcher).
                    await trio.lowlevel.cancel_shielded_checkpoint()
                if not entry.taken:
                    await self._run(self._take())
            finally:
                self._lock.release()
        except trio.Cancelled:
            if not entry.taken:
                self._queue.remove(entry)
            raise
        if entry.error is not None:
            raise entry.error
        assert entry.outcome is not None
        return entry.outcome

    async def _alone(self, op: Op) -> Outcome:
        """The one sink on this backend, idle: its op is the batch (no queue bookkeeping; a
        site-to-site gateway installs this way). Ops arriving meanwhile queue behind the lock
        and are served as usual when it is released."""
        self._lock.acquire_nowait()
        try:
            outcomes = await self._exchange([op])
        finally:
            self._lock.release()
        if len(outcomes) != 1:
            raise BackendError("the backend answered a batch with the wrong number of outcomes")
        return outcomes[0]

    def _take(self) -> list[_Entry]:
        """The longest queue prefix with each peer at most once (order between writes holds)."""
        batch: list[_Entry] = []
        peers: set[bytes] = set()
        for entry in self._queue:
            if entry.op.peer in peers or len(batch) >= self.max_batch:
                break
            peers.add(entry.op.peer)
            batch.append(entry)
        del self._queue[: len(batch)]
        for entry in batch:
            entry.taken = True
        return batch

    async def _run(self, batch: Sequence[_Entry]) -> None:
        """Apply one batch for everyone in it.

        Other tasks wait on this batch, so it is finished even if the task running it is
        cancelled (the backend's timeout bounds it), and the cancellation lands right after.
        The exchange runs on the trio thread: no worker-thread hop per install.
        """
        outcomes: list[Outcome] | None = None
        try:
            outcomes = await self._exchange([entry.op for entry in batch])
        except Exception as exc:
            for entry in batch:
                entry.error = exc
            return
        if len(outcomes) != len(batch):
            error = BackendError("the backend answered a batch with the wrong number of outcomes")
            for entry in batch:
                entry.error = error
            return
        for entry, outcome in zip(batch, outcomes, strict=True):
            entry.outcome = outcome

    async def _exchange(self, ops: list[Op]) -> list[Outcome]:
        """One backend round trip, finished even if the caller is cancelled (shielded, bounded
        by the backend's timeout): others may be waiting on its outcomes."""
        self.batches += 1
        backend = self.shared.backend
        return await drive(
            backend.exchange(self.interface, ops),
            backend.timeout,
            self.what,
            shield=True,
        )


@dataclass(eq=False)
class Backends:
    """The open backends of one agent by spec (a netlink socket, a broker connection...): each
    is created by its first sink's `prepare()` and closed when its last sink lets go."""

    open: dict[tuple[str, ...], Shared] = field(default_factory=dict)

    def acquire(self, spec: tuple[str, ...], factory: Callable[[], Backend]) -> Shared:
        """The backend for `spec`, created on first use; pair with `release`."""
        shared = self.open.get(spec)
        if shared is None:
            shared = self.open[spec] = Shared(factory())
        shared.users += 1
        return shared

    def release(self, spec: tuple[str, ...], shared: Shared) -> None:
        """Drop one user; the last one closes the backend."""
        shared.users -= 1
        if shared.users > 0:
            return
        if self.open.get(spec) is shared:
            del self.open[spec]
        shared.backend.close()


OPEN_BACKENDS: StashKey[Backends] = StashKey("wireguard.backends")
"""Where a sink finds its agent's `Backends` (`context.stash`)."""
