"""HTTP/1.1 as llhttp parses it for qkdagent: requests as the peer server reads them
(`h1request.RequestReader`) and replies as `HttpClient` reads them (`h1wire.ReplyParser`).
Only `BadRequest` / `BadHttp` may come out, and the bytes fed in pieces (every 1, 7 and 1,000
bytes) give what they give whole: no split changes a parse.

Run: python3 contrib/fuzz/run_fuzz.py --target http
"""

from __future__ import annotations

from hypothesis import strategies as st

from qkdagent.h1wire import BadHttp, ReplyParser
from qkdagent.testing.h1 import request_outcome

MAX_HEAD = 4096
SMALL_HEAD = 48
_BOUNDS = (("error", 431), ("error", 400))
_POST = b"POST /v1/links/a-b/rotate HTTP/1.1\r\nhost: b\r\ncontent-length: 2\r\n\r\n{}"
SEEDS = [
    _POST,
    _POST + _POST,
    b"POST /v1/batch HTTP/1.1\r\nhost: b\r\nexpect: 100-continue\r\ncontent-length: 0\r\n\r\n",
    b"POST / HTTP/1.0\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\nx",
    b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n",
    b'HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n{"a":1}',
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    b"2;e=1\r\nok\r\n0\r\nt: x\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\nclose-delimited",
]
DICTIONARY = [b"\r\n", b"content-length: ", b"transfer-encoding: chunked", b"host: ",
              b"connection: close", b"HTTP/1.1 ", b"HTTP/1.0", b"expect: 100-continue",
              b"upgrade: x", b"0\r\n\r\n"]  # fmt: skip
STRATEGY = st.builds(
    lambda line, headers, body: line + b"".join(headers) + b"\r\n" + body,
    st.sampled_from([b"POST / HTTP/1.1\r\n", b"HTTP/1.1 200 OK\r\n", b"GET /x HTTP/1.0\r\n"]),
    st.lists(st.sampled_from([h + b"\r\n" for h in DICTIONARY if b": " in h]), max_size=5),
    st.binary(max_size=64),
)


def _requests(pieces: list[bytes], max_head: int = MAX_HEAD) -> list[object]:
    out = request_outcome(pieces, max_head)
    if out and isinstance(out[-1], tuple) and out[-1][0] == "error":
        assert out[-1][1] in (400, 431, 505)
    return out


def _reply(pieces: list[bytes]) -> list[object]:
    out: list[object] = []
    body: list[bytes] = []
    parser = ReplyParser(
        lambda status, headers: out.append((status, headers)), body.append, max_head=MAX_HEAD
    )
    try:
        for piece in pieces:
            parser.feed(piece)
        parser.eof()
    except BadHttp as exc:
        out.append(("error", type(exc).__name__))
    return [*out, b"".join(body), parser.done, parser.reusable]


def _pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def target(data: bytes) -> None:
    if len(data) > MAX_HEAD // 2:  # (a head in one piece may exceed what pieces may)
        data = data[: MAX_HEAD // 2]
    whole = [data] if data else []
    requests, reply = _requests(whole), _reply(whole)
    for size in (1, 7, 1000):
        assert _requests(_pieces(data, size)) == requests, size
        assert _reply(_pieces(data, size)) == reply, size
    # With a bound short inputs reach, a split may only move where a bound's refusal (431,
    # or 400 for line ends) cuts in: the events before it are the same.
    outcomes = [
        _requests(pieces, SMALL_HEAD)
        for pieces in (whole, *(_pieces(data, size) for size in (1, 7, SMALL_HEAD, SMALL_HEAD + 1)))
    ]
    longest = max(outcomes, key=len)
    for outcome in outcomes:
        events = outcome[:-1] if outcome and outcome[-1] in _BOUNDS else outcome
        assert longest[: len(events)] == events or events[:-1] == longest[: len(events) - 1]
