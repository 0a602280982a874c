"""Coalescing a peer client's requests to one peer into batches (issue 18).

At 10,000 links, most of what a rotation cost each agent was per request: HTTP framing, TLS
records, a task and a wake-up on each side, for a few hundred bytes of message. Requests that
wait for the same peer now go together (`batchwire`), and the peer runs their handlers side by
side, so their durable commits meet in one group commit as well.

The rule is Nagle's, so nothing waits that need not: a request goes at once, alone and on the
plain `/v1/links/...` path, while fewer than `in_flight` requests to its peer are under way
and none is queued. Otherwise it queues, and the first queued request to get a free place
sends everything queued (up to `batchwire.MAX_ITEMS` items and `MAX_BATCH` bytes) as one
batch. A lone link's rotation never queues, so its latency is what it was; links whose
rotations fall together (the scheduler's `grid`) share requests.

A peer that does not know `/v1/batch` (an older qkdagent: 404 `not-found`) is sent each item
alone, and not asked again for `FALLBACK_PAUSE`. That answer is not authenticated beyond TLS,
but it can only cost performance: the items go unbatched, exactly as before.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Awaitable, Callable

import trio

from . import batchwire
from .errors import ProtocolError
from .h1client import Reply, TransportError
from .protocol import MAX_BODY, error_code

log = logging.getLogger(__name__)

IN_FLIGHT = 4
"""Requests under way to one peer before the next ones queue and go together."""
FALLBACK_PAUSE = 3600.0
"""Seconds a peer that does not know batches is sent requests one by one."""
BATCH_PATH = "/v1/batch"

Send = Callable[[str, str, bytes, int], Awaitable[Reply]]
"""(peer URL, path, body, reply limit) -> the reply: one HTTP request."""


class _Waiting:
    """A queued request and, once its batch is answered, its reply or why there is none."""

    __slots__ = ("done", "error", "item", "reply", "taken")

    def __init__(self, item: batchwire.Item) -> None:
        self.item = item
        self.taken = False
        self.done = trio.Event()
        self.reply: Reply | None = None
        self.error: TransportError | None = None

    def settle(self, reply: Reply | None, error: TransportError | None = None) -> None:
        if not self.done.is_set():
            self.reply, self.error = reply, error
            self.done.set()

    def result(self) -> Reply:
        if self.reply is None:
            raise self.error or TransportError("the batch was not answered")
        return self.reply


class _Peer:
    __slots__ = ("places", "queue", "unbatched_until")

    def __init__(self, in_flight: int) -> None:
        self.places = trio.Semaphore(in_flight)
        """Requests (alone or batched) that may be under way; waiters are served in order."""
        self.queue: collections.deque[_Waiting] = collections.deque()
        self.unbatched_until = -math.inf


class Coalescer:
    """Per peer URL: requests go alone while there is room, and together once there is not."""

    def __init__(self, send: Send, *, in_flight: int = IN_FLIGHT) -> None:
        self._send = send
        self._in_flight = in_flight
        self._peers: dict[str, _Peer] = {}
        self.batches = 0
        """Batch requests sent (statistics, for benchmarks and tests)."""
        self.batched = 0
        """Items they carried."""

    def _peer(self, url: str) -> _Peer:
        peer = self._peers.get(url)
        if peer is None:
            peer = self._peers[url] = _Peer(self._in_flight)
        return peer

    async def post(self, url: str, link: str, action: str, body: bytes) -> Reply:
        peer = self._peer(url)
        if not peer.queue and peer.places.value > 0:
            peer.places.acquire_nowait()
            try:
                return await self._alone(url, batchwire.Item(link, action, body))
            finally:
                peer.places.release()
        waiting = _Waiting(batchwire.Item(link, action, body))
        peer.queue.append(waiting)
        try:
            async with peer.places:
                # Places go in order of asking, and the queue is in that order too: whoever
                # gets one first finds its own request at the head, or already on its way.
                if not waiting.taken:
                    await self._send_queued(url, peer)
            await waiting.done.wait()
        finally:
            if not waiting.taken:
                peer.queue.remove(waiting)
        return waiting.result()

    async def _alone(self, url: str, item: batchwire.Item) -> Reply:
        return await self._send(url, f"/v1/links/{item.link}/{item.action}", item.body, MAX_BODY)

    async def _send_queued(self, url: str, peer: _Peer) -> None:
        batch = _take(peer.queue)
        try:
            if len(batch) == 1:
                batch[0].settle(await self._alone(url, batch[0].item))
            elif trio.current_time() < peer.unbatched_until:
                await self._one_by_one(url, batch)
            else:
                await self._batch(url, peer, batch)
        except TransportError as exc:
            for waiting in batch:
                waiting.settle(None, exc)
        finally:  # cancelled (the sender's deadline) or failed: the others try again
            for waiting in batch:
                waiting.settle(None, TransportError("the batch carrying this request was dropped"))

    async def _batch(self, url: str, peer: _Peer, batch: list[_Waiting]) -> None:
        request = batchwire.encode_request([w.item for w in batch])
        reply = await self._send(url, BATCH_PATH, request, batchwire.MAX_BATCH)
        if reply.status == 404 and error_code(reply.body) == "not-found":
            peer.unbatched_until = trio.current_time() + FALLBACK_PAUSE
            log.info(
                "peer %s does not take batched requests (an older qkdagent?): sending them one "
                "by one (asking again in %d s)", url, FALLBACK_PAUSE,
            )  # fmt: skip
            await self._one_by_one(url, batch)
            return
        if reply.status != 200:
            raise TransportError(f"the peer answered a batch with HTTP {reply.status}")
        try:
            answers = batchwire.decode_reply(reply.body, len(batch))
        except ProtocolError as exc:
            raise TransportError(f"bad batch reply: {exc}") from None
        self.batches += 1
        self.batched += len(batch)
        for waiting, answer in zip(batch, answers, strict=True):
            waiting.settle(Reply(answer.status, answer.body, reply.identity, reply.certificate))

    async def _one_by_one(self, url: str, batch: list[_Waiting]) -> None:
        async def one(waiting: _Waiting) -> None:
            try:
                waiting.settle(await self._alone(url, waiting.item))
            except TransportError as exc:
                waiting.settle(None, exc)

        async with trio.open_nursery() as nursery:
            for waiting in batch:
                nursery.start_soon(one, waiting)


def _take(queue: collections.deque[_Waiting]) -> list[_Waiting]:
    """The head of the queue, as much as one batch holds; marked as taken."""
    batch: list[_Waiting] = []
    size = batchwire.empty_request_size()
    while queue and len(batch) < batchwire.MAX_ITEMS:
        grown = size + batchwire.item_size(queue[0].item)
        if batch and grown > batchwire.MAX_BATCH:
            break
        waiting = queue.popleft()
        waiting.taken = True
        batch.append(waiting)
        size = grown
    return batch
