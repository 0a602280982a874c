"""The UAPI client against a scripted fake daemon: pipelining, reconnects, errno, bad replies.

The fake parses requests the way wireguard-go does: `get=1` exactly, `set=1` with a read-ahead
scanner that drops whatever arrived after the set's blank line (so a client that pipelined
anything after a set would hang here, as it would against the real daemon).
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from qkdagent_wireguard import uapi
from qkdagent_wireguard.backend import BackendError, Op, Outcome
from qkdagent_wireguard.drive import drive, drive_blocking
from qkdagent_wireguard.uapi import UapiBackend

PEER = os.urandom(32)

Handler = Callable[[bytes, dict[bytes, bytes]], bytes | None]


def serve(path: Path, handler: Handler, close_after: bool, log: list[bytes]) -> threading.Thread:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(8)
    state: dict[bytes, bytes] = {}

    def next_request(buf: bytes) -> tuple[bytes, bytes] | None:
        """(request, rest) when a whole request is buffered; a set swallows the rest."""
        if buf.startswith(b"get=1\n\n"):
            return buf[:7], buf[7:]
        end = buf.find(b"\n\n")
        return (buf[: end + 2], b"") if end >= 0 else None

    def loop() -> None:
        with listener:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    buf = b""
                    while True:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        buf += chunk
                        replies, closing = b"", False
                        while (found := next_request(buf)) is not None:
                            request, buf = found
                            log.append(request)
                            reply = handler(request, state)
                            if reply is None:
                                closing = True
                                break
                            replies += reply
                        if replies:
                            conn.sendall(replies)
                        if closing or (close_after and replies):
                            break

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    thread.listener = listener  # type: ignore[attr-defined]
    return thread


def honest(request: bytes, state: dict[bytes, bytes]) -> bytes:
    """Knows exactly one peer, PEER; `update_only` writes to other peers do nothing."""
    lines = request.decode().split("\n")
    if lines[0] == "set=1":
        peer = None
        for line in lines[1:]:
            key, _, value = line.partition("=")
            if key == "public_key":
                peer = bytes.fromhex(value)
            elif key == "preshared_key" and peer == PEER:
                state[peer] = bytes.fromhex(value)
        return b"errno=0\n\n"
    body = f"public_key={PEER.hex()}\npreshared_key={state.get(PEER, bytes(32)).hex()}\n"
    return body.encode() + b"errno=0\n\n"


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Callable[..., tuple[UapiBackend, list[bytes]]]]:
    threads: list[threading.Thread] = []

    def start(handler: Handler, close_after: bool = False) -> tuple[UapiBackend, list[bytes]]:
        log: list[bytes] = []
        threads.append(serve(tmp_path / "wgfake.sock", handler, close_after, log))
        return UapiBackend(tmp_path, timeout=2), log

    yield start
    for thread in threads:
        thread.listener.close()  # type: ignore[attr-defined]


def apply(backend: UapiBackend, ops: list[Op]) -> list[Outcome]:
    return drive_blocking(backend.exchange("wgfake", ops), backend.timeout, "fake")


def test_one_round_trip_lists_then_writes_and_reads_back(fake) -> None:  # type: ignore[no-untyped-def]
    backend, log = fake(honest)
    key = os.urandom(32)
    assert apply(backend, [Op(PEER, key, True)]) == [Outcome.MATCH]
    assert log[0] == b"get=1\n\n" and log[1].startswith(b"set=1\n")  # listed before the write
    assert apply(backend, [Op(PEER, key, False)]) == [Outcome.MATCH]  # the write took effect
    assert apply(backend, [Op(PEER, os.urandom(32), False)]) == [Outcome.MISMATCH]
    assert log[2:] == [b"get=1\n\n"] * 2  # reads do not write
    backend.close()


def test_write_to_a_missing_peer_is_no_peer_not_success(fake) -> None:  # type: ignore[no-untyped-def]
    backend, _ = fake(honest)
    missing = os.urandom(32)
    outcomes = apply(backend, [Op(missing, os.urandom(32), True), Op(PEER, os.urandom(32), True)])
    assert outcomes == [Outcome.NO_PEER, Outcome.MATCH]
    backend.close()


def test_keeps_one_connection_and_reconnects_when_dropped(fake) -> None:  # type: ignore[no-untyped-def]
    backend, _ = fake(honest, True)  # the daemon drops the connection after every answer
    for _ in range(3):
        key = os.urandom(32)
        assert apply(backend, [Op(PEER, key, True)]) == [Outcome.MATCH]
    assert apply(backend, [Op(os.urandom(32), key, False)]) == [Outcome.NO_PEER]
    backend.close()


async def test_trio_driver_runs_the_same_exchange(fake) -> None:  # type: ignore[no-untyped-def]
    backend, log = fake(honest)
    key = os.urandom(32)
    for write in (True, False):
        outcome = await drive(backend.exchange("wgfake", [Op(PEER, key, write)]), 2, "fake")
        assert outcome == [Outcome.MATCH]
    assert len(log) == 3
    backend.close()


async def test_a_slow_daemon_is_waited_for_without_holding_the_event_loop(fake) -> None:  # type: ignore[no-untyped-def]
    """The read spins only briefly: the daemon answers here only once another trio task ran."""
    release, released = threading.Event(), []

    def slow(request: bytes, state: dict[bytes, bytes]) -> bytes:
        released.append(release.wait(5))
        return honest(request, state)

    async def other_task() -> None:
        release.set()

    backend, _ = fake(slow)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)  # runs only once the exchange yields to trio
        outcome = await drive(backend.exchange("wgfake", [Op(PEER, os.urandom(32), True)]), 5, "f")
    assert outcome == [Outcome.MATCH]
    assert released and all(released)  # every reply was sent after the other task ran
    backend.close()


def test_refused_set_is_reported_with_errno(fake) -> None:  # type: ignore[no-untyped-def]
    def refuse_set(request: bytes, state: dict[bytes, bytes]) -> bytes:
        return b"errno=-22\n\n" if request.startswith(b"set") else honest(request, state)

    backend, _ = fake(refuse_set)
    with pytest.raises(BackendError, match=r"errno=-22 \(EINVAL\)"):
        apply(backend, [Op(PEER, os.urandom(32), True)])


def test_refused_get_is_an_error(fake) -> None:  # type: ignore[no-untyped-def]
    backend, _ = fake(lambda req, state: b"errno=-5\n\n")
    with pytest.raises(BackendError, match="refused to list"):
        apply(backend, [Op(PEER, os.urandom(32), False)])


def test_garbage_reply_is_a_backend_error(fake) -> None:  # type: ignore[no-untyped-def]
    backend, _ = fake(lambda req, state: b"hello\n\n")
    with pytest.raises(BackendError, match="errno"):
        apply(backend, [Op(PEER, os.urandom(32), True)])


def test_silent_daemon_times_out(fake) -> None:  # type: ignore[no-untyped-def]
    backend, _ = fake(lambda req, state: b"")
    backend.timeout = 0.2
    with pytest.raises(BackendError, match="did not answer in time"):
        apply(backend, [Op(PEER, os.urandom(32), True)])
    assert not backend._conns  # the half-used connection was dropped


async def test_silent_daemon_times_out_under_trio(fake) -> None:  # type: ignore[no-untyped-def]
    backend, _ = fake(lambda req, state: b"")
    with pytest.raises(BackendError, match="did not answer in time"):
        await drive(backend.exchange("wgfake", [Op(PEER, os.urandom(32), True)]), 0.2, "fake")
    assert not backend._conns


def test_missing_socket_is_a_clear_error(tmp_path: Path) -> None:
    backend = UapiBackend(tmp_path, timeout=1)
    with pytest.raises(BackendError, match="no WireGuard control socket for interface 'wgnone'"):
        drive_blocking(backend.exchange("wgnone", [Op(PEER, os.urandom(32), True)]), 1, "x")


def test_key_never_in_errors(fake) -> None:  # type: ignore[no-untyped-def]
    backend, _ = fake(lambda req, state: b"errno=-5\n\n")
    key = os.urandom(32)
    with pytest.raises(BackendError) as info:
        apply(backend, [Op(PEER, key, True)])
    assert key.hex() not in str(info.value)


def test_reply_buffer_is_wiped_and_grows_without_leaving_copies(fake) -> None:  # type: ignore[no-untyped-def]
    private = os.urandom(32)
    others = b"".join(
        b"public_key=%s\npreshared_key=%s\nallowed_ip=10.9.%d.%d/32\n"
        % (os.urandom(32).hex().encode(), os.urandom(32).hex().encode(), i // 250, i % 250)
        for i in range(600)  # ~110 KB: more than the initial 64 KiB buffer
    )
    big = {"on": False}

    def listing(request: bytes, state: dict[bytes, bytes]) -> bytes:
        reply = honest(request, state)
        if request.startswith(b"get"):
            head = b"private_key=%s\n" % private.hex().encode()
            reply = head + (others if big["on"] else b"") + reply
        return reply

    backend, _ = fake(listing)
    key = os.urandom(32)
    assert apply(backend, [Op(PEER, key, True)]) == [Outcome.MATCH]
    _, buf = backend._conns["wgfake"]
    first = buf.data
    assert buf.used == 0 and not any(first)  # private key and PSKs zeroed after parsing
    big["on"] = True
    assert apply(backend, [Op(PEER, key, False)]) == [Outcome.MATCH]
    assert backend._conns["wgfake"][1] is buf and len(buf.data) > len(first)
    assert not any(first) and not any(buf.data)  # the outgrown buffer was wiped too
    backend.close()


class ScriptedSocket:
    """`recv_into` fails with EAGAIN `busy` times, then delivers one reply."""

    def __init__(self, busy: int, reply: bytes = b"errno=0\n\n") -> None:
        self.busy, self.reply = busy, reply

    def recv_into(self, view: memoryview) -> int:
        if self.busy:
            self.busy -= 1
            raise BlockingIOError
        view[: len(self.reply)] = self.reply
        return len(self.reply)


def run_read(monkeypatch: pytest.MonkeyPatch, busy: int) -> tuple[int, int, list[int]]:
    """(sched_yield calls, yields to the driver, reply ends) with a clock that advances 10 µs
    per reading and a 95 µs spin (no try falls on the budget's edge)."""
    ticks = itertools.count(1)
    yields = []
    monkeypatch.setattr(uapi, "perf_counter", lambda: next(ticks) * 10e-6)
    monkeypatch.setattr(uapi, "sched_yield", lambda: yields.append(1))
    sock = ScriptedSocket(busy)
    read = uapi._read_replies(sock, uapi.ReplyBuffer(), Path("wg0.sock"), 1, 95e-6)  # type: ignore[arg-type]
    waits = 0
    try:
        while True:
            assert next(read) == (sock, False)
            waits += 1
    except StopIteration as done:
        return len(yields), waits, done.value


def test_a_reply_within_the_spin_is_read_without_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_read(monkeypatch, busy=3) == (3, 0, [9])  # the CPU given away between tries


def test_the_spin_budget_is_spent_once_then_every_try_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # tries at 10, 20, ... µs: the budget runs from the first (10 µs) to 105 µs, so 10 tries
    # spin and the 5 after it each wait for the socket instead
    assert run_read(monkeypatch, busy=15) == (10, 5, [9])
