"""The peer API's batch container (issue 18): several links' requests to one peer in one HTTP
request, and their answers in one reply. Pure, no I/O.

An item is exactly what a lone `POST /v1/links/<link>/<action>` carries: the link's name, the
action and the MAC'd body, unchanged. The container adds no authority: the server hands each
item to the same handler, with the same client certificate, as if it had come alone, and each
answer is the status and body that request would have had. So a batch changes what a request
costs, never what it means.

Hand-written, because no library frames a few length-prefixed byte strings more simply than
`struct` does, and a JSON container would escape every body and parse it twice. Layout
(integers big-endian):

    request: b"QKB1" | count u16 | count x item
             item: action u8 | name length u8 | name | body length u32 | body
    reply:   b"QKR1" | count u16 | count x answer, each as soon as it is ready
             answer: index u16 | status u16 | body length u32 | body

`action` indexes `ACTIONS`; names are ASCII (a link name is at most 64 characters, so 255 is
ample); `index` is the item's place in the request, and each is answered exactly once. The
reply is streamed (chunked), so an item that takes long holds up no other item's answer.
Every length is checked against what is left before anything is sliced: a decoder never reads
past the end, holds at most one answer beyond its input, and raises `ProtocolError` for any
defect.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ProtocolError
from .protocol import MAX_BODY

ACTIONS = ("rotate", "commit", "resync", "announce")
REQUEST_MAGIC = b"QKB1"
REPLY_MAGIC = b"QKR1"
MAX_ITEMS = 64
"""Items in one batch (a peer's default `max_parallel_rotations`)."""
MAX_BATCH = 512 * 1024
"""Largest batch request (a client stops adding items before a request would pass it)."""

_COUNT = struct.Struct(">H")
_REQUEST_ITEM = struct.Struct(">BB")
_LENGTH = struct.Struct(">I")
_ANSWER = struct.Struct(">HHI")
_ACTION_CODES = {name: code for code, name in enumerate(ACTIONS)}


@dataclass(frozen=True)
class Item:
    link: str
    action: str
    body: bytes

    def __repr__(self) -> str:  # bodies are MAC'd messages: their size is enough to show
        return f"Item({self.link!r}, {self.action!r}, {len(self.body)} bytes)"


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes

    def __repr__(self) -> str:
        return f"Answer({self.status}, {len(self.body)} bytes)"


def item_size(item: Item) -> int:
    """What `item` adds to an encoded request."""
    return _REQUEST_ITEM.size + len(item.link) + _LENGTH.size + len(item.body)


def empty_request_size() -> int:
    return len(REQUEST_MAGIC) + _COUNT.size


def encode_request(items: Sequence[Item]) -> bytes:
    if not 0 < len(items) <= MAX_ITEMS:
        raise ValueError(f"a batch has 1-{MAX_ITEMS} items, not {len(items)}")
    parts = [REQUEST_MAGIC, _COUNT.pack(len(items))]
    for item in items:
        name = item.link.encode("ascii")
        if not 0 < len(name) <= 255 or len(item.body) > MAX_BODY:
            raise ValueError("a batch item's name or body is out of bounds")
        parts += [
            _REQUEST_ITEM.pack(_ACTION_CODES[item.action], len(name)),
            name,
            _LENGTH.pack(len(item.body)),
            item.body,
        ]
    data = b"".join(parts)
    if len(data) > MAX_BATCH:
        raise ValueError(f"a batch of {len(data)} bytes is over {MAX_BATCH}")
    return data


def decode_request(data: bytes) -> list[Item]:
    """The items of a batch request; `ProtocolError` (400, or 413 over `MAX_BATCH`)."""
    count, at = _header(data, REQUEST_MAGIC, "batch")
    items: list[Item] = []
    for _ in range(count):
        code, size = _unpack(_REQUEST_ITEM, data, at)
        at += _REQUEST_ITEM.size
        if code >= len(ACTIONS):
            raise ProtocolError("batch item with an unknown action")
        if size == 0:
            raise ProtocolError("batch item with an empty link name")
        raw = _take(data, at, size)
        at += size
        name = raw.decode("ascii", "replace")
        if not raw.isascii() or not name.isprintable():
            raise ProtocolError("batch item with a link name that is not printable ASCII")
        (length,) = _unpack(_LENGTH, data, at)
        at += _LENGTH.size
        if length > MAX_BODY:
            raise ProtocolError(f"batch item body over {MAX_BODY} bytes", status=413)
        body = _take(data, at, length)
        at += length
        items.append(Item(name, ACTIONS[code], body))
    _end(data, at, "batch")
    return items


def reply_head(count: int) -> bytes:
    return REPLY_MAGIC + _COUNT.pack(count)


def encode_answer(index: int, answer: Answer) -> bytes:
    return _ANSWER.pack(index, answer.status, len(answer.body)) + answer.body


def reply_limit(count: int) -> int:
    """The most bytes an honest reply to `count` items can hold."""
    return len(REPLY_MAGIC) + _COUNT.size + count * (_ANSWER.size + MAX_BODY)


def encode_reply(answers: Sequence[Answer]) -> bytes:
    """A whole reply, answers in order (the server streams them as they come instead)."""
    parts = [reply_head(len(answers))]
    parts += [encode_answer(index, answer) for index, answer in enumerate(answers)]
    return b"".join(parts)


class ReplyReader:
    """Reads a streamed batch reply to `count` items as it arrives: `feed` returns the answers
    completed by each piece, `finish` checks that every item was answered, once."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._buffer = bytearray()
        self._head = False
        self._answered: set[int] = set()

    def feed(self, data: bytes) -> list[tuple[int, Answer]]:
        buffer = self._buffer
        buffer += data
        if not self._head:
            size = len(REPLY_MAGIC) + _COUNT.size
            if len(buffer) < size:
                if not REPLY_MAGIC.startswith(bytes(buffer[: len(REPLY_MAGIC)])):
                    raise ProtocolError("not a batch reply")
                return []
            if buffer[: len(REPLY_MAGIC)] != REPLY_MAGIC:
                raise ProtocolError("not a batch reply")
            (got,) = _COUNT.unpack_from(buffer, len(REPLY_MAGIC))
            if got != self.count:
                raise ProtocolError(f"batch reply has {got} answers for {self.count} requests")
            del buffer[:size]
            self._head = True
        done: list[tuple[int, Answer]] = []
        while len(buffer) >= _ANSWER.size:
            index, status, length = _ANSWER.unpack_from(buffer)
            if index >= self.count or index in self._answered:
                raise ProtocolError("batch reply answers an item it has no answer for")
            if not 100 <= status <= 599:
                raise ProtocolError("batch reply with an invalid status")
            if length > MAX_BODY:
                raise ProtocolError(f"batch answer over {MAX_BODY} bytes")
            if len(buffer) < _ANSWER.size + length:
                break
            body = bytes(buffer[_ANSWER.size : _ANSWER.size + length])
            del buffer[: _ANSWER.size + length]
            self._answered.add(index)
            done.append((index, Answer(status, body)))
        if buffer and len(self._answered) == self.count:
            raise ProtocolError("batch reply has bytes after its last answer")
        return done

    def finish(self) -> None:
        if not self._head or len(self._answered) != self.count or self._buffer:
            raise ProtocolError("batch reply cut short")


def decode_reply(data: bytes, count: int) -> list[Answer]:
    """The answers of a whole batch reply to `count` items, in the items' order;
    `ProtocolError` for any defect."""
    reader = ReplyReader(count)
    answers = dict(reader.feed(data))
    reader.finish()
    return [answers[index] for index in range(count)]


def _header(data: bytes, magic: bytes, what: str) -> tuple[int, int]:
    if len(data) > MAX_BATCH:
        raise ProtocolError(f"{what} larger than {MAX_BATCH} bytes", status=413)
    if data[: len(magic)] != magic:
        raise ProtocolError(f"not a {what}")
    (count,) = _unpack(_COUNT, data, len(magic))
    if not 0 < count <= MAX_ITEMS:
        raise ProtocolError(f"{what} of {count} items (1-{MAX_ITEMS})")
    return count, len(magic) + _COUNT.size


def _unpack(layout: struct.Struct, data: bytes, at: int) -> tuple[int, ...]:
    if at + layout.size > len(data):
        raise ProtocolError("batch cut short")
    return layout.unpack_from(data, at)


def _take(data: bytes, at: int, size: int) -> bytes:
    if at + size > len(data):
        raise ProtocolError("batch cut short")
    return data[at : at + size]


def _end(data: bytes, at: int, what: str) -> None:
    if at != len(data):
        raise ProtocolError(f"{what} has {len(data) - at} bytes after its last item")
