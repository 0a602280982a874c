"""Coalescing of concurrent operations on one interface (fake backend waiting on a real socket)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio
from qkdagent_wireguard.backend import BackendError, Op, Outcome
from qkdagent_wireguard.batch import OPEN_BACKENDS, Backends, Shared
from qkdagent_wireguard.sink import WireGuardSink

from qkdagent import PluginContext
from qkdagent.testing import build_component


class _Gate:
    """A socket that turns readable once `set()`: batches wait on it like on a device."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)

    def set(self) -> None:
        self.writer.send(b"x")

    def is_set(self) -> bool:
        try:
            return bool(self.reader.recv(1, socket.MSG_PEEK))
        except BlockingIOError:
            return False


class SlowBackend:
    """Holds each batch until released, so submissions pile up behind the first one."""

    name = "slow"
    timeout = 10.0

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[Op]] = []
        self.gate = _Gate()
        self.fail = fail
        self.closed = False

    def exchange(self, interface: str, ops: list[Op]):  # type: ignore[no-untyped-def]
        while not self.gate.is_set():
            yield self.gate.reader, False
        self.batches.append(list(ops))
        if self.fail:
            raise BackendError("device said no")
        return [Outcome.MATCH if op.write else Outcome.MISMATCH for op in ops]

    def close(self) -> None:
        self.closed = True


async def test_concurrent_submissions_share_batches() -> None:
    backend = SlowBackend()
    shared = Shared(backend)
    batcher = shared.batcher("wg0")
    results: dict[int, Outcome] = {}

    async def one(i: int) -> None:
        results[i] = await batcher.submit(Op(os.urandom(32), os.urandom(32), i % 2 == 0))

    async with trio.open_nursery() as nursery:
        for i in range(100):
            nursery.start_soon(one, i)
        await trio.testing.wait_all_tasks_blocked()
        backend.gate.set()
    assert len(results) == 100
    assert all(results[i] is (Outcome.MATCH if i % 2 == 0 else Outcome.MISMATCH) for i in results)
    assert len(backend.batches) <= 2  # everyone queued behind the first batch shares one
    assert sum(len(b) for b in backend.batches) == 100


async def test_same_peer_twice_goes_in_separate_batches_in_order() -> None:
    backend = SlowBackend()
    batcher = Shared(backend).batcher("wg0")
    peer = os.urandom(32)
    first, second = os.urandom(32), os.urandom(32)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.submit, Op(os.urandom(32), os.urandom(32), True))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(batcher.submit, Op(peer, first, True))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(batcher.submit, Op(peer, second, True))
        await trio.testing.wait_all_tasks_blocked()
        backend.gate.set()
    keys = [op.expect for batch in backend.batches for op in batch if op.peer == peer]
    assert keys == [first, second]
    assert len(backend.batches) == 3
    assert all(len({op.peer for op in batch}) == len(batch) for batch in backend.batches)


async def test_batch_error_reaches_every_waiter() -> None:
    backend = SlowBackend(fail=True)
    batcher = Shared(backend).batcher("wg0")
    errors: list[BaseException] = []

    async def one() -> None:
        try:
            await batcher.submit(Op(os.urandom(32), os.urandom(32), True))
        except BackendError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        backend.gate.set()
    assert len(errors) == 5 and all("device said no" in str(e) for e in errors)


async def test_cancelled_waiter_is_dropped_from_the_queue() -> None:
    backend = SlowBackend()
    batcher = Shared(backend).batcher("wg0")
    cancelled_peer = os.urandom(32)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.submit, Op(os.urandom(32), os.urandom(32), True))
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0.01):
            await batcher.submit(Op(cancelled_peer, os.urandom(32), True))
        backend.gate.set()
    assert all(op.peer != cancelled_peer for batch in backend.batches for op in batch)


async def test_shared_backend_is_refcounted_per_agent() -> None:
    made: list[SlowBackend] = []

    def factory() -> SlowBackend:
        made.append(SlowBackend())
        return made[-1]

    backends = Backends()
    one = backends.acquire(("fake", "x"), factory)
    two = backends.acquire(("fake", "x"), factory)
    assert one is two and len(made) == 1
    backends.release(("fake", "x"), one)
    assert not made[0].closed
    backends.release(("fake", "x"), two)
    assert made[0].closed
    three = backends.acquire(("fake", "x"), factory)
    assert three is not one
    backends.release(("fake", "x"), three)


def test_sinks_of_one_agent_share_its_backends_and_two_agents_share_nothing(
    tmp_path: Path,
) -> None:
    def sink(name: str, context: PluginContext) -> WireGuardSink:
        table = {"interface": "wg0", "peer_public_key": "A" * 43 + "=", "backend": "uapi"}
        return build_component(WireGuardSink, table, name=name, context=context)

    alice, bob = PluginContext("alice", tmp_path), PluginContext("bob", tmp_path)
    a1, a2, b1 = sink("a1", alice), sink("a2", alice), sink("b1", bob)
    assert a1._backends is a2._backends is alice.stash[OPEN_BACKENDS]
    assert b1._backends is bob.stash[OPEN_BACKENDS] and b1._backends is not a1._backends
    made: list[SlowBackend] = []

    def factory() -> SlowBackend:
        made.append(SlowBackend())
        return made[-1]

    assert a1._backends.acquire(("uapi", "/x"), factory) is a2._backends.acquire(
        ("uapi", "/x"), factory
    )
    b1._backends.acquire(("uapi", "/x"), factory)
    assert len(made) == 2  # one socket per agent, never one across agents


@pytest.mark.parametrize("n", [1, 3])
async def test_results_follow_ops(n: int) -> None:
    backend = SlowBackend()
    backend.gate.set()
    batcher = Shared(backend).batcher("wg0")
    for _ in range(n):
        assert await batcher.submit(Op(os.urandom(32), os.urandom(32), True)) is Outcome.MATCH
    assert len(backend.batches) == n


async def test_running_batch_finishes_for_others_when_its_runner_is_cancelled() -> None:
    backend = SlowBackend()
    batcher = Shared(backend).batcher("wg0")
    scope = trio.CancelScope()
    got: list[Outcome] = []

    async def runner() -> None:
        with scope:
            got.append(await batcher.submit(Op(os.urandom(32), os.urandom(32), True)))

    async def waiter() -> None:
        got.append(await batcher.submit(Op(os.urandom(32), os.urandom(32), True)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()  # the batch in flight is shielded: it still completes
        await trio.testing.wait_all_tasks_blocked()
        assert backend.batches == []
        backend.gate.set()
    assert got == [Outcome.MATCH, Outcome.MATCH]  # the runner's own op was applied too
    assert [len(batch) for batch in backend.batches] == [1, 1]
