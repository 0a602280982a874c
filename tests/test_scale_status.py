"""The /status body at many links: the same document, its links encoded one at a time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from qkdagent.observability import status_json


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
