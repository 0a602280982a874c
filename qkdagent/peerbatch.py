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

Isolation: the peer streams each item's answer as soon as it has it, and each waiting request
returns with its own answer, so a slow item holds up no other. While `run` is going, a batch
is sent by a task of the coalescer's own, under the client's timeout counted from the send: a
request whose caller gives up (its rotation's deadline) only stops waiting, and the others in
its batch are unaffected. Without `run`, the request that takes the place sends the batch in
its own task (and returns once the whole batch is answered), and if it is cancelled the others
get a `TransportError`: one failed attempt.

A peer that does not know `/v1/batch` (an older qkdagent: 404 `not-found`) is sent each item
alone, and not asked again for `FALLBACK_PAUSE`; one that refuses a batch as malformed or too
large (another version's bounds) has that batch's items sent alone. Those answers are not
authenticated beyond TLS, but they can only cost performance: the items go unbatched.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Awaitable, Callable

import trio

from . import batchwire
from .errors import ProtocolError
from .h1client import OnData, Reply, TransportError
from .identity import PeerIdentity
from .protocol import MAX_BODY, error_code

log = logging.getLogger(__name__)

IN_FLIGHT = 2
"""Requests under way to one peer before the next ones queue and go together."""
FALLBACK_PAUSE = 3600.0
"""Seconds a peer that does not know batches is sent requests one by one."""
BATCH_PATH = "/v1/batch"

Send = Callable[[str, str, bytes, int, OnData | None], Awaitable[Reply]]
"""(peer URL, path, body, reply limit, streamed-body sink) -> the reply: one HTTP request."""


class _Waiting:
    """A queued request and, once answered, its reply or why there is none."""

    __slots__ = ("done", "error", "item", "queued", "reply", "taken")

    def __init__(self, item: batchwire.Item) -> None:
        self.item = item
        self.taken = False
        self.queued = trio.CancelScope()
        """Its wait for a place, called off once another request's batch takes it."""
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

    def __init__(self, send: Send, *, timeout: float = 10.0, in_flight: int = IN_FLIGHT) -> None:
        self._send = send
        self.timeout = timeout
        """Seconds a batch sent by the coalescer's own task may take."""
        self._in_flight = in_flight
        self._peers: dict[str, _Peer] = {}
        self._nursery: trio.Nursery | None = None
        self.batches = 0
        """Batches answered (statistics, for benchmarks and tests)."""
        self.batched = 0
        """Items they carried."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send batches from tasks of this one until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

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
            placed = False
            with waiting.queued:
                await peer.places.acquire()
                placed = True
            # Places go in order of asking, and the queue is in that order too: whoever gets
            # one first finds its own request at the head, or already on its way.
            if waiting.taken:
                if placed:
                    peer.places.release()
            else:
                batch = _take(peer.queue)
                if self._nursery is not None:
                    self._nursery.start_soon(self._owned, url, peer, batch)
                else:
                    try:
                        await self._send_queued(url, peer, batch)
                    finally:
                        peer.places.release()
            await waiting.done.wait()
        finally:
            if not waiting.taken:
                peer.queue.remove(waiting)
        return waiting.result()

    async def _alone(self, url: str, item: batchwire.Item) -> Reply:
        path = f"/v1/links/{item.link}/{item.action}"
        return await self._send(url, path, item.body, MAX_BODY, None)

    async def _owned(self, url: str, peer: _Peer, batch: list[_Waiting]) -> None:
        """A batch sent by the coalescer's task: its place is given back when it ends."""
        try:
            with trio.move_on_after(self.timeout):
                await self._send_queued(url, peer, batch)
        except Exception as exc:  # a bug must not end the coalescer: each item fails once
            log.error("a batch to %s failed with %s (a bug)", url, type(exc).__name__)
        finally:
            peer.places.release()
            for waiting in batch:
                waiting.settle(None, TransportError(f"no answer from {url} in time"))

    async def _send_queued(self, url: str, peer: _Peer, batch: list[_Waiting]) -> None:
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
        except trio.TooSlowError:  # the HTTP client's own backstop
            for waiting in batch:
                waiting.settle(None, TransportError("no complete reply in time"))
        finally:  # cancelled or failed: the others try again
            for waiting in batch:
                waiting.settle(None, TransportError("its batch ended without its answer"))

    async def _batch(self, url: str, peer: _Peer, batch: list[_Waiting]) -> None:
        request = batchwire.encode_request([w.item for w in batch])
        reader = batchwire.ReplyReader(len(batch))

        def answered(data: bytes, identity: PeerIdentity) -> None:
            for index, answer in reader.feed(data):
                batch[index].settle(Reply(answer.status, answer.body, identity))

        limit = batchwire.reply_limit(len(batch))
        try:
            reply = await self._send(url, BATCH_PATH, request, limit, answered)
            if reply.status == 200:
                reader.finish()
        except ProtocolError as exc:
            raise TransportError(f"bad batch reply: {exc}") from None
        if reply.status == 200:
            self.batches += 1
            self.batched += len(batch)
            return
        code = error_code(reply.body)
        if reply.status == 404 and code == "not-found":
            peer.unbatched_until = trio.current_time() + FALLBACK_PAUSE
            log.info(
                "peer %s does not take batched requests (an older qkdagent?): sending them one "
                "by one (asking again in %d s)", url, FALLBACK_PAUSE,
            )  # fmt: skip
        elif not ((reply.status == 400 and code == "batch") or reply.status == 413):
            raise TransportError(f"the peer answered a batch with HTTP {reply.status}")
        await self._one_by_one(url, batch)

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
        waiting.queued.cancel()
        batch.append(waiting)
        size = grown
    return batch
