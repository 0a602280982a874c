"""`h1request`: the peer server's requests parsed with llhttp into events, and its replies
written (the server over TLS is in test_peer_server.py; these are the parser's own bounds)."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdagent.h1request import (
    CLOSED,
    END,
    LAST_CHUNK,
    MAX_HEADERS,
    BadRequest,
    Event,
    Request,
    RequestReader,
    chunk,
    reply_head,
)
from qkdagent.testing.h1 import mutated_pieces, request_outcome

MAX_HEAD = 1024


def post(body: bytes = b"{}", *extra: bytes, version: bytes = b"1.1") -> bytes:
    head = b"POST /v1/links/a/rotate HTTP/" + version + b"\r\nhost: b\r\n"
    head += b"content-length: %d\r\n" % len(body) + b"".join(h + b"\r\n" for h in extra)
    return head + b"\r\n" + body


def drain(reader: RequestReader) -> list[Event]:
    events: list[Event] = []
    while (event := reader.next_event()) is not None:
        events.append(event)
        if event is CLOSED:
            break
    return events


def events_of(*pieces: bytes, eof: bool = False) -> list[Event]:
    reader = RequestReader(max_head=MAX_HEAD)
    events: list[Event] = []
    for piece in pieces:
        reader.feed(piece)
        events += drain(reader)
    if eof:
        reader.eof()
        events += drain(reader)
    return events


def test_a_request_is_its_head_its_body_and_its_end() -> None:
    request, *rest = events_of(post(b'{"a":1}', b"X-Thing:  v  "))
    assert isinstance(request, Request)
    assert (request.method, request.target, request.version) == (b"POST", b"/v1/links/a/rotate",
                                                                 "1.1")  # fmt: skip
    assert request.headers == [(b"host", b"b"), (b"content-length", b"7"), (b"x-thing", b"v")]
    assert request.content_length == 7 and request.framing == "length"
    assert request.keep_alive and not request.expects_continue
    assert rest == [b'{"a":1}', END]


@pytest.mark.parametrize(
    ("extra", "version", "keep_alive"),
    [((), b"1.1", True), ((b"connection: close",), b"1.1", False), ((), b"1.0", False),
     ((b"connection: keep-alive",), b"1.0", False)],
)  # fmt: skip
def test_only_http_1_1_without_close_keeps_the_connection(
    extra: tuple[bytes, ...], version: bytes, keep_alive: bool
) -> None:
    request = events_of(post(b"{}", *extra, version=version))[0]
    assert isinstance(request, Request) and request.keep_alive is keep_alive


def test_the_body_is_pending_until_its_end_is_read() -> None:
    reader = RequestReader(max_head=MAX_HEAD)
    data = post(b"0123456789")
    reader.feed(data[:-4])
    assert isinstance(reader.next_event(), Request) and reader.body_pending
    assert reader.next_event() == b"012345" and reader.next_event() is None
    reader.feed(data[-4:])
    assert reader.next_event() == b"6789" and reader.body_pending
    assert reader.next_event() is END and not reader.body_pending


def test_pipelined_requests_come_one_after_another() -> None:
    events = events_of(post(b"1") + post(b"22") + post(b"")[:30])
    assert [e if not isinstance(e, Request) else e.content_length for e in events] == [
        1, b"1", END, 2, b"22", END,
    ]  # fmt: skip


def test_a_malformed_request_is_raised_after_the_events_before_it() -> None:
    reader = RequestReader(max_head=MAX_HEAD)
    reader.feed(post(b"1") + b"NOT HTTP\r\n\r\n")
    assert [type(reader.next_event()), reader.next_event(), reader.next_event()] == [
        Request, b"1", END,
    ]  # fmt: skip
    with pytest.raises(BadRequest) as info:
        reader.next_event()
    assert info.value.status == 400
    reader.feed(post(b"2"))  # nothing more is parsed after it
    with pytest.raises(BadRequest):
        reader.next_event()


@pytest.mark.parametrize(
    ("data", "status", "match"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 400, "host"),
        (b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n", 400, "host"),
        (b"POST / HTTP/2.0\r\ncontent-length: 0\r\n\r\n", 505, "HTTP/2.0"),
        (b"POST / HTTP/0.9\r\ncontent-length: 0\r\n\r\n", 505, "HTTP/0.9"),
        (b"POST / HTTP/1.2\r\n\r\n", 400, "version"),
        (b"BREW / HTTP/1.1\r\nhost: a\r\n\r\n", 400, "method"),
        (b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\nx", 400,
         "Content-Length"),
        (b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n",
         400, "Transfer-Encoding"),
        (b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 99999999999999999999\r\n\r\n", 400,
         "overflow"),
        (b"POST / HTTP/1.1\r\nhost: a\r\n folded\r\n\r\n", 400, "malformed"),
        (b"POST / HTTP/1.1\nhost: a\n\n", 400, "malformed"),
    ],
)  # fmt: skip
def test_what_is_refused_and_its_status(data: bytes, status: int, match: str) -> None:
    reader = RequestReader(max_head=MAX_HEAD)
    reader.feed(data)
    with pytest.raises(BadRequest, match=match) as info:
        drain(reader)
    assert info.value.status == status


def test_http_1_0_needs_no_host() -> None:
    request = events_of(b"POST / HTTP/1.0\r\ncontent-length: 0\r\n\r\n")[0]
    assert isinstance(request, Request) and request.version == "1.0"


@pytest.mark.parametrize(
    ("extra", "framing"),
    [(b"transfer-encoding: chunked", "transfer-encoding"),
     (b"transfer-encoding: gzip, chunked", "transfer-encoding"),
     (b"connection: upgrade\r\nupgrade: h2c", "upgrade")],
)  # fmt: skip
def test_a_body_framed_otherwise_ends_the_parse_at_its_head(extra: bytes, framing: str) -> None:
    head = b"POST / HTTP/1.1\r\nhost: a\r\n" + extra + b"\r\n\r\n"
    reader = RequestReader(max_head=MAX_HEAD)
    reader.feed(head + b"1\r\n{\r\n0\r\n\r\n" + post())
    request = reader.next_event()
    assert isinstance(request, Request) and request.framing == framing
    assert reader.next_event() is CLOSED  # no chunk, and not the request after it


def test_connect_is_an_upgrade() -> None:
    reader = RequestReader(max_head=MAX_HEAD)
    reader.feed(b"CONNECT a:443 HTTP/1.1\r\nhost: a:443\r\n\r\n" + post())
    request = reader.next_event()
    assert isinstance(request, Request) and request.framing == "upgrade"
    assert reader.next_event() is CLOSED


def test_expect_100_continue_is_noticed_in_http_1_1_only() -> None:
    request = events_of(post(b"{}", b"Expect: 100-Continue"))[0]
    assert isinstance(request, Request) and request.expects_continue
    request = events_of(post(b"{}", b"expect: 100-continue", version=b"1.0"))[0]
    assert isinstance(request, Request) and not request.expects_continue


def test_the_connection_ending_mid_request_is_closed() -> None:
    data = post(b"0123")
    assert events_of(data[:-2], eof=True)[-2:] == [b"01", CLOSED]
    assert events_of(data[:20], eof=True) == [CLOSED]
    assert events_of(eof=True) == [CLOSED]


def test_a_head_over_its_bound_is_refused_before_it_completes() -> None:
    reader = RequestReader(max_head=MAX_HEAD)
    prefix = b"POST / HTTP/1.1\r\nhost: a\r\nx: "
    reader.feed(prefix)
    for at in range(len(prefix), MAX_HEAD, 64):  # up to the bound, in pieces
        reader.feed(b"a" * min(64, MAX_HEAD - at))
        assert reader.next_event() is None
    reader.feed(b"a")
    with pytest.raises(BadRequest, match="longer than") as info:
        reader.next_event()
    assert info.value.status == 431


def test_a_pipelined_head_is_measured_from_the_read_it_began_in() -> None:
    """Where the head began in that read is unknown (llhttp does not say), so the rest of the
    read is slack: a short head after a long request is never refused, a long one is once
    the later reads alone are over the bound."""
    first = post(b"x" * (MAX_HEAD * 3))
    second = post(b"{}", b"x-pad: " + b"p" * (MAX_HEAD // 2))
    events = events_of(first + second[:40], second[40:])
    assert [type(e) for e in events] == [Request, bytes, type(END), Request, bytes, type(END)]
    long = post(b"{}", b"x-pad: " + b"p" * (MAX_HEAD * 2))
    reader = RequestReader(max_head=MAX_HEAD)
    reader.feed(first + long[:40])
    drain(reader)
    reader.feed(long[40 : 40 + MAX_HEAD])
    assert reader.next_event() is None  # not yet surely over
    reader.feed(long[40 + MAX_HEAD : 80 + MAX_HEAD])
    with pytest.raises(BadRequest, match="longer than"):
        reader.next_event()


def test_a_head_completing_in_one_long_read_is_held_to_its_bound() -> None:
    """A head under way is parsed only as far as its bound leaves room for: the rest of a
    long read is not taken into it first."""
    reader = RequestReader(max_head=MAX_HEAD)
    reader.feed(b"POST / HTTP/1.1\r\n")
    reader.feed(b"host: a\r\nx: " + b"a" * (3 * MAX_HEAD) + b"\r\ncontent-length: 0\r\n\r\n")
    with pytest.raises(BadRequest, match="longer than") as info:
        reader.next_event()
    assert info.value.status == 431


def test_header_fields_are_capped() -> None:
    fields = [b"x-%d: 1" % i for i in range(MAX_HEADERS - 2)]  # and host, content-length
    assert isinstance(events_of(post(b"{}", *fields))[0], Request)
    reader = RequestReader(max_head=MAX_HEAD * 4)
    reader.feed(post(b"{}", *fields, b"x-last: 1"))
    with pytest.raises(BadRequest, match="header fields") as info:
        reader.next_event()
    assert info.value.status == 431


def test_line_ends_between_requests_are_bounded() -> None:
    """llhttp skips them without a callback: an endless run of them is refused once it is
    longer than a head may be; an honest CRLF after each request is not."""
    assert events_of(*(post(b"1") + b"\r\n" for _ in range(MAX_HEAD))).count(END) == MAX_HEAD
    reader = RequestReader(max_head=MAX_HEAD)
    reader.feed(post(b"1") + b"\r\n" * 8)
    assert len(drain(reader)) == 3
    for _ in range(MAX_HEAD // 64):
        reader.feed(b"\r\n" * 32)
        assert reader.next_event() is None
    reader.feed(b"\r\n")
    with pytest.raises(BadRequest, match="line ends") as info:
        reader.next_event()
    assert info.value.status == 400


def test_replies_are_written_as_h11_reads_them() -> None:
    client = h11.Connection(h11.CLIENT)
    headers = [("host", "a"), ("content-length", "0")]
    client.send(h11.Request(method="POST", target="/", headers=headers))
    client.send(h11.EndOfMessage())
    head = reply_head(200, [(b"content-type", b"x/y"), (b"transfer-encoding", b"chunked")])
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    client.receive_data(head + chunk(b"abc") + chunk(b"") + chunk(b"de") + LAST_CHUNK)
    response = client.next_event()
    assert isinstance(response, h11.Response) and response.status_code == 200
    assert (b"content-type", b"x/y") in response.headers
    body = b""
    while isinstance(event := client.next_event(), h11.Data):
        body += event.data
    assert body == b"abcde" and isinstance(event, h11.EndOfMessage)
    assert reply_head(599, []) == b"HTTP/1.1 599 \r\n\r\n"


SEEDS = [
    post(b'{"a":1}'),
    post(b"1") + post(b"22"),
    post(b"{}", b"expect: 100-continue", b"connection: close"),
    post(b"", version=b"1.0"),
    b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n",
    b"GET /x?y HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n",
    b"\r\n" + post(b"x") + b"garbage",
]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fuzz_requests_parse_the_same_in_any_pieces(data: st.DataObject) -> None:
    """Mutated requests fed in any pieces give the events (and the error) they give whole;
    nothing but `BadRequest` comes out."""
    whole, pieces = mutated_pieces(data, SEEDS)
    assert request_outcome(pieces, MAX_HEAD) == request_outcome([whole], MAX_HEAD)
