"""The /status and /metrics bodies at many links: the same documents, their links encoded one
at a time, the event loop given back between pieces."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families

from qkdagent.observability import (
    SCRAPE_SAMPLES,
    STATUS_LINKS,
    Metrics,
    StatusApp,
    status_body,
    status_json,
)


def test_status_json_encodes_links_from_an_iterator_one_at_a_time() -> None:
    live: list[int] = []

    def links() -> Iterator[dict[str, Any]]:
        for i in range(1000):
            live.append(i)
            yield {"link": f"link{i:04d}", "epoch": i, "erased": None}

    body = status_json({"agent": "alice", "links": links(), "recent": [{"kind": "x"}]})
    document = json.loads(body)
    assert document["agent"] == "alice" and document["recent"] == [{"kind": "x"}]
    assert [x["epoch"] for x in document["links"]] == list(range(1000))
    assert live == list(range(1000))
    assert json.loads(status_json({"links": iter(())})) == {"links": []}


async def _turns_of_another_task_during(work: Any) -> tuple[Any, int]:
    """What `work()` returns, and how many times a task spinning at schedule points ran
    while it was under way (trio runs every runnable task once per pass of the loop)."""
    turns = 0
    done = trio.Event()

    async def spin() -> None:
        nonlocal turns
        while not done.is_set():
            turns += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(spin)
        await trio.lowlevel.checkpoint()  # the spinner is going
        before = turns
        result = await work()
        during = turns - before
        done.set()
    return result, during


async def test_status_body_gives_the_loop_back_every_few_links_and_matches_status_json() -> None:
    def document(count: int, described: list[int]) -> dict[str, Any]:
        def links() -> Iterator[dict[str, Any]]:
            for i in range(count):
                described.append(i)  # each link described when its turn comes
                yield {"link": f"link{i:05d}", "epoch": i}

        return {"agent": "alice", "links": links(), "recent": []}

    count = STATUS_LINKS * 20
    described: list[int] = []
    body, turns = await _turns_of_another_task_during(
        lambda: status_body(document(count, described))
    )
    assert body == status_json(document(count, []))
    assert described == list(range(count))
    assert turns >= 10  # about one per STATUS_LINKS links (in one go: none)


async def test_a_metrics_scrape_gives_the_loop_back_and_writes_what_exposition_writes() -> None:
    metrics = Metrics()
    links = SCRAPE_SAMPLES * 5
    for i in range(links):
        metrics.rotation_done(f"link{i:05d}", i + 1, 0.01)
    body, turns = await _turns_of_another_task_during(metrics.scrape)
    assert body == metrics.exposition()
    assert body.count(b'link="link00000"') >= 2 and f"link{links - 1:05d}".encode() in body
    assert turns >= 15  # rotations, epoch, last success: each in five pieces
    for family in metrics._per_link:
        for part in family.exposition_parts(SCRAPE_SAMPLES):
            samples = [line for line in part.splitlines() if not line.startswith("#")]
            assert len(samples) <= SCRAPE_SAMPLES


async def test_a_link_added_during_a_scrape_does_not_break_it() -> None:
    metrics = Metrics()
    for i in range(SCRAPE_SAMPLES * 3):
        metrics.rotation_done(f"link{i:05d}", 1, 0.01)

    async def scrape_while_links_come_and_go() -> bytes:
        async with trio.open_nursery() as nursery:
            result: list[bytes] = []

            async def scrape() -> None:
                result.append(await metrics.scrape())

            nursery.start_soon(scrape)
            for i in range(50):
                await trio.lowlevel.checkpoint()
                if result:
                    break
                metrics.rotation_done(f"new{i:02d}", 1, 0.01)
                metrics.forget(f"link{i:05d}")
            assert i >= 5  # links came and went while it was being written
        return result[0]

    body = await scrape_while_links_come_and_go()
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    rotations = families["qkdagent_rotations"].samples
    # each family is written from the links it had when its turn came
    assert SCRAPE_SAMPLES * 3 - 50 <= len(rotations) <= SCRAPE_SAMPLES * 3 + 50
    assert len({s.labels["link"] for s in rotations}) == len(rotations)


async def test_concurrent_scrapes_write_one_body_at_a_time() -> None:
    """Each body gives the loop back as it is written, so requests could interleave and each
    hold a whole body: the app writes one at a time, and each gets the whole of its own."""
    metrics = Metrics()
    for i in range(SCRAPE_SAMPLES * 3):
        metrics.rotation_done(f"link{i:05d}", 1, 0.01)
    scrape, writing, most = metrics.scrape, [0], [0]

    async def counted() -> bytes:
        writing[0] += 1
        most[0] = max(most[0], writing[0])
        try:
            return await scrape()
        finally:
            writing[0] -= 1

    metrics.scrape = counted  # type: ignore[method-assign]
    app = StatusApp(lambda: {"links": iter(())}, metrics)
    bodies: list[bytes] = []

    async def get(path: str) -> None:
        sent: list[dict[str, Any]] = []

        async def send(event: dict[str, Any]) -> None:
            sent.append(event)

        await app({"type": "http", "method": "GET", "path": path}, None, send)
        assert sent[0]["status"] == 200
        bodies.append(sent[1]["body"])

    async with trio.open_nursery() as nursery:
        for path in ("/metrics", "/metrics", "/status", "/metrics"):
            nursery.start_soon(get, path)
    assert most == [1] and len(bodies) == 4
    assert sorted(bodies, key=len)[0] == b'{"links": []}\n'
    assert all(body == metrics.exposition() for body in sorted(bodies, key=len)[1:])
