"""What the pkcs11 sinks of one agent share, kept in its `context.stash`: the worker thread and
the open tokens (one logged-in session per token).

Its lifetime follows the sinks using it: the first `open()` starts the worker, the last
`close()` stops it, and the next `open()` starts a new one. Two agents in one process get two of
these, so neither sees the other's sessions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import trio

from qkdagent import Secret, StashKey

from . import token
from .token import OpenToken, TokenKey, TokenSpec
from .worker import Worker


@dataclass(eq=False)
class HsmState:
    opened: dict[TokenKey, OpenToken] = field(default_factory=dict)
    """Touched only on the worker thread (token.acquire/release)."""
    users: int = 0
    """Sinks between `open()` and `close()` (counted on the trio thread)."""
    _worker: Worker | None = None

    @property
    def worker(self) -> Worker:
        """The agent's worker thread, started on first use."""
        if self._worker is None:
            self._worker = Worker()
        return self._worker

    async def open(self, spec: TokenSpec, pin: Secret) -> OpenToken:
        """Log in to the token (or share this agent's session on it); pair with `close`."""
        self.users += 1
        try:
            opened = self.opened
            return await self.worker.run(
                token.acquire, opened, spec, pin, undo=partial(token.release, opened)
            )
        except BaseException:
            self._leave()
            raise

    async def close(self, entry: OpenToken) -> None:
        """Give the session back, even when cancelled (it is ours to close)."""
        try:
            with trio.CancelScope(shield=True):
                await self.worker.run(token.release, self.opened, entry)
        finally:
            self._leave()

    def _leave(self) -> None:
        self.users -= 1
        if self.users == 0 and self._worker is not None:
            self._worker.close()  # jobs already queued (an undo, say) still run
            self._worker = None


HSM: StashKey[HsmState] = StashKey("hsm.state")
"""Where a sink finds its agent's `HsmState` (`context.stash`)."""
