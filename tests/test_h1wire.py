"""`h1wire`: request heads only from checkable parts, replies parsed by llhttp with this
client's bounds; fed whole or in any pieces, a reply parses the same, or fails with
`BadHttp` and nothing else (a fuzz target: the hostile-server side is test_h1client_fuzz.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdagent.h1wire import (
    FRAMING,
    MAX_INFORMATIONAL,
    OVERHEAD_SLACK,
    BadHttp,
    HeadTooLarge,
    ReplyParser,
    caller_header,
    check_header,
    request_head,
)
from qkdagent.testing.h1 import mutated_pieces

OK = b'HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n{"a":1}'
CHUNKED = b'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\n{"a\r\n4\r\n":1}\r\n0\r\n\r\n'


class Outcome:
    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.heads = 0

    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status, self.headers, self.heads = status, headers, self.heads + 1

    def piece(self, data: bytes) -> None:
        self.body += data


def parse(pieces: list[bytes], *, eof: bool = False, max_head: int = 4096):
    out = Outcome()
    parser = ReplyParser(out.head, out.piece, max_head=max_head)
    for piece in pieces:
        parser.feed(piece)
    if eof and not parser.done:
        parser.eof()
    return out, parser


def test_a_reply_with_a_length_or_chunked_is_complete_and_reusable() -> None:
    for reply in (OK, CHUNKED):
        out, parser = parse([reply])
        assert (out.status, out.body, parser.done, parser.reusable) == (200, b'{"a":1}', True, True)


def test_an_informational_reply_is_skipped_and_many_refused() -> None:
    out, _ = parse([b"HTTP/1.1 100 Continue\r\nx: y\r\n\r\n" + OK])
    assert (out.status, out.heads, out.headers[0]) == (200, 1, (b"content-length", b"7"))
    flood = b"HTTP/1.1 100 Continue\r\n\r\n" * (MAX_INFORMATIONAL + 1) + OK
    with pytest.raises(BadHttp, match="informational"):
        parse([flood])
    out, parser = parse([b"HTTP/1.1 100 Continue\r\n\r\n" * MAX_INFORMATIONAL + OK])
    assert (out.status, out.body, parser.done) == (200, b'{"a":1}', True)  # up to the bound


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n",
            "switches protocols",
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            "transfer-encoding",
        ),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc", "malformed"),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n",
            "malformed",
        ),
        (b"HTTP/1.1 200 OK\r\nx: a\r\n b\r\ncontent-length: 0\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\nx: a\rb\r\ncontent-length: 0\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999999\r\n\r\n", "malformed"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "malformed"),
        (b"HTTP/1.1 000 X\r\ncontent-length: 2\r\n\r\nok" + OK, "status 000"),
    ],
)
def test_what_llhttp_and_this_client_refuse(reply: bytes, match: str) -> None:
    with pytest.raises(BadHttp, match=match):
        parse([reply])


def test_a_head_over_its_bound_is_refused_before_it_completes() -> None:
    with pytest.raises(HeadTooLarge):
        parse([b"HTTP/1.1 200 OK\r\nx: " + b"a" * 5000], max_head=4096)
    out, _ = parse([b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n" + b"b" * 5000], max_head=64)
    assert len(out.body) == 5000  # the body does not count towards the head


@pytest.mark.parametrize(
    "framing",
    [
        b"0\r\nx-trailer: " + b"a" * 150_000,  # a trailer's value, dripped
        b"0\r\n" + b"x-t: a\r\n" * 20000,  # many trailer fields
        b"1;" + b"e" * 200_000,  # a chunk extension
    ],
)
def test_what_is_not_body_is_bounded_after_the_head_too(framing: bytes) -> None:
    """llhttp bounds neither trailers nor chunk extensions, and joins a trailer's value across
    reads: a server dripping one would hold memory and CPU (first review of issue 18)."""
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    pieces = [head] + [framing[at : at + 4096] for at in range(0, len(framing), 4096)]
    with pytest.raises(BadHttp, match="framing"):
        parse(pieces, max_head=4096)
    assert len(framing) > 4096 + OVERHEAD_SLACK


@pytest.mark.parametrize("size", [b"1", b"00000001"])
def test_many_small_chunks_are_no_framing_excess(size: bytes) -> None:
    """Chunk lines of an honest reply, zero-padded sizes too, stay within the per-piece
    allowance however many (here far past what the slack alone would cover)."""
    count = 20_000
    body = b"".join(size + b"\r\n%c\r\n" % (65 + n % 26) for n in range(count))
    reply = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n"
    out, parser = parse([reply[at : at + 1000] for at in range(0, len(reply), 1000)])
    assert len(out.body) == count and parser.done


def test_bytes_after_the_reply_make_the_connection_not_reusable() -> None:
    _, parser = parse([OK + b"HTTP/1.1 200 OK\r\n"])
    assert parser.done and not parser.reusable
    _, parser = parse([OK, b"x"])
    assert parser.done and not parser.reusable
    _, parser = parse([OK + b"\x00"])  # what llhttp refuses after the reply is no error of it
    assert parser.done and not parser.reusable


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok",
    ],
)
def test_a_reply_that_ends_its_connection_is_not_reused(reply: bytes) -> None:
    out, parser = parse([reply])
    assert out.body == b"ok" and parser.done and not parser.reusable


def test_a_body_ended_by_the_close_is_complete_at_eof_and_only_then() -> None:
    out, parser = parse([b"HTTP/1.1 200 OK\r\n\r\nab", b"c"], eof=True)
    assert (out.body, parser.done, parser.reusable) == (b"abc", True, False)
    for cut in (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab", b"HTTP/1.1 200 OK\r\n"):
        with pytest.raises(BadHttp, match="closed before the end"):
            parse([cut], eof=True)
    out, parser = parse([b"HTTP/1.1 204 No Content\r\n\r\n"])
    assert parser.done and parser.reusable and out.body == b""


def test_what_the_callbacks_raise_ends_the_parse() -> None:
    class Over(Exception):
        pass

    def piece(data: bytes) -> None:
        raise Over

    parser = ReplyParser(lambda status, headers: None, piece, max_head=4096)
    with pytest.raises(Over):
        parser.feed(OK)


@pytest.mark.parametrize(
    ("method", "target", "header"),
    [
        ("GET", "/a b", (b"x", b"y")),
        ("GET", "/a\r\nx: y", (b"x", b"y")),
        ("G ET", "/a", (b"x", b"y")),
        ("HEAD", "/a", (b"x", b"y")),
        ("head", "/a", (b"x", b"y")),
        ("CONNECT", "/a", (b"x", b"y")),
        ("GET", "/\u00e9", (b"x", b"y")),
    ],
)
def test_a_request_head_that_could_split_is_refused(
    method: str, target: str, header: tuple[bytes, bytes]
) -> None:
    with pytest.raises(ValueError, match="cannot be sent|'ascii' codec"):
        request_head(method, target, [check_header(*header)])


@pytest.mark.parametrize(
    ("name", "value"),
    [(b"x", b"a\r\nb: c"), (b"x y", b"a"), (b"x", b"\x00"), (b"x", b" a"), (b"", b"a")],
)
def test_a_header_that_could_split_is_refused(name: bytes, value: bytes) -> None:
    with pytest.raises(ValueError, match="not a header name|cannot be sent"):
        check_header(name, value)


@pytest.mark.parametrize("name", sorted(FRAMING))
def test_a_caller_cannot_frame_the_request(name: bytes) -> None:
    """The client writes content-length (from the body it sends) and host itself: a caller's
    could make the server read a second request out of the body (first review)."""
    with pytest.raises(ValueError, match="client's to write"):
        caller_header(name.upper(), b"0")
    assert caller_header(b"Content-Type", b"application/json") == (
        b"content-type",
        b"application/json",
    )


def test_a_request_head_is_written_as_given() -> None:
    head = request_head("POST", "/v1/x?y=1", [check_header(b"Host", b"a:1"), (b"k", b"")])
    assert head == b"POST /v1/x?y=1 HTTP/1.1\r\nhost: a:1\r\nk: \r\n\r\n"


SEEDS = [
    OK,
    CHUNKED,
    b"HTTP/1.1 100 Continue\r\n\r\n" + OK,
    b"HTTP/1.1 200 OK\r\n\r\nclose-delimited",
    b"HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\nx-a: b\r\n\r\nnot",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2;e=1\r\nab\r\n0\r\nt: x\r\n\r\n",
]


def _outcome(pieces: list[bytes]) -> tuple[object, ...]:
    try:
        out, parser = parse(pieces, eof=True)
    except BadHttp as exc:
        return ("error", type(exc))
    return (out.status, out.headers, out.body, parser.done, parser.reusable)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fuzz_a_reply_parses_the_same_in_any_pieces(data: st.DataObject) -> None:
    """(Short replies: a head longer than `max_head` that comes whole in one read is taken,
    in pieces refused, by design: the bound is on what an incomplete head makes us hold.)"""
    whole, pieces = mutated_pieces(data, SEEDS)
    assert _outcome(pieces) == _outcome([whole])


def test_the_client_refuses_a_framing_header_before_connecting() -> None:
    """`HttpClient.request` refuses it with a `TransportError` (nothing is connected or sent:
    the port here has no server)."""
    import trio

    from qkdagent import HttpClient, TransportError

    async def main() -> None:
        client = HttpClient(None, plain_http=True)
        with pytest.raises(TransportError, match="cannot be sent"):
            await client.request("POST", "http://127.0.0.1:9", "/x", b"body",
                                 headers=[("Content-Length", "0")], limit=64)  # fmt: skip
        with pytest.raises(ValueError, match="client's to write"):
            HttpClient(None, plain_http=True, headers=[("transfer-encoding", "chunked")])

    trio.run(main)
