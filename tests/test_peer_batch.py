"""Batches of peer requests (issue 18): the container (`batchwire`), strict and bounded both
ways, and the client's coalescing (`peerbatch`): what goes alone, what goes together, what a
peer without batches gets, and that no request is lost or answered with another's reply."""

from __future__ import annotations

import logging
import random
import struct
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from qkdagent import batchwire, peerbatch, peerserver
from qkdagent.batchwire import Answer, Item
from qkdagent.builtin.memory import MemoryPool
from qkdagent.errors import ProtocolError
from qkdagent.h1client import OnData, Reply, TransportError
from qkdagent.identity import PeerIdentity
from qkdagent.peerbatch import BATCH_PATH, FALLBACK_PAUSE, MAX_OUTSTANDING, STALL, Coalescer
from qkdagent.protocol import MAX_BODY, error_body
from qkdagent.testing import open_agent_pair
from tests.helpers import TaskSteps

ITEMS = [
    Item("link00001", "rotate", b'{"kind":"rotate"}'),
    Item("alice-bob", "commit", b""),
    Item("x" * 255, "announce", b"\x00\xff" * 10),
    Item("l", "resync", b"{}"),
]


# -- the container -------------------------------------------------------------------------


def test_requests_and_replies_round_trip() -> None:
    assert batchwire.decode_request(batchwire.encode_request(ITEMS)) == ITEMS
    answers = [Answer(200, b"{}"), Answer(409, b'{"error":"epoch"}'), Answer(500, b"")]
    assert batchwire.decode_reply(batchwire.encode_reply(answers), 3) == answers
    data = batchwire.encode_request(ITEMS)
    assert len(data) == batchwire.empty_request_size() + sum(map(batchwire.item_size, ITEMS))


def test_every_cut_of_a_request_or_reply_is_refused() -> None:
    request = batchwire.encode_request(ITEMS)
    reply = batchwire.encode_reply([Answer(200, b"{}"), Answer(404, b"x" * 300)])
    for cut in range(len(request)):
        with pytest.raises(ProtocolError):
            batchwire.decode_request(request[:cut])
    for cut in range(len(reply)):
        with pytest.raises(ProtocolError):
            batchwire.decode_reply(reply[:cut], 2)
    with pytest.raises(ProtocolError, match="after its last item"):
        batchwire.decode_request(request + b"\x00")
    with pytest.raises(ProtocolError, match="after its last answer"):
        batchwire.decode_reply(reply + b"\x00", 2)


def _request(count: int, *items: bytes) -> bytes:
    return batchwire.REQUEST_MAGIC + struct.pack(">H", count) + b"".join(items)


def _item(action: int, name: bytes, body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return struct.pack(">BB", action, len(name)) + name + struct.pack(">I", size) + body


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"QKB2" + _request(1, _item(0, b"l", b""))[4:], 400, "not a batch"),
        (_request(0), 400, "0 items"),
        (_request(65, *[_item(0, b"l", b"")] * 65), 400, "65 items"),
        (_request(1, _item(4, b"l", b"")), 400, "unknown action"),
        (_request(1, _item(0, b"", b"")), 400, "empty link name"),
        (_request(1, _item(0, b"a/b\x7f", b"")), 400, "printable"),
        (_request(1, _item(0, "é".encode(), b"")), 400, "printable"),
        (_request(1, _item(0, b"l", b"", MAX_BODY + 1)), 413, "over"),
        (_request(1, _item(0, b"l", b"", 2**32 - 1)), 413, "over"),
        (_request(2, _item(0, b"l", b"")), 400, "cut short"),
        (b"QKB1" + b"\xff" * (batchwire.MAX_BATCH - 3), 413, "larger than"),
    ],
)
def test_malformed_requests_are_refused_with_a_status(
    data: bytes, status: int, message: str
) -> None:
    with pytest.raises(ProtocolError, match=message) as caught:
        batchwire.decode_request(data)
    assert caught.value.status == status


def test_a_reply_must_answer_exactly_the_items_sent() -> None:
    reply = batchwire.encode_reply([Answer(200, b"{}")] * 3)
    with pytest.raises(ProtocolError, match="3 answers for 2"):
        batchwire.decode_reply(reply, 2)
    for status in (0, 99, 600, 65535):
        bad = batchwire.REPLY_MAGIC + struct.pack(">HHHI", 1, 0, status, 0)
        with pytest.raises(ProtocolError, match="status"):
            batchwire.decode_reply(bad, 1)
    huge = batchwire.REPLY_MAGIC + struct.pack(">HHHI", 1, 0, 200, MAX_BODY + 1)
    with pytest.raises(ProtocolError, match="over"):
        batchwire.decode_reply(huge, 1)  # refused from the length, before any of the body
    with pytest.raises(ProtocolError, match="not a batch reply"):
        batchwire.decode_reply(batchwire.encode_request(ITEMS), 4)
    with pytest.raises(ProtocolError, match="not a batch reply"):
        batchwire.ReplyReader(1).feed(b"QKX")  # known wrong from its first bytes
    head = batchwire.reply_head(2)
    for index in (2, 7, 65535):  # an item that was not asked
        with pytest.raises(ProtocolError, match="no answer for"):
            batchwire.decode_reply(head + batchwire.encode_answer(index, Answer(200, b"")), 2)
    twice = head + batchwire.encode_answer(1, Answer(200, b"a")) * 2
    with pytest.raises(ProtocolError, match="no answer for"):
        batchwire.decode_reply(twice, 2)
    with pytest.raises(ProtocolError, match="cut short"):
        batchwire.decode_reply(head + batchwire.encode_answer(1, Answer(200, b"a")), 2)


def test_a_streamed_reply_is_read_answer_by_answer_in_any_order() -> None:
    answers = {2: Answer(200, b"two"), 0: Answer(409, b"zero"), 1: Answer(200, b"")}
    data = batchwire.reply_head(3) + b"".join(batchwire.encode_answer(i, a)
                                              for i, a in answers.items())  # fmt: skip
    reader = batchwire.ReplyReader(3)
    got = [pair for byte in range(len(data)) for pair in reader.feed(data[byte : byte + 1])]
    reader.finish()
    assert got == list(answers.items())  # each as soon as its last byte came
    assert batchwire.decode_reply(data, 3) == [answers[0], answers[1], answers[2]]
    assert len(data) <= batchwire.reply_limit(3)


def test_encoding_refuses_what_no_peer_would_decode() -> None:
    for items in ([], [ITEMS[0]] * 65):
        with pytest.raises(ValueError, match="items"):
            batchwire.encode_request(items)
    for item in (Item("", "rotate", b""), Item("x" * 256, "rotate", b""),
                 Item("l", "rotate", b"x" * (MAX_BODY + 1))):  # fmt: skip
        with pytest.raises(ValueError, match="out of bounds"):
            batchwire.encode_request([item])
    with pytest.raises(ValueError, match="over"):
        batchwire.encode_request([Item("l", "rotate", b"x" * MAX_BODY)] * 9)


def test_reprs_show_sizes_not_bodies() -> None:
    secretish = b"c2VjcmV0"
    assert "c2Vj" not in repr(Item("l", "rotate", secretish))
    assert "c2Vj" not in repr(Answer(200, secretish))


# -- coalescing ----------------------------------------------------------------------------

SERVER = PeerIdentity(dns=("bob",))


class FakePeer:
    """Stands in for the HTTP client: records what was sent, answers each item with its own
    body reversed (so a reply given to the wrong request shows), and can be held."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Item] | Item]] = []
        self.hold = trio.Event()
        self.hold.set()
        self.batch_status = 200
        self.batch_body: bytes | None = None
        self.fail_batch: TransportError | None = None
        self.garbled = False
        self.unanswered: set[int] = set()
        self.slow: set[str] = set()
        """Links whose batched answer comes last, once `release_slow` is set."""
        self.release_slow = trio.Event()

    def held(self) -> trio.Event:
        self.hold = trio.Event()
        return self.hold

    async def send(
        self, url: str, path: str, body: bytes, limit: int, on_data: OnData | None
    ) -> Reply:
        hold = self.hold
        if path == BATCH_PATH:
            items = batchwire.decode_request(body)
            assert limit == batchwire.reply_limit(len(items)) and on_data is not None
            self.sent.append((url, items))
            if self.batch_status != 200:
                await hold.wait()
                return Reply(self.batch_status, self.batch_body or b"", SERVER)
            on_data(batchwire.reply_head(len(items)), SERVER)
            if self.garbled:
                on_data(b"\xff" * 8, SERVER)
            # answers stream in reverse order, the first item's once the hold is released;
            # those of `slow` links only once `release_slow` is
            for index in reversed(range(len(items))):
                if items[index].link in self.slow or index in self.unanswered:
                    continue
                if index == 0:
                    await hold.wait()
                    if self.fail_batch is not None:
                        raise self.fail_batch
                answer = Answer(200, items[index].body[::-1])
                on_data(batchwire.encode_answer(index, answer), SERVER)
            if self.slow:
                await self.release_slow.wait()
                for index, item in enumerate(items):
                    if item.link in self.slow:
                        on_data(batchwire.encode_answer(index, Answer(200, b"slow")), SERVER)
            return Reply(200, b"", SERVER)
        assert limit == MAX_BODY and on_data is None
        _, _, _, link, action = path.split("/")
        self.sent.append((url, Item(link, action, body)))
        await hold.wait()
        return Reply(200, body[::-1], SERVER)


async def _post_all(
    coalescer: Coalescer,
    requests: list[tuple[str, str]],
    url: str = "https://bob",
    *,
    release: trio.Event | None = None,
) -> dict[str, Reply | Exception]:
    """Post each request in turn (each one queued or sent before the next), then set
    `release` (the peer's hold) and wait for every answer."""
    results: dict[str, Reply | Exception] = {}

    async def one(link: str, action: str) -> None:
        try:
            results[link] = await coalescer.post(url, link, action, f"body-{link}".encode())
        except TransportError as exc:
            results[link] = exc

    async with trio.open_nursery() as nursery:
        for link, action in requests:
            nursery.start_soon(one, link, action)
            await trio.testing.wait_all_tasks_blocked()
        if release is not None:
            release.set()
    return results


async def test_a_lone_request_goes_alone_on_its_own_path() -> None:
    peer = FakePeer()
    coalescer = Coalescer(peer.send)
    reply = await coalescer.post("https://bob", "alice-bob", "rotate", b"abc")
    assert reply == Reply(200, b"cba", SERVER)
    assert peer.sent == [("https://bob", Item("alice-bob", "rotate", b"abc"))]
    assert coalescer.batches == 0


async def test_requests_queued_behind_a_full_peer_go_as_one_batch_each_with_its_answer() -> None:
    peer = FakePeer()
    coalescer = Coalescer(peer.send, in_flight=2)
    requests = [(f"link{i}", "rotate") for i in range(10)]
    results = await _post_all(coalescer, requests, release=peer.held())
    assert all(results[f"link{i}"] == Reply(200, f"body-link{i}".encode()[::-1], SERVER)
               for i in range(10))  # fmt: skip
    alone = [s for _, s in peer.sent if isinstance(s, Item)]
    batches = [s for _, s in peer.sent if isinstance(s, list)]
    assert [i.link for i in alone] == ["link0", "link1"]  # the two places, at once
    assert [[i.link for i in b] for b in batches] == [[f"link{i}" for i in range(2, 10)]]
    assert (coalescer.batches, coalescer.batched) == (1, 8)


async def test_peers_queue_apart() -> None:
    """One place per peer, both taken: neither peer's request waits for the other's."""
    peer = FakePeer()
    hold = peer.held()
    coalescer = Coalescer(peer.send, in_flight=1)
    async with trio.open_nursery() as nursery:
        for url in ("https://bob", "https://carol"):
            nursery.start_soon(coalescer.post, url, "a", "rotate", b"x")
        await trio.testing.wait_all_tasks_blocked()
        assert sorted((url, s) for url, s in peer.sent) == [
            ("https://bob", Item("a", "rotate", b"x")),
            ("https://carol", Item("a", "rotate", b"x")),
        ]
        hold.set()


async def test_a_batch_is_cut_at_the_item_and_byte_bounds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):  # (virtual time: a queue left waiting fails at once)
        await _cut_at_the_bounds()


async def _cut_at_the_bounds() -> None:
    peer = FakePeer()
    coalescer = Coalescer(peer.send, in_flight=1)
    count = batchwire.MAX_ITEMS + 6
    requests = [(f"l{i:03d}", "commit") for i in range(count)]
    results = await _post_all(coalescer, requests, release=peer.held())
    assert len(results) == count and all(isinstance(r, Reply) for r in results.values())
    sizes = [len(s) if isinstance(s, list) else 1 for _, s in peer.sent]
    assert sizes == [1, batchwire.MAX_ITEMS, 5]

    big = b"x" * MAX_BODY  # seven of these fill a batch (MAX_BATCH is 8 x MAX_BODY)
    peer.sent.clear()
    hold = peer.held()
    waiters: list[Reply] = []

    async def one(i: int) -> None:
        waiters.append(await coalescer.post("https://bob", f"b{i}", "rotate", big))

    async with trio.open_nursery() as nursery:
        for i in range(12):
            nursery.start_soon(one, i)
            await trio.testing.wait_all_tasks_blocked()
        hold.set()
    sizes = [len(s) if isinstance(s, list) else 1 for _, s in peer.sent]
    assert sizes == [1, 7, 4] and len(waiters) == 12


@pytest.mark.parametrize(
    ("status", "code", "pause"),
    [(404, "not-found", FALLBACK_PAUSE), (503, "busy", peerbatch.BUSY_PAUSE)],
    ids=["older-peer", "busy"],
)
async def test_a_peer_without_batches_is_sent_each_item_alone_and_asked_again_later(
    autojump_clock: trio.testing.MockClock, status: int, code: str, pause: float
) -> None:
    """404 `not-found` (an older qkdagent) or 503 `busy` (our identity has many batches
    under way, or our address spent its refusal budget: issue 18 review) fails no item: the
    batch's items go alone, as does every request for the pause, then batches are tried."""
    peer = FakePeer()
    peer.batch_status, peer.batch_body = status, error_body(code, "no batch")
    coalescer = Coalescer(peer.send, in_flight=1)

    async def round_of(n: int) -> list[str]:
        peer.sent.clear()
        requests = [(f"l{i}", "rotate") for i in range(n)]
        results = await _post_all(coalescer, requests, release=peer.held())
        assert all(results[f"l{i}"] == Reply(200, f"body-l{i}".encode()[::-1], SERVER)
                   for i in range(n))  # fmt: skip
        return ["batch" if isinstance(s, list) else s.link for _, s in peer.sent]

    first = await round_of(4)
    assert first[:2] == ["l0", "batch"] and sorted(first[2:]) == ["l1", "l2", "l3"]
    again = await round_of(4)  # within the pause: no batch asked
    assert "batch" not in again and sorted(again) == ["l0", "l1", "l2", "l3"]
    await trio.sleep(pause)
    later = await round_of(3)
    assert later.count("batch") == 1
    assert coalescer.batches == 0


@pytest.mark.parametrize("failure", ["status", "garbled", "transport", "short"])
async def test_a_failed_batch_fails_the_items_it_did_not_answer(failure: str) -> None:
    """Items answered before the failure keep their answers; the others fail once each."""
    peer = FakePeer()
    if failure == "status":
        peer.batch_status, peer.batch_body = 500, error_body("internal", "internal error")
    elif failure == "garbled":
        peer.garbled = True
    elif failure == "short":  # a well-formed reply without the first item's answer
        peer.unanswered = {0}
    else:
        peer.fail_batch = TransportError("connection reset")
    coalescer = Coalescer(peer.send, in_flight=1)
    requests = [(f"l{i}", "rotate") for i in range(4)]
    results = await _post_all(coalescer, requests, release=peer.held())
    assert isinstance(results["l0"], Reply)  # it went alone
    answered = {f"l{i}" for i in (1, 2, 3) if isinstance(results[f"l{i}"], Reply)}
    assert answered == ({"l2", "l3"} if failure in ("transport", "short") else set())
    assert all(isinstance(results[f"l{i}"], TransportError) for i in (1, 2, 3)
               if f"l{i}" not in answered)  # fmt: skip
    assert coalescer.batches == 0
    assert not coalescer._peers["https://bob"].queue
    # and the peer is asked for batches again at once: only a 404 pauses them
    peer.batch_status, peer.garbled, peer.unanswered, peer.fail_batch = 200, False, set(), None
    requests = [(f"m{i}", "rotate") for i in range(3)]
    results = await _post_all(coalescer, requests, release=peer.held())
    assert all(isinstance(r, Reply) for r in results.values()) and coalescer.batches == 1


@pytest.mark.parametrize(("status", "code"), [(400, "batch"), (413, "too-large")])
async def test_a_batch_refused_for_its_shape_goes_item_by_item(status: int, code: str) -> None:
    """A peer with other bounds (another version): that batch's items go alone, and the
    next batch is tried again."""
    peer = FakePeer()
    peer.batch_status, peer.batch_body = status, error_body(code, "no")
    coalescer = Coalescer(peer.send, in_flight=1)
    results = await _post_all(coalescer, [(f"l{i}", "rotate") for i in range(4)],
                              release=peer.held())  # fmt: skip
    assert all(results[f"l{i}"] == Reply(200, f"body-l{i}".encode()[::-1], SERVER)
               for i in range(4))  # fmt: skip
    kinds = ["batch" if isinstance(sent, list) else sent.link for _, sent in peer.sent]
    assert kinds[:2] == ["l0", "batch"] and sorted(kinds[2:]) == ["l1", "l2", "l3"]
    assert next(iter(coalescer._peers.values())).unbatched_until < 0


async def test_a_slow_item_holds_up_no_other_item_of_its_batch() -> None:
    peer = FakePeer()
    peer.slow = {"l2"}
    coalescer = Coalescer(peer.send, in_flight=1)
    results: dict[str, Reply] = {}

    async def one(link: str) -> None:
        results[link] = await coalescer.post("https://bob", link, "rotate", link.encode())

    hold = peer.held()
    async with trio.open_nursery() as nursery:
        await nursery.start(coalescer.run)  # as in the agent: the batch is not its sender's
        for i in range(5):
            nursery.start_soon(one, f"l{i}")
            await trio.testing.wait_all_tasks_blocked()
        hold.set()
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(results) == ["l0", "l1", "l3", "l4"]  # all but the slow one, at once
        peer.release_slow.set()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert results["l2"].body == b"slow" and results["l3"].body == b"3l"
    assert len(coalescer._peers["https://bob"].places) == 0


@pytest.mark.parametrize("owned", [True, False], ids=["run", "no-run"])
async def test_a_cancelled_caller_only_stops_waiting_while_the_coalescer_runs(
    owned: bool,
) -> None:
    """ "sender" takes the place and so carries the batch with "other" (whose answer is slow);
    then its caller gives up. With `run` going, the batch is the coalescer's: "other" still
    gets its answer. Without, the batch goes down with its sender: "other" fails once. A
    caller that gives up while queued is never sent."""
    peer = FakePeer()
    peer.slow = {"other"}
    hold = peer.held()
    coalescer = Coalescer(peer.send, in_flight=1)
    outcome: dict[str, object] = {}

    async def post(link: str, scope: trio.CancelScope | None = None) -> None:
        try:
            with scope or trio.CancelScope():
                outcome[link] = await coalescer.post("https://bob", link, "rotate", b"x")
            if scope is not None and scope.cancelled_caught:
                outcome[link] = "cancelled"
        except TransportError as exc:
            outcome[link] = exc

    first, quitter, sender = trio.CancelScope(), trio.CancelScope(), trio.CancelScope()
    with trio.fail_after(10):  # "other" waiting forever for a dropped batch would hang here
        async with trio.open_nursery() as nursery:
            if owned:
                await nursery.start(coalescer.run)
            await _cancel_mid_batch(nursery, post, peer, hold, first, quitter, sender)
            assert outcome["sender"] == "cancelled"
            assert ("other" in outcome) is not owned
            peer.hold.set()  # the batch goes on (when it is the coalescer's)
            peer.release_slow.set()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert outcome["quitter"] == "cancelled" and isinstance(outcome["first"], Reply)
    if owned:
        assert outcome["other"] == Reply(200, b"slow", SERVER)
    else:
        assert isinstance(outcome["other"], TransportError)
        assert "without its answer" in str(outcome["other"])
    (batch,) = [s for _, s in peer.sent if isinstance(s, list)]
    assert [i.link for i in batch] == ["sender", "other"]
    assert not coalescer._peers["https://bob"].queue
    assert len(coalescer._peers["https://bob"].places) == 0  # every place given back


# -- two agents over HTTPS -----------------------------------------------------------------

REC = {"sinks": {"rec": {"type": "recording"}}}
SLOW_TAKE = 0.3
"""Seconds every source call takes: bob's first rotates hold their places that long, so the
other links' requests queue behind them, whatever the machine's speed."""


async def _rotate_many(tmp_path: Path, names: list[str]) -> Any:  # type: ignore[misc]
    """Start a pair over HTTPS with `names` as extra links (a slow source), wait until every
    link has rotated once on both sides with the same installs, and return the pair's agents'
    batch figures (alice's client, bob's server)."""
    link = {"interval": 60, "reject_after": 120}
    async with open_agent_pair(tmp_path, alice=REC, bob=REC, link=link, start=False) as pair:
        for config in pair.configs.values():
            template = config["links"]["alice-bob"]
            for name in names:
                config["links"][name] = dict(template)
        pool = MemoryPool.named(pair.configs["alice"]["sources"]["sim"]["pool"])
        pool.delay = SLOW_TAKE
        await pair.start("bob")
        await pair.start("alice")
        every = [*names, "alice-bob"]

        def first(side: str, name: str) -> Any:  # type: ignore[misc]
            found = [r for r in pair.sink(side, "rec").installs if r.link == name]
            return found[0] if found else None

        with trio.fail_after(60):
            while any(first(s, n) is None for n in every for s in ("alice", "bob")):  # noqa: ASYNC110
                await trio.sleep(0.05)
        for name in every:  # the same keys and the same secret on both sides, for every link
            mine, theirs = first("alice", name), first("bob", name)
            assert mine.epoch == theirs.epoch == 1
            assert (mine.key_ids, mine.fingerprint) == (theirs.key_ids, theirs.fingerprint)
        assert len({first("alice", n).fingerprint for n in every}) == len(every)
        coalescer = pair.alice.client.batches  # type: ignore[attr-defined]
        sample = pair.bob.metrics.registry.get_sample_value
        return (
            coalescer,
            sample("qkdagent_peer_batches_received_total"),
            sample("qkdagent_peer_batched_requests_received_total"),
        )


async def test_agents_with_many_links_share_batches_over_https(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (the 0.2 s stall rule is tested under the virtual clock: here a slow machine's places
    # must not stall before the others' rotates have queued)
    monkeypatch.setattr(peerbatch, "STALL", 60.0)
    names = [f"link{i:02d}" for i in range(30)]
    coalescer, batches, batched = await _rotate_many(tmp_path, names)
    # 31 rotations start together; the first 2 rotates go alone (2 places) and are held by
    # bob's slow source, so the other 29 rotates queue and go together; then the commits
    assert coalescer.batches >= 1 and coalescer.batched >= 31 - 2
    assert (batches, batched) == (coalescer.batches, coalescer.batched)


async def test_a_peer_without_batches_gets_every_request_alone_over_https(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Bob as an older qkdagent: /v1/batch is an unknown path (404 not-found). Alice's one
    batch is refused, its items go one by one, and she asks no more batches."""
    monkeypatch.setattr(peerserver, "BATCH_PATH", b"/v1/not-yet")
    caplog.set_level(logging.INFO, logger="qkdagent.peerbatch")
    names = [f"link{i:02d}" for i in range(30)]
    coalescer, batches, batched = await _rotate_many(tmp_path, names)
    assert (coalescer.batches, batches, batched) == (0, 0, 0)
    assert next(iter(coalescer._peers.values())).unbatched_until > trio.current_time()
    assert caplog.text.count("does not take batched requests") == 1


async def _cancel_mid_batch(  # type: ignore[no-untyped-def]
    nursery: trio.Nursery, post, peer: FakePeer, hold: trio.Event, *scopes: trio.CancelScope
) -> None:
    """Start "first" (alone), then "sender", "quitter" and "other" (queued) in `nursery`;
    "quitter" gives up while queued, "sender" once it carries the batch."""
    first, quitter, sender = scopes
    nursery.start_soon(post, "first", first)
    await trio.testing.wait_all_tasks_blocked()
    nursery.start_soon(post, "sender", sender)  # queued; it will send the batch
    await trio.testing.wait_all_tasks_blocked()
    nursery.start_soon(post, "quitter", quitter)
    await trio.testing.wait_all_tasks_blocked()
    nursery.start_soon(post, "other")
    await trio.testing.wait_all_tasks_blocked()
    quitter.cancel()  # gives up while queued: never sent
    await trio.testing.wait_all_tasks_blocked()
    peer.held()  # what is sent from now on is held
    hold.set()  # "first" is answered; "sender" takes the place and sends the batch
    await trio.testing.wait_all_tasks_blocked()
    sender.cancel()  # its deadline, mid-batch
    await trio.testing.wait_all_tasks_blocked()


# -- places: a slow request holds up others for at most STALL ------------------------------


async def test_a_stalled_request_stops_holding_the_queue_and_outstanding_ones_are_capped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peer = FakePeer()
    hold = peer.held()  # nothing is ever answered until the end
    coalescer = Coalescer(peer.send, in_flight=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(coalescer.post, "https://bob", "l0", "rotate", b"x")
        await trio.testing.wait_all_tasks_blocked()
        for link in ("l1", "l2"):
            nursery.start_soon(coalescer.post, "https://bob", link, "rotate", b"x")
            await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(STALL * 0.9)
        assert len(peer.sent) == 1  # l1 and l2 wait for l0's place...
        await trio.sleep(STALL * 0.2)
        assert [_links(s) for _, s in peer.sent] == [["l0"], ["l1", "l2"]]  # ...until it stalls
        for i in range(3, 20):  # one more every stall: at most MAX_OUTSTANDING under way
            nursery.start_soon(coalescer.post, "https://bob", f"l{i}", "rotate", b"x")
            await trio.sleep(STALL * 1.5)
        assert len(peer.sent) == MAX_OUTSTANDING
        hold.set()
    assert len(coalescer._peers["https://bob"].places) == 0 and coalescer.batches >= 1
    assert sorted(x for _, s in peer.sent for x in _links(s)) == sorted(f"l{i}" for i in range(20))


async def test_a_place_coming_back_wakes_the_head_of_the_queue_not_every_request_queued(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Only the head of a peer's queue waits for a place; the requests behind it wait for
    their turn, or, once a batch took them, for their answer. (Every place given back, or
    batch stepping aside, woke the whole queue to find it was not first, and a request taken
    into a batch woke once for that and once for its answer: at 10,000 links about three
    wake-ups per queued request.)"""
    peer = FakePeer()
    hold = peer.held()
    coalescer = Coalescer(peer.send, in_flight=1)
    steps = TaskSteps()
    queued: list[trio.lowlevel.Task] = []

    def woken() -> list[int]:
        return [steps.by_task[task] for task in queued[1:]]

    # (virtual time: a request never woken fails the test at once)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(coalescer.post, "https://bob", "l0", "rotate", b"x")  # the place
            await trio.testing.wait_all_tasks_blocked()
            for i in range(1, 31):
                before = set(nursery.child_tasks)
                nursery.start_soon(coalescer.post, "https://bob", f"l{i}", "rotate", b"x")
                await trio.testing.wait_all_tasks_blocked()
                queued += set(nursery.child_tasks) - before
            places = coalescer._peers["https://bob"].places
            trio.lowlevel.add_instrument(steps)
            for _ in range(10):  # the places look again (one stepped aside, say): no room yet
                places.nudge()
                await trio.testing.wait_all_tasks_blocked()
            assert steps.by_task[queued[0]] == 10 and woken() == [0] * 29  # the head looked
            assert len(peer.sent) == 1
            peer.slow = {f"l{i}" for i in range(2, 31)}  # answered once `release_slow` is set
            hold.set()  # l0's place comes back: the head sends all queued as one batch...
            await trio.testing.wait_all_tasks_blocked()
            assert [_links(s) for _, s in peer.sent] == [["l0"], [f"l{i}" for i in range(1, 31)]]
            assert woken() == [0] * 29  # ...waking no one else
            peer.release_slow.set()
    trio.lowlevel.remove_instrument(steps)
    assert woken() == [1] * 29  # each woke for its answer


def _links(sent: list[Item] | Item) -> list[str]:
    return [i.link for i in sent] if isinstance(sent, list) else [sent.link]


@pytest.mark.parametrize("seed", range(12))
async def test_every_request_gets_its_own_answer_or_fails_whatever_befalls_the_batches(
    seed: int, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A randomised run: slow, failed, refused and partly answered batches, callers that give
    up, two peers, and the coalescer's task stopping midway (half the seeds). No request is
    answered with another's reply, every one ends, a queued one as soon as its answer (or
    failure) is known, not at its caller's deadline, and every place is given back."""
    rnd = random.Random(seed)
    settled: dict[bytes, float] = {}
    """Queued request's body -> when its answer or failure was given to it."""
    carriers: set[trio.lowlevel.Task] = set()
    """Heads that sent their batch themselves (no `run`): they return with the whole batch."""
    settle, send_queued = peerbatch._Waiting.settle, Coalescer._send_queued

    def settle_timed(waiting: Any, reply: Reply | None, error: Any = None) -> None:
        settled.setdefault(waiting.item.body, trio.current_time())
        settle(waiting, reply, error)

    async def send_queued_noted(self: Coalescer, *args: Any) -> None:
        carriers.add(trio.lowlevel.current_task())
        await send_queued(self, *args)

    monkeypatch.setattr(peerbatch._Waiting, "settle", settle_timed)
    monkeypatch.setattr(Coalescer, "_send_queued", send_queued_noted)

    async def send(url: str, path: str, body: bytes, limit: int, on_data: OnData | None) -> Reply:
        await trio.sleep(rnd.choice([0, 0.01, 0.5, 3, 20]))
        if rnd.random() < 0.1:
            raise TransportError("reset")
        if path != BATCH_PATH:
            return Reply(200, body[::-1], SERVER)
        items = batchwire.decode_request(body)
        assert on_data is not None and len({i.link for i in items}) == len(items)
        if rnd.random() < 0.1:
            return Reply(rnd.choice([400, 404, 503]), error_body("batch", "no"), SERVER)
        on_data(batchwire.reply_head(len(items)), SERVER)
        for index in rnd.sample(range(len(items)), len(items)):
            if rnd.random() < 0.05:
                continue  # never answered
            await trio.sleep(rnd.choice([0, 0.1, 4]))
            on_data(batchwire.encode_answer(index, Answer(200, items[index].body[::-1])), SERVER)
        return Reply(200, b"", SERVER)

    coalescer = Coalescer(send, timeout=10.0, in_flight=rnd.choice([1, 2, 3]))
    ended: list[str] = []

    async def post(n: int) -> None:
        await trio.sleep(rnd.random() * 30)
        body = f"body{n}".encode()
        with trio.move_on_after(rnd.choice([0.001, 1, 5, 10, 100])):
            try:
                reply = await coalescer.post(rnd.choice(["u1", "u2"]), f"l{n}", "rotate", body)
                assert reply.body == body[::-1]
            except TransportError:
                pass
        if body in settled and trio.lowlevel.current_task() not in carriers:
            # it returned when its answer or failure came, not at its caller's deadline
            assert trio.current_time() == settled[body]
        ended.append(f"l{n}")

    with trio.fail_after(600):
        async with trio.open_nursery() as outer:
            running = trio.CancelScope()

            async def run(task_status: trio.TaskStatus[None]) -> None:
                with running:
                    await coalescer.run(task_status=task_status)

            if seed % 2:
                await outer.start(run)
            async with trio.open_nursery() as posts:
                for n in range(200):
                    posts.start_soon(post, n)
                if seed % 4 == 1:
                    await trio.sleep(15)
                    running.cancel()  # the agent stops the client's task midway
            running.cancel()
    assert len(ended) == 200
    for peer in coalescer._peers.values():
        assert not peer.queue and len(peer.places) == 0
