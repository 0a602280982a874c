"""Peer requests as the responder parses them (`protocol.parse`): only ProtocolError may come out.

Run: python3 contrib/fuzz/run_fuzz.py --target peer_request
"""

from __future__ import annotations

import peer_seeds

from qkdagent import protocol
from qkdagent.errors import ProtocolError

KINDS = ("rotate", "resync", "commit", "announce")
FORMAT = "json"
SEEDS = peer_seeds.seeds(KINDS)
STRATEGY = peer_seeds.strategy(KINDS)
DICTIONARY = [f'"{kind}"'.encode() for kind in (*KINDS, "rotate-reply", "refusal")]


def target(data: bytes) -> None:
    try:
        message = protocol.parse(data, expect=KINDS)
    except ProtocolError:
        return
    # what the responder reads next from a parsed message must hold up too
    message.keys if "keys" in message.fields else message.confirm  # noqa: B018
    message.nonce  # noqa: B018
