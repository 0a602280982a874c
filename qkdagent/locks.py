"""Taking a trio lock (or a capacity limiter's token) without a schedule point when it is
free (issue 18).

`async with lock` yields to the scheduler even when nobody holds the lock: one full pass of the
event loop (every runnable task, and a poll for I/O) per acquire. A request handler takes its
link's lock once per request, and an initiator its link's lock and a rotation slot for each
rotation and each prefetch, all on a rotation's path, where nothing else waits for the loop
(three or four of an initiator's eighteen wake-ups per rotation at 10,000 links).
`held(lock)` is a cancel point all the same (a cancelled caller raises before taking it), and
waits in the lock's queue, in turn, when it is held or others wait for it.
"""

from __future__ import annotations

import trio


class held:
    __slots__ = ("lock",)

    def __init__(self, lock: trio.Lock | trio.CapacityLimiter) -> None:
        self.lock = lock

    async def __aenter__(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self.lock.acquire_nowait()  # fails while held (no token), and while others queue
        except trio.WouldBlock:
            await self.lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.lock.release()
