"""Valid peer messages for the peer-message targets, built with the protocol module's own
`build` from its field table, so the seeds follow the protocol as it changes."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import strategies as st

from qkdagent import protocol
from qkdagent.secret import Secret

NESTED = b"[" * 5000
"""Issue 11 defect 1: deep nesting made `json.loads` raise RecursionError."""

_SAMPLES: dict[str, Any] = {
    "keys": [["sim", "00000000-0000-4000-8000-0000000000aa"], ["qkd", "k-2"]],
    "labels": ["wg0"],
    "nonce": b"\x01" * 32,
    "request_nonce": b"\x02" * 32,
    "confirm": b"\x03" * 32,
}


def fields_of(kind: str) -> set[str]:
    return set(protocol._FIELDS[kind])


def message(kind: str, *, epoch: int = 7, **override: Any) -> bytes:
    extra = {name: override.get(name, _SAMPLES.get(name, "x")) for name in fields_of(kind)}
    return protocol.build(
        kind,
        link="alice-bob",
        sender="alice",
        receiver="bob",
        epoch=epoch,
        auth_key=Secret(os.urandom(32)),
        **extra,
    )


def seeds(kinds: tuple[str, ...]) -> list[bytes]:
    result = [message(kind) for kind in kinds]
    result += [message(kinds[0], epoch=protocol.MAX_EPOCH - 1), NESTED, b"{}", b"[]", b'""']
    return result


_names = st.text(min_size=0, max_size=140)
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=80)
)
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)


def strategy(kinds: tuple[str, ...]) -> st.SearchStrategy[bytes]:
    """Messages with every field drawn from plausible values or arbitrary JSON, and fields
    dropped or added: structurally close to valid, so the parser's later checks are reached."""
    import json

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        kind = draw(st.sampled_from(kinds))
        good = json.loads(message(kind, epoch=draw(st.integers(1, 2**62 + 2))))
        for name in sorted(good):
            if draw(st.integers(0, 9)) == 0:
                good[name] = draw(_json)
            elif draw(st.integers(0, 19)) == 0:
                del good[name]
        if draw(st.integers(0, 9)) == 0:
            good[draw(st.text(max_size=8))] = draw(_json)
        if "keys" in good and draw(st.booleans()):
            good["keys"] = draw(st.lists(st.lists(_names, min_size=0, max_size=3), max_size=18))
        for name in ("link", "from", "to"):
            if draw(st.integers(0, 4)) == 0:
                good[name] = draw(_names)
        text = json.dumps(good, ensure_ascii=draw(st.booleans()))
        return text.encode("utf-8", "surrogatepass")

    return st.one_of(build(), st.binary(max_size=300), st.just(NESTED))
