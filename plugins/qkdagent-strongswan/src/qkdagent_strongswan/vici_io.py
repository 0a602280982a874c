"""A VICI connection used from trio: calls run in a worker thread, one at a time.

The `vici` package is blocking and its `Session` is not safe to share between concurrent
callers, so each `ViciClient` owns one session and serialises calls through a capacity limiter
of 1. A sink has two clients: one for rotations (whose `initiate` may block for seconds) and one
for its background check, so a slow rotation never delays a repair. The socket has a timeout so
a hung charon cannot pin a worker thread forever (worker threads cannot be cancelled by trio).
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio
import vici
from vici.exception import CommandException, SessionException

from qkdagent import SinkError

log = logging.getLogger(__name__)
T = TypeVar("T")
BACKLOG_RETRIES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.5, 0.5)
"""Pauses before retrying a connect refused with EAGAIN (charon's listen backlog is small)."""


class ViciClient:
    """One VICI session to one charon; reconnects once after a broken connection."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._session: vici.Session | None = None
        self._limiter = trio.CapacityLimiter(1)

    def __repr__(self) -> str:
        return f"<ViciClient {str(self.path)!r}>"

    async def call(self, what: str, fn: Callable[[vici.Session], T]) -> T:
        """Run `fn(session)` in a worker thread; map VICI failures to `SinkError`.

        `what` names the operation in error messages; messages never include request data.
        """
        return await trio.to_thread.run_sync(self._call_sync, what, fn, limiter=self._limiter)

    def _call_sync(self, what: str, fn: Callable[[vici.Session], T]) -> T:
        for attempt in (1, 2):
            session = self._connect_sync()
            try:
                return fn(session)
            except CommandException as exc:
                raise SinkError(f"charon refused {what}: {_reason(exc)}") from None
            except (OSError, SessionException) as exc:
                # the session may be half-read: drop it; retry once on a fresh connection
                self._drop_sync()
                if attempt == 2:
                    raise SinkError(f"VICI {what} at {self.path} failed: {_reason(exc)}") from None
        raise AssertionError("unreachable")

    def _connect_sync(self) -> vici.Session:
        if self._session is not None:
            return self._session
        delays = iter(BACKLOG_RETRIES)
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.path))
                break
            except OSError as exc:
                sock.close()
                delay = next(delays, None) if exc.errno == errno.EAGAIN else None
                if delay is None:
                    raise SinkError(
                        f"cannot connect to charon's VICI socket {self.path}: {exc.strerror or exc}"
                    ) from None
                time.sleep(delay)  # in a worker thread: charon's accept backlog is full
        self._session = vici.Session(sock)
        return self._session

    def _drop_sync(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            try:
                session.transport.socket.close()
            except OSError:
                pass

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self._drop_sync, limiter=self._limiter)


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.removeprefix("Command failed: ")


def request(command: str, message: dict[str, Any] | None = None) -> Callable[[vici.Session], Any]:
    """A plain request/response call (`get-shared`, `unload-shared`, `rekey`, ...)."""
    return lambda session: session.request(command, message)
