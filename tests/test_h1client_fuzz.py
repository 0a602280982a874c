"""`HttpClient` (h1client.py) against hostile HTTP framing: mutated, truncated, oversized,
chunked, encoded, informational-only and trailing replies from a loopback server. Every reply
is either a `Reply` within the limit or a `TransportError`; nothing else escapes, and a
reused connection never answers with bytes left over from a hostile reply.

The body fuzzing over real TLS is in test_fuzz.py (peer_reply); this is the HTTP layer under it.
"""

from __future__ import annotations

from functools import partial

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkdagent import HttpClient, HttpReply, TransportError

LIMIT = 64
SEEDS = [
    b'HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n{"a":1}',
    b'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n7\r\n{"a":1}\r\n0\r\n\r\n',
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999999\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: " + b"0" * 5000 + b"2\r\n\r\nok",  # int() refuses
    b"HTTP/1.1 200 OK\r\ncontent-length: " + b"9" * 5000 + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nno",
    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 200,
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nffffffffffffffffffff\r\n",
    b"HTTP/1.1 200 OK\r\nx: " + b"a" * 20000 + b"\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"",
]


def _mutate(data: st.DataObject, seed: bytes) -> bytes:
    out = bytearray(seed)
    for _ in range(data.draw(st.integers(0, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        at = data.draw(st.integers(0, len(out)))
        if op == "flip" and out:
            out[min(at, len(out) - 1)] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del out[at:]
        elif op == "insert":
            out[at:at] = data.draw(st.binary(max_size=16))
        elif op == "repeat":
            out[at:at] = out[at : at + data.draw(st.integers(1, 64))] * 8
    return bytes(out)


async def _exchange(reply: bytes) -> tuple[HttpReply | TransportError, HttpReply]:
    """`reply` answers the first request (the server then closes); a well-formed reply
    answers the second, made by the same client."""
    answers = [reply, b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ngood"]

    async def handle(stream: trio.SocketStream) -> None:
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                head += chunk
            await stream.send_all(answers.pop(0))
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()

    client = HttpClient(None, plain_http=True)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        with trio.fail_after(10):
            first: HttpReply | TransportError
            try:
                first = await client.request("GET", url, "/x", limit=LIMIT)
            except TransportError as exc:
                first = exc
            second = await client.request("GET", url, "/y", limit=LIMIT)
        await client.aclose()
        nursery.cancel_scope.cancel()
    return first, second


@settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(st.data())
def test_hostile_reply_framing_is_a_reply_or_a_transport_error(data: st.DataObject) -> None:
    seed = data.draw(st.sampled_from(SEEDS))
    reply = _mutate(data, seed) if data.draw(st.booleans()) else seed
    first, second = trio.run(_exchange, reply)
    if isinstance(first, HttpReply):
        assert 100 <= first.status <= 999 and len(first.body) <= LIMIT
    assert isinstance(second, HttpReply)
    assert (second.status, second.body) == (200, b"good")  # never a leftover of the first


def test_the_seeds_reach_each_outcome() -> None:
    """The seeds are not all refused alike: some are read, some are transport errors."""
    outcomes = [trio.run(_exchange, seed)[0] for seed in SEEDS]
    replies = [o for o in outcomes if isinstance(o, HttpReply)]
    assert [(r.status, r.body) for r in replies[:3]] == [(200, b'{"a":1}')] * 2 + [(200, b"ok")]
    assert sum(isinstance(o, TransportError) for o in outcomes) >= 6
