"""Fuzz target for everything the hub and the client parse from the peer.

`target(data)` feeds the bytes to each parser (the first byte picks which), the batch
extension's included (`batchwire`: a batch of posts or fetches on the hub, their answers and
the probe's on the client); a parser may only refuse with `WireError`. Run it with atheris or
the core's `contrib/fuzz/engine.py`:

    python3 plugins/qkdagent-dske/fuzz/fuzz_dske_wire.py [seconds]
"""

from __future__ import annotations

import sys

from qkdagent_dske import batchwire, wire

from qkdagent.testing import mutation_loop, selecting_target

PARSERS = (
    lambda d: wire.parse_signature(d),
    lambda d: wire.parse_allocation_text(d.decode("latin-1")),
    wire.parse_share_post,
    wire.parse_share_reply,
    wire.parse_registration,
    wire.parse_hub_name,
    lambda d: wire.parse_psrd_block(d, limit=4096),
    lambda d: wire.parse_allocation_json(wire.load_json(d)),
    batchwire.parse_post_batch,
    batchwire.parse_fetch_batch,
    lambda d: batchwire.parse_post_results(d, 2),
    lambda d: batchwire.parse_fetch_results(d, ["k1", "k2"]),
    batchwire.parse_capabilities,
)

_PAD = wire.Allocation((wire.Fragment("4f3c7b1e-2a8d-4c6e-9b0f-1d2e3f405162", 32, 4),))
_POST = wire.SharePost("carol", "carol", "conny", "k1", 0, _PAD, b"abcd").encode()
_REPLY = wire.ShareReply(3, _PAD, b"abcd")

SEEDS = (
    b"\x00" + b"4f3c7b1e-2a8d-4c6e-9b0f-1d2e3f405162:0:32%" + b"A" * 43 + b"=",
    b"\x02"
    + wire.SharePost(
        "carol",
        "carol",
        "conny",
        "k1",
        0,
        wire.Allocation((wire.Fragment("4f3c7b1e-2a8d-4c6e-9b0f-1d2e3f405162", 32, 4),)),
        b"abcd",
    ).encode(),
    b"\x08" + batchwire.encode_post_batch("carol", [_POST, b"{}"]),
    b"\x09" + batchwire.encode_fetch_batch("conny", ["k1", "k2"]),
    b"\x0a" + b'{"results":[{"status":200},{"status":409,"detail":"reuses PSRD"}]}',
    b"\x0b"
    + batchwire.encode_fetch_results(
        [
            batchwire.FetchResult("k1", batchwire.ItemResult(200), _REPLY),
            batchwire.FetchResult("k2", batchwire.ItemResult(404, "no share")),
        ]
    ),
    b"\x0c" + batchwire.encode_capabilities(128),
)


target = selecting_target(PARSERS, [(wire.WireError,)] * len(PARSERS))


def main(seconds: float) -> None:
    mutation_loop(target, SEEDS, seconds, selectors=len(PARSERS))


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 10.0)
