"""Batch containers (`batchwire`, issue 18): a request as the peer server decodes it, and a
reply as the client decodes it. Only ProtocolError may come out, and what decodes must encode
back to the same bytes (the format has one encoding per content).

Run: python3 contrib/fuzz/run_fuzz.py --target peer_batch
"""

from __future__ import annotations

import peer_seeds
from hypothesis import strategies as st

from qkdagent import batchwire
from qkdagent.errors import ProtocolError

_BODIES = peer_seeds.seeds(("rotate", "commit"))
SEEDS = [
    batchwire.encode_request(
        [batchwire.Item(f"link{i:05d}", action, body) for i, body in enumerate(_BODIES[:n])]
    )
    for n, action in ((1, "rotate"), (2, "commit"), (len(_BODIES), "announce"))
] + [
    batchwire.encode_reply([batchwire.Answer(200, body) for body in _BODIES[:3]]),
    batchwire.encode_reply([batchwire.Answer(409, b'{"error":"epoch"}')]),
]
DICTIONARY = [batchwire.REQUEST_MAGIC, batchwire.REPLY_MAGIC, b"\x00\x40", b"\xff\xff\xff\xff"]
STRATEGY = st.lists(
    st.tuples(
        st.text("abcxyz-._0123456789", min_size=1, max_size=64),
        st.sampled_from(batchwire.ACTIONS),
        st.binary(max_size=256),
    ),
    min_size=1,
    max_size=8,
).map(lambda items: batchwire.encode_request([batchwire.Item(*item) for item in items]))


def target(data: bytes) -> None:
    try:
        items = batchwire.decode_request(data)
    except ProtocolError:
        pass
    else:
        assert batchwire.encode_request(items) == data
    for count in (1, 3):
        try:
            answers = batchwire.decode_reply(data, count)
        except ProtocolError:
            continue
        assert batchwire.encode_reply(answers) == data
