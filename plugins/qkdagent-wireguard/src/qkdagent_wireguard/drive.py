"""Run a backend's socket exchange on the trio thread (the agent) or blocking (broker, detection).

Each backend writes its protocol once, as a generator over non-blocking sockets: it yields
`(socket, writable)` whenever the socket would block and returns its result. A library call
that blocks (pyroute2) is yielded as a `Blocking` callable instead and runs in a worker thread;
its result or exception is sent back into the generator. The agent drives
it on the trio thread with `wait_readable`, which costs a few microseconds where a worker-thread
hop per install cost ~50 µs; the broker and `auto` detection drive it with poll(). A timed-out
or cancelled exchange is closed, so the backend drops the connection it left half-used.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Callable, Generator
from typing import Any, TypeVar

import outcome
import trio

from .backend import BackendError

T = TypeVar("T")
Wait = tuple[socket.socket, bool]
"""A socket and whether to wait until it is writable (else readable)."""
Blocking = Callable[[], Any]
Exchange = Generator[Wait | Blocking, Any, T]


async def drive(exchange: Exchange[T], seconds: float, what: str, *, shield: bool = False) -> T:
    """Run `exchange` with trio; BackendError naming `what` after `seconds`.

    The cancel scope (deadline, optional shield) costs ~9 µs, so it is entered only when the
    exchange has to sleep: an exchange answered at once (netlink; uapi within its spin) costs
    no scope and no scheduler pass (the batcher still checks for cancellation on entry).
    """
    try:
        step = next(exchange)
        with trio.CancelScope(deadline=trio.current_time() + seconds, shield=shield):
            while True:
                if isinstance(step, tuple):
                    if step[1]:
                        await trio.lowlevel.wait_writable(step[0])
                    else:
                        await trio.lowlevel.wait_readable(step[0])
                    step = next(exchange)
                else:
                    result = await outcome.acapture(trio.to_thread.run_sync, step)
                    step = result.send(exchange)
    except StopIteration as done:
        return done.value
    finally:
        exchange.close()  # no-op when finished; else the backend drops its connection
    raise BackendError(f"{what} did not answer in time ({seconds:g} s)")


def drive_blocking(exchange: Exchange[T], timeout: float, what: str) -> T:
    """Run `exchange` in the calling thread, waiting with poll()."""
    deadline = time.monotonic() + timeout
    try:
        step = next(exchange)
        while True:
            if not isinstance(step, tuple):
                step = outcome.capture(step).send(exchange)
                continue
            poller = select.poll()
            poller.register(step[0], select.POLLOUT if step[1] else select.POLLIN)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                break
            step = next(exchange)
    except StopIteration as done:
        return done.value
    finally:
        exchange.close()
    raise BackendError(f"{what} did not answer in time ({timeout:g} s)")


def connect_unix(path: str | os.PathLike[str]) -> Exchange[socket.socket]:
    """A non-blocking connected unix stream socket (OSError as connect() raises it)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        try:
            sock.connect(os.fspath(path))
        except BlockingIOError:  # listen backlog full: wait for room
            yield sock, True
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, os.strerror(code)) from None
    except BaseException:
        sock.close()
        raise
    return sock


def send_all(sock: socket.socket, data: bytes | bytearray | memoryview) -> Exchange[None]:
    """Send every byte of `data` (OSError on a broken connection)."""
    try:  # a request fits the socket buffer nearly always: no view, no generator step
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent == len(data):
        return
    view = memoryview(data)[sent:]
    try:
        while view:
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                yield sock, True
    finally:
        view.release()


def recv_some(sock: socket.socket, size: int = 65536) -> Exchange[bytes]:
    """The next bytes available (b"" at end of stream)."""
    while True:
        try:
            return sock.recv(size)
        except BlockingIOError:
            yield sock, False
