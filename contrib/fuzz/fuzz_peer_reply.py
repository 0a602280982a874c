"""Peer replies as the initiator reads them: the reply message (`protocol.parse`) and, for a
refused request, the refusal (`protocol.parse_refusal` and `verify_refusal`; before refusals were
authenticated, `PeerReply.error_hint`). Only ProtocolError may come out.

Run: python3 contrib/fuzz/run_fuzz.py --target peer_reply
"""

from __future__ import annotations

import os

import peer_seeds

from qkdagent import peering, protocol
from qkdagent.errors import ProtocolError
from qkdagent.secret import Secret

KINDS = ("rotate-reply", "resync-reply", "commit-reply", "announce-reply")
FORMAT = "json"
DICTIONARY = [f'"{kind}"'.encode() for kind in (*KINDS, "refusal", "epoch", "error")]
_KEY = Secret(os.urandom(32))
_REQUEST = peer_seeds.message("rotate")


def _refusals() -> list[bytes]:
    if not hasattr(protocol, "build_refusal"):
        return [b'{"error":"epoch","epoch":4611686018427387901,"message":"x"}']
    return [
        protocol.build_refusal(
            code,
            "refused",
            link="alice-bob",
            sender="bob",
            receiver="alice",
            epoch=7,
            request=protocol.request_digest(_REQUEST),
            bootstrap_auth=_KEY,
        )
        for code in sorted(protocol.REFUSAL_CODES)[:4]
    ]


SEEDS = peer_seeds.seeds(KINDS) + _refusals()
STRATEGY = peer_seeds.strategy(KINDS)


def _refusal(data: bytes) -> None:
    if hasattr(protocol, "parse_refusal"):
        try:
            refusal = protocol.parse_refusal(data)
        except ProtocolError:
            return
        protocol.verify_refusal(
            refusal,
            bootstrap_auth=_KEY,
            link="alice-bob",
            sender="bob",
            receiver="alice",
            request=_REQUEST,
        )
        return
    hint = peering.PeerReply(409, data).error_hint()  # type: ignore[attr-defined,call-arg]
    assert isinstance(hint, dict)


def target(data: bytes) -> None:
    try:
        message = protocol.parse(data, expect=KINDS)
        message.request_nonce  # noqa: B018 - what the initiator compares next
    except ProtocolError:
        pass
    _refusal(data)
