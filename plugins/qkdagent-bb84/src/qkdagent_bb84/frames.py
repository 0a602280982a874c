"""The wire format of the classical channel between two processes (pure: bytes in and out).

A frame is a 4-byte big-endian length, then the body: one byte naming the message kind (a fixed
table, so a kind is never a string from the peer), the payload, and the 32-byte HMAC tag the
engine's channel computes (`channel.py`). A length outside [MIN_BODY, MAX_FRAME] is refused from
the header alone, before any buffer for the body exists. `block.start` opens a block: its payload
names the block (the HMAC key of the block derives from that name, so the name is read before the
tag can be checked) and carries Bob's detection record, the simulation shortcut that stands in
for the quantum channel (see README). Every parse error is a `FrameError`, never anything else.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

from .channel import TAG_BYTES, AuthError

KINDS = (
    "block.start",
    "sift.bases",
    "sift.match",
    "sample.alice",
    "sample.bob",
    "cascade.parities",
    "cascade.bisect",
    "cascade.answer",
    "cascade.direction",
    "verify.tag",
    "verify.result",
    "pa.seed",
    "block.stored",
    "ping",
)
_CODE = {kind: i for i, kind in enumerate(KINDS)}
HEADER = 4
MIN_BODY = 1 + TAG_BYTES
MAX_FRAME = 1 << 25
"""32 MiB: the largest message is the sifting reply, 1.25 bytes per detection; a block of the
largest `block_bits` (4e6) has about 1e7 detections."""
FINGERPRINT = 16
BLOCK_ID = re.compile(rb"^[0-9a-f]{8}-[0-9]{1,12}$")
_START = struct.Struct(">B16sQI")  # block ID length, settings fingerprint, pulses, detections


class FrameError(AuthError):
    """A frame that is not one this protocol sends: the block aborts, the connection closes."""


@dataclass(frozen=True)
class Frame:
    kind: str
    payload: bytes = field(repr=False)
    tag: bytes = field(repr=False)


def encode_frame(kind: str, payload: bytes, tag: bytes) -> bytes:
    body = len(payload) + MIN_BODY
    if body > MAX_FRAME or len(tag) != TAG_BYTES:
        raise ValueError("frame too large or bad tag")
    return body.to_bytes(HEADER, "big") + bytes((_CODE[kind],)) + payload + tag


def body_length(header: bytes, limit: int = MAX_FRAME) -> int:
    """The body length a frame header announces; refused unless MIN_BODY <= length <= limit."""
    if len(header) != HEADER:
        raise FrameError("truncated frame header")
    length = int.from_bytes(header, "big")
    if not MIN_BODY <= length <= min(limit, MAX_FRAME):
        raise FrameError(f"frame of {length} bytes refused")
    return length


def parse_body(body: bytes) -> Frame:
    if not MIN_BODY <= len(body) <= MAX_FRAME:
        raise FrameError("frame body of a bad length")
    if body[0] >= len(KINDS):
        raise FrameError("unknown message kind")
    return Frame(KINDS[body[0]], body[1:-TAG_BYTES], body[-TAG_BYTES:])


def parse_frame(data: bytes, limit: int = MAX_FRAME) -> Frame:
    """One whole frame (header and body), nothing before or after it."""
    length = body_length(data[:HEADER], limit)
    if len(data) != HEADER + length:
        raise FrameError("frame length does not match its header")
    return parse_body(data[HEADER:])


@dataclass(frozen=True)
class BlockStart:
    """What Alice's `block.start` says: the block, the settings she runs, Bob's detections."""

    block_id: str
    fingerprint: bytes
    pulses: int
    count: int
    b_basis: bytes = field(repr=False)
    b_bit: bytes = field(repr=False)


def encode_block_start(start: BlockStart) -> bytes:
    name = start.block_id.encode()
    head = _START.pack(len(name), start.fingerprint, start.pulses, start.count)
    return head + name + start.b_basis + start.b_bit


def parse_block_start(payload: bytes) -> BlockStart:
    """The header and Bob's record; every length checked against the others."""
    if len(payload) < _START.size:
        raise FrameError("truncated block.start")
    size, fingerprint, pulses, count = _START.unpack_from(payload)
    name = payload[_START.size : _START.size + size]
    if len(name) != size or not BLOCK_ID.match(name):
        raise FrameError("block.start names no valid block")
    packed = (count + 7) // 8
    record = payload[_START.size + size :]
    if len(record) != 2 * packed or pulses < count:
        raise FrameError("block.start record does not match its counts")
    return BlockStart(name.decode(), fingerprint, pulses, count, record[:packed], record[packed:])
