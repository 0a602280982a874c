"""Batch containers (`batchwire`, issue 18): a request as the peer server decodes it, and a
reply as the client decodes it, whole and streamed in pieces. Only ProtocolError may come out;
a request that decodes encodes back to the same bytes, and a reply's answers survive being
encoded again (a streamed reply's order is the server's, so its bytes need not).

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
    batchwire.reply_head(3)
    + b"".join(batchwire.encode_answer(i, batchwire.Answer(200, b"{}")) for i in (2, 0, 1)),
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
        assert batchwire.decode_reply(batchwire.encode_reply(answers), count) == answers
    # as the client reads a streamed reply: in pieces, answers in any order
    reader = batchwire.ReplyReader(3)
    try:
        half = len(data) // 2
        got = dict(reader.feed(data[:half]) + reader.feed(data[half:]))
        reader.finish()
    except ProtocolError:
        return
    assert sorted(got) == [0, 1, 2]
