"""The batch extension to dske-python's wire format: many share posts or fetches per request.

Our own extension (dske-python has one request per share): a hub that serves it answers the
probe `GET .../dske/api/v1/key-shares` with `{"max_items": N}`; a dske-python hub answers 404
(an unknown route), and its clients never call these paths. Each batch is one request signed
with `DSKE-Signature` exactly as a single request (MAC over b"" then the body, client-owned
PSRD) and one answer signed as a single answer (hub-owned PSRD), with a result per item in
the order asked:

- `POST .../dske/api/v1/key-shares` `{"client_name", "shares": [<share POST body>, ...]}` →
  `{"results": [{"status": 200} | {"status": 4xx/5xx, "detail"}, ...]}`
- `POST .../dske/api/v1/key-shares-fetch` `{"client_name", "key_ids": [...]}` →
  `{"shares": [{"key_id", "status": 200, <share GET answer fields>} | {"key_id", "status",
  "detail"}, ...]}`

Pure: bytes in, typed values or `WireError` out. An item that does not parse is that item's
failure (its result says why), never the whole batch's; a body that is not a batch is.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import wire
from .wire import WireError

MAX_ITEMS = 128
"""Items per batch; with 32-byte keys a full batch is about 57 KB, under `wire.MAX_BODY`."""
POST_PATH = "api/v1/key-shares"
FETCH_PATH = "api/v1/key-shares-fetch"
MAX_DETAIL = 200


def encode_capabilities(max_items: int) -> bytes:
    return wire.dump_json({"max_items": max_items})


def parse_capabilities(body: bytes) -> int:
    """The probe's answer: the hub's largest batch (capped at ours)."""
    obj = wire.json_object(wire.load_json(body), {"max_items"})
    value = obj["max_items"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise WireError("max_items must be a positive integer")
    return min(value, MAX_ITEMS)


def _items(value: object, what: str) -> list[object]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_ITEMS:
        raise WireError(f"{what} must be a list of 1..{MAX_ITEMS} items")
    return value


@dataclass(frozen=True)
class ItemResult:
    status: int
    detail: str = ""

    def to_json(self) -> dict[str, object]:
        if self.status == 200:
            return {"status": 200}
        return {"status": self.status, "detail": self.detail[:MAX_DETAIL]}


def _result_from(value: object, extra: frozenset[str] = frozenset()) -> ItemResult:
    if not isinstance(value, dict):
        raise WireError("a batch result is a JSON object")
    status = value.get("status")
    if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
        raise WireError("a batch result's status is an HTTP status")
    if status == 200:
        return ItemResult(200)
    obj = wire.json_object(value, {"status", "detail"}, extra)
    detail = obj["detail"]
    if not isinstance(detail, str) or len(detail) > MAX_DETAIL:
        raise WireError(f"a batch result's detail is a string of at most {MAX_DETAIL}")
    return ItemResult(status, detail)


# -- share posts ----------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class PostBatch:
    client_name: str
    shares: tuple[wire.SharePost | WireError, ...]
    """Each item parsed, or why it does not parse (that item's 400)."""

    def __repr__(self) -> str:
        return f"<PostBatch {self.client_name} {len(self.shares)} items>"


def encode_post_batch(client_name: str, bodies: list[bytes]) -> bytes:
    """The batch body from items already encoded as single share POST bodies."""
    head = wire.dump_json(client_name)
    return b'{"client_name":' + head + b',"shares":[' + b",".join(bodies) + b"]}"


def parse_post_batch(body: bytes) -> PostBatch:
    obj = wire.json_object(wire.load_json(body), {"client_name", "shares"})
    client = wire.name(obj["client_name"], "client_name")
    shares: list[wire.SharePost | WireError] = []
    for item in _items(obj["shares"], "shares"):
        try:
            shares.append(wire.share_post_from(item))
        except WireError as exc:
            shares.append(exc)
    return PostBatch(client, tuple(shares))


def encode_post_results(results: list[ItemResult]) -> bytes:
    return wire.dump_json({"results": [r.to_json() for r in results]})


def parse_post_results(body: bytes, count: int) -> list[ItemResult]:
    """The answer to a batch of `count` posts: one result per item, in order."""
    obj = wire.json_object(wire.load_json(body), {"results"})
    items = obj["results"]
    if not isinstance(items, list) or len(items) != count:
        raise WireError("the answer has not one result per share")
    results = [_result_from(item) for item in items]
    if any(r.status == 200 and len(i) != 1 for r, i in zip(results, items, strict=True)):
        raise WireError('a share taken is {"status": 200}')
    return results


# -- share fetches --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchBatch:
    client_name: str
    key_ids: tuple[str | WireError, ...]


def encode_fetch_batch(client_name: str, key_ids: list[str]) -> bytes:
    return wire.dump_json({"client_name": client_name, "key_ids": key_ids})


def parse_fetch_batch(body: bytes) -> FetchBatch:
    obj = wire.json_object(wire.load_json(body), {"client_name", "key_ids"})
    client = wire.name(obj["client_name"], "client_name")
    key_ids: list[str | WireError] = []
    for item in _items(obj["key_ids"], "key_ids"):
        try:
            key_ids.append(wire.key_id(item))
        except WireError as exc:
            key_ids.append(exc)
    return FetchBatch(client, tuple(key_ids))


@dataclass(frozen=True, repr=False)
class FetchResult:
    key_id: str
    result: ItemResult
    share: wire.ShareReply | None = None
    """The share (encrypted under hub-owned PSRD) when `result.status` is 200."""

    def __repr__(self) -> str:
        return f"<FetchResult {self.key_id} {self.result.status}>"

    def encode(self) -> bytes:
        head = b'{"key_id":' + wire.dump_json(self.key_id)
        if self.share is None:
            return head + b"," + wire.dump_json(self.result.to_json())[1:]
        return head + b',"status":200,' + self.share.json_fields().encode("ascii") + b"}"


def encode_fetch_results(results: list[FetchResult]) -> bytes:
    return b'{"shares":[' + b",".join(r.encode() for r in results) + b"]}"


def parse_fetch_results(body: bytes, asked: list[str]) -> list[FetchResult]:
    """The answer to a fetch of `asked`: one result per key ID, in the order asked."""
    obj = wire.json_object(wire.load_json(body), {"shares"})
    items = obj["shares"]
    if not isinstance(items, list) or len(items) != len(asked):
        raise WireError("the answer has not one result per key ID")
    out = []
    for key_id, item in zip(asked, items, strict=True):
        if not isinstance(item, dict) or item.get("key_id") != key_id:
            raise WireError("the answer's key IDs are not the ones asked, in order")
        result = _result_from(item, frozenset({"key_id"}))
        share = None
        if result.status == 200:
            share = wire.share_reply_from(item, frozenset({"key_id", "status"}))
        out.append(FetchResult(key_id, result, share))
    return out
