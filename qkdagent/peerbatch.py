"""Coalescing a peer client's requests to one peer into batches (issue 18).

At 10,000 links, most of what a rotation cost each agent was per request: HTTP framing, TLS
records, a task and a wake-up on each side, for a few hundred bytes of message. Requests that
wait for the same peer now go together (`batchwire`), and the peer runs their handlers side by
side, so their durable commits meet in one group commit as well.

The rule is Nagle's, so nothing waits that need not: a request goes at once, alone and on the
plain `/v1/links/...` path, while fewer than `in_flight` requests to its peer hold a place
and none is queued. Otherwise it queues, and when a place is free the head of the queue sends
everything queued, in order (up to `batchwire.MAX_ITEMS` items and `MAX_BATCH` bytes), as one
batch. A lone link's rotation never queues, so its latency is what it was; links whose
rotations fall together (the scheduler's `grid`) share requests.

Isolation:
- the peer streams each item's answer as soon as it has it, and each waiting request returns
  with its own answer, so a slow item holds up no other item of its batch;
- a batch steps aside (stops holding a place) once its answers begin, and any request stops
  holding others back after `STALL`, so a slow request delays the next batch by at most that;
  at most `MAX_OUTSTANDING` requests are under way to a peer all the same;
- while `run` is going, a batch is sent by a task of the coalescer's own, for as long as one
  of its callers still waits (at most the client's timeout): a caller that gives up (its
  rotation's deadline) only stops waiting. Without `run`, the head of the queue sends the
  batch in its own task (and returns once the whole batch is answered), and if it is
  cancelled the others get a `TransportError`: one failed attempt.

A peer that does not know `/v1/batch` (an older qkdagent: 404 `not-found`) is sent every
request alone, as before batches, and not asked again for `FALLBACK_PAUSE`; one that refuses a
batch as malformed or too large (another version's bounds) has that batch's items sent alone,
and one that answers it 503 `busy` (no batch from us for now) gets them alone, and every
request alone for `BUSY_PAUSE`.
Those answers are not authenticated beyond TLS, but they can only cost performance.
"""

from __future__ import annotations

import collections
import itertools
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
STALL = 0.2
"""Seconds after which a request still under way stops holding others back (it counts toward
`MAX_OUTSTANDING` only): a slow item delays the next batch by at most this."""
MAX_OUTSTANDING = 8
"""Requests (alone or batched) under way to one peer at most, stalled ones included (the
peer server's `max_batches_per_identity`)."""
FALLBACK_PAUSE = 3600.0
"""Seconds a peer that does not know batches is sent requests one by one."""
BUSY_PAUSE = 10.0
"""Seconds a peer that answered a batch 503 `busy` is sent requests one by one: it takes no
batch from our identity or address for now (too many under way, or the address spent its
refusal budget: a removed link's 404s, another client behind the same address), and takes
lone requests all the same."""
BATCH_PATH = "/v1/batch"

Send = Callable[[str, str, bytes, int, OnData | None], Awaitable[Reply]]
"""(peer URL, path, body, reply limit, streamed-body sink) -> the reply: one HTTP request."""


class _Waiting:
    """A queued request and, once answered, its reply or why there is none."""

    __slots__ = ("deadline", "done", "error", "item", "reply", "taken", "turn")

    def __init__(self, item: batchwire.Item, deadline: float) -> None:
        self.item = item
        self.deadline = deadline
        """Its caller's: past it nobody waits for the answer."""
        self.taken = False
        self.turn = trio.Event()
        """Set once it heads its peer's queue, or once a batch that took it has its answer:
        only the head waits for a place, so a place coming back wakes one waiter, not every
        request queued (`_wake_head`), and a request taken into a batch wakes only when
        answered."""
        self.done = trio.Event()
        self.reply: Reply | None = None
        self.error: TransportError | None = None

    def settle(self, reply: Reply | None, error: TransportError | None = None) -> None:
        if not self.done.is_set():
            self.reply, self.error = reply, error
            self.done.set()
            self.turn.set()

    def result(self) -> Reply:
        if self.reply is None:
            raise self.error or TransportError("the batch was not answered")
        return self.reply


class _Places:
    """Places for the requests under way to one peer. A place counts toward `limit` until it
    is given back, has been held for `STALL`, or its batch has begun to answer; it counts
    toward `MAX_OUTSTANDING` until it is given back."""

    __slots__ = ("_freed", "_held", "_tokens", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[int, float] = {}
        """Place -> when it was taken, oldest first."""
        self._tokens = itertools.count()
        self._freed = trio.Event()

    def __len__(self) -> int:
        return len(self._held)

    def _active(self, now: float) -> list[float]:
        """When each place not yet stalled was taken (a place stalls at `taken + STALL`: the
        very time a waiter sleeps until, so that it finds it stalled when it wakes)."""
        return [t for t in self._held.values() if t + STALL > now]

    def room(self, now: float) -> bool:
        return len(self._held) < MAX_OUTSTANDING and len(self._active(now)) < self.limit

    def take(self, now: float) -> int:
        token = next(self._tokens)
        self._held[token] = now
        return token

    def give_back(self, token: int) -> None:
        if self._held.pop(token, None) is not None:
            self.nudge()

    def step_aside(self, token: int) -> None:
        """Stop holding others back (a batch whose answers have begun), still counting
        toward `MAX_OUTSTANDING` until given back."""
        if self._held.get(token, -math.inf) > -math.inf:
            self._held[token] = -math.inf
            self.nudge()

    def nudge(self) -> None:
        """Have the waiters look again (a place came back, or the queue's head changed)."""
        self._freed.set()
        self._freed = trio.Event()

    async def wait_for_room(self) -> None:
        """Until there is room (for the head of the queue: the only request that waits here)."""
        while True:
            now = trio.current_time()
            if self.room(now):
                return
            wake = math.inf
            active = self._active(now)
            if len(self._held) < MAX_OUTSTANDING:
                wake = active[len(active) - self.limit] + STALL  # room once enough stall
            with trio.move_on_at(wake):
                await self._freed.wait()


class _Peer:
    __slots__ = ("places", "queue", "unbatched_until")

    def __init__(self, in_flight: int) -> None:
        self.places = _Places(in_flight)
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
        item = batchwire.Item(link, action, body)
        now = trio.current_time()
        if now < peer.unbatched_until or len(body) > MAX_BODY:
            return await self._alone(url, item)  # as before batches (a peer answers 413)
        places = peer.places
        if not peer.queue and places.room(now):
            place = places.take(now)
            try:
                return await self._alone(url, item)
            finally:
                places.give_back(place)
        waiting = _Waiting(item, trio.current_effective_deadline())
        peer.queue.append(waiting)
        try:
            while not waiting.taken:
                if peer.queue[0] is not waiting:
                    if waiting.turn.is_set():  # (a safeguard: only the head's turn or an
                        waiting.turn = trio.Event()  # answered request's is ever set)
                    await waiting.turn.wait()
                    continue
                await places.wait_for_room()  # (a head stays the head until it takes a batch)
                # There is room, and this request heads the queue (no checkpoint since): the
                # queue goes, as much as a batch holds, in the order it came.
                place = places.take(trio.current_time())
                batch = _take(peer.queue)
                _wake_head(peer)  # a new head, if anything is left
                if self._nursery is not None:
                    self._nursery.start_soon(self._owned, url, peer, batch, place)
                else:
                    try:
                        await self._send_queued(url, peer, batch, place)
                    finally:
                        places.give_back(place)
            if not waiting.done.is_set():  # (answered already: woken by the answer)
                await waiting.done.wait()
        finally:
            if not waiting.taken:
                was_head = peer.queue[0] is waiting
                peer.queue.remove(waiting)
                if was_head:  # (one behind it leaving changes neither the head nor the room)
                    _wake_head(peer)
        return waiting.result()

    async def _alone(self, url: str, item: batchwire.Item) -> Reply:
        path = f"/v1/links/{item.link}/{item.action}"
        return await self._send(url, path, item.body, MAX_BODY, None)

    async def _owned(self, url: str, peer: _Peer, batch: list[_Waiting], place: int) -> None:
        """A batch sent by the coalescer's task, for as long as one of its callers waits (at
        most `timeout`)."""
        deadline = min(trio.current_time() + self.timeout, max(w.deadline for w in batch))
        try:
            with trio.move_on_at(deadline):
                await self._send_queued(url, peer, batch, place)
        except Exception as exc:  # a bug must not end the coalescer: each item fails once
            log.error("a batch to %s failed with %s (a bug)", url, type(exc).__name__)
        finally:
            peer.places.give_back(place)
            for waiting in batch:
                waiting.settle(None, TransportError(f"no answer from {url} in time"))

    async def _send_queued(self, url: str, peer: _Peer, batch: list[_Waiting], place: int) -> None:
        try:
            if len(batch) == 1:
                batch[0].settle(await self._alone(url, batch[0].item))
            elif trio.current_time() < peer.unbatched_until:
                await self._one_by_one(url, batch)
            else:
                await self._batch(url, peer, batch, place)
        except TransportError as exc:
            for waiting in batch:
                waiting.settle(None, exc)
        except trio.TooSlowError:  # the HTTP client's own backstop
            for waiting in batch:
                waiting.settle(None, TransportError("no complete reply in time"))
        finally:  # cancelled or failed: the others try again
            for waiting in batch:
                waiting.settle(None, TransportError("its batch ended without its answer"))

    async def _batch(self, url: str, peer: _Peer, batch: list[_Waiting], place: int) -> None:
        request = batchwire.encode_request([w.item for w in batch])
        reader = batchwire.ReplyReader(len(batch))

        def answered(data: bytes, identity: PeerIdentity) -> None:
            for index, answer in reader.feed(data):
                batch[index].settle(Reply(answer.status, answer.body, identity))
                # the peer is answering: what queued meanwhile may go (a slow item of this
                # batch holds up no other request)
                peer.places.step_aside(place)

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
        elif reply.status == 503 and code == "busy":
            peer.unbatched_until = max(peer.unbatched_until, trio.current_time() + BUSY_PAUSE)
            log.debug("peer %s is busy for batches: sending requests one by one", url)
        elif not ((reply.status == 400 and code == "batch") or reply.status == 413):
            raise TransportError(f"the peer answered a batch with HTTP {reply.status}")
        await self._one_by_one(url, batch)

    async def _one_by_one(self, url: str, batch: list[_Waiting]) -> None:
        async def one(waiting: _Waiting) -> None:
            try:
                waiting.settle(await self._alone(url, waiting.item))
            except TransportError as exc:
                waiting.settle(None, exc)
            except trio.TooSlowError:
                waiting.settle(None, TransportError("no complete reply in time"))

        async with trio.open_nursery() as nursery:
            for waiting in batch:
                nursery.start_soon(one, waiting)


def _wake_head(peer: _Peer) -> None:
    """The queue's new head looks for a place (it alone waits for one: the requests behind
    it wait for their turn)."""
    if peer.queue:
        peer.queue[0].turn.set()


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
