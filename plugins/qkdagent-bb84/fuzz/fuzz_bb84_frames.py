"""Fuzz target for what a bb84 responder parses from the peer before any HMAC check.

`target(data)` feeds the bytes to a parser (the first byte picks which): a whole frame, a frame
header, a frame body, a `block.start` payload. A parser may only refuse with `FrameError`. Run it
with atheris or on its own (random mutations of valid frames):

    python3 plugins/qkdagent-bb84/fuzz/fuzz_bb84_frames.py [seconds]
"""

from __future__ import annotations

import sys

from qkdagent.testing import mutation_loop, selecting_target

from qkdagent_bb84 import frames

PARSERS = (
    frames.parse_frame,
    lambda d: frames.body_length(d[: frames.HEADER]),
    frames.parse_body,
    frames.parse_block_start,
)

_START = frames.encode_block_start(
    frames.BlockStart("0a1b2c3d-7", bytes(16), 1000, 20, b"\x55\xaa\x0f", b"\x01\x02\x03")
)
SEEDS = (
    b"\x00" + frames.encode_frame("sift.bases", b"\x01\x02\x03", bytes(32)),
    b"\x00" + frames.encode_frame("block.start", _START, bytes(32)),
    b"\x01" + frames.encode_frame("ping", b"", bytes(32))[:4],
    b"\x02" + frames.encode_frame("pa.seed", bytes(12), bytes(32))[4:],
    b"\x03" + _START,
)


target = selecting_target(PARSERS, [(frames.FrameError,)] * len(PARSERS))


def main(seconds: float) -> None:
    mutation_loop(target, SEEDS, seconds, selectors=len(PARSERS), truncate=0.2)


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 10.0)
