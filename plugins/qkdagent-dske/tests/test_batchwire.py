"""The client's parsers against a hostile hub's batch answers (signed or not, the parser is the
check that each result belongs to the item asked): anything but one well-formed result per
item, in the order asked, is a `WireError`, which fails that hub's batch as a whole."""

from __future__ import annotations

import json
import uuid

import pytest
from qkdagent_dske import batchwire, wire
from qkdagent_dske.batchwire import FetchResult, ItemResult

ASKED = ["k-a", "k-b", "k-c"]


def share(index: int) -> wire.ShareReply:
    pad = wire.Allocation((wire.Fragment(str(uuid.uuid4()), 0, 32),))
    return wire.ShareReply(index, pad, bytes([index]) * 32)


def answer() -> list[FetchResult]:
    return [
        FetchResult("k-a", ItemResult(200), share(1)),
        FetchResult("k-b", ItemResult(404, "no share for this key ID and client")),
        FetchResult("k-c", ItemResult(200), share(2)),
    ]


def items(results: list[FetchResult]) -> list[dict[str, object]]:
    parsed = json.loads(batchwire.encode_fetch_results(results))
    assert isinstance(parsed["shares"], list)
    return parsed["shares"]


def fetch_body(shares: list[dict[str, object]]) -> bytes:
    return json.dumps({"shares": shares}).encode()


def test_a_well_formed_fetch_answer_parses_in_the_order_asked() -> None:
    got = batchwire.parse_fetch_results(batchwire.encode_fetch_results(answer()), ASKED)
    assert [(r.key_id, r.result.status) for r in got] == [("k-a", 200), ("k-b", 404), ("k-c", 200)]
    assert [r.share.share_index for r in got if r.share] == [1, 2]


@pytest.mark.parametrize(
    "hostile",
    [
        pytest.param(lambda s: s[::-1], id="reversed"),
        pytest.param(lambda s: [s[1], s[0], s[2]], id="two-swapped"),
        pytest.param(lambda s: s[:2], id="short"),
        pytest.param(lambda s: [*s, s[0]], id="long"),
        pytest.param(lambda s: [s[0], s[0], s[2]], id="one-key-twice"),
        pytest.param(lambda s: [{**s[0], "key_id": "k-x"}, *s[1:]], id="a-key-not-asked"),
        pytest.param(lambda s: [{"key_id": "k-a", "status": 200}, *s[1:]], id="200-no-share"),
        pytest.param(lambda s: [{**s[0], "status": 404, "detail": ""}, *s[1:]], id="404-share"),
        pytest.param(lambda s: [{**s[0], "status": True}, *s[1:]], id="status-bool"),
        pytest.param(lambda s: [s[0], {**s[1], "status": 700}, s[2]], id="status-range"),
        pytest.param(lambda s: [s[0], {**s[1], "detail": 5}, s[2]], id="detail-not-text"),
        pytest.param(lambda s: [s[0], {**s[1], "extra": 1}, s[2]], id="unknown-field"),
        pytest.param(lambda s: [{**s[0], "share_index": "1"}, *s[1:]], id="index-not-int"),
        pytest.param(lambda s: [s[0], "k-b", s[2]], id="item-not-object"),
    ],
)
def test_hostile_fetch_answers_are_refused(hostile: object) -> None:
    assert callable(hostile)
    with pytest.raises(wire.WireError):
        batchwire.parse_fetch_results(fetch_body(hostile(items(answer()))), ASKED)


@pytest.mark.parametrize(
    "body",
    [
        b'{"results":[{"status":200}]}',  # short
        b'{"results":[{"status":200},{"status":200},{"status":200}]}',  # long
        b'{"results":[{"status":200,"detail":"x"},{"status":200}]}',  # a 200 with more
        b'{"results":[{"status":true},{"status":200}]}',
        b'{"results":[{"status":700,"detail":""},{"status":200}]}',
        b'{"results":[{"status":409},{"status":200}]}',  # a refusal without its detail
        b'{"results":{"0":{"status":200}}}',
        b'{"results":[{"status":200},{"status":200}],"more":1}',
        b"[]",
        b"not json",
    ],
)
def test_hostile_post_answers_are_refused(body: bytes) -> None:
    with pytest.raises(wire.WireError):
        batchwire.parse_post_results(body, 2)


def test_a_well_formed_post_answer_parses() -> None:
    body = batchwire.encode_post_results([ItemResult(200), ItemResult(409, "already held")])
    assert batchwire.parse_post_results(body, 2) == [
        ItemResult(200),
        ItemResult(409, "already held"),
    ]
