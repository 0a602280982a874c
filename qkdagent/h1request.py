"""HTTP/1.1 for the peer server: requests parsed with llhttp, replies written.

The parsing is llhttp's (through `httptools`, as in `h1wire`): strict by default (no obsolete
line folding, no bare CR or LF, no content-length beside a transfer-encoding or given twice, no
overflowing lengths, known methods only), and in C: h11 spent about 42 µs of Python per request
and reply in the server (issue 18). llhttp cannot pause after a request, so a connection's
requests are parsed as its bytes come, into a queue of events read one at a time
(`RequestReader.next_event`, after h11's). The server feeds the reader only once the queue is
empty, so what is queued is at most one read's worth of pipelined requests.

What llhttp leaves to its caller is done here, each with a bound: the head's size while it is
incomplete (llhttp joins a header's value across reads: at most the bound and one read is
held), at most `MAX_HEADERS` fields, line ends between requests (llhttp skips them unseen: at
most a head's worth), exactly one `host` in an HTTP/1.1 request (RFC 9112 §3.2, as h11 did),
and a request that frames its body otherwise than by a content-length (a transfer-encoding; an
upgrade or CONNECT, which llhttp hands over past the head) ends the parse there: the server
answers it and closes. llhttp also takes `RTSP/1.x` in place of `HTTP/1.x` (httptools does not
say which came): framed alike, so the server answers it as HTTP, with nothing behind it to
desynchronise.
"""

from __future__ import annotations

import collections
from http import HTTPStatus
from typing import Final

import httptools

from .h1wire import Header, parse_error_text

MAX_HEADERS = 64
"""Header fields in a request (the agent's own send four): a head of thousands of tiny fields
would be held as as many tuples."""


class BadRequest(Exception):
    """The bytes are not an HTTP/1.1 request this server takes; `status` is the answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Request:
    """A request's head: its body follows as `bytes` events and `END`."""

    __slots__ = ("content_length", "expects_continue", "framing", "headers", "keep_alive",
                 "method", "target", "version")  # fmt: skip

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: list[Header],
        version: str,
        *,
        keep_alive: bool,
        framing: str,
        content_length: int,
        expects_continue: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        """Names in lower case, values without surrounding whitespace."""
        self.version = version
        """"1.0" or "1.1" (llhttp also takes 0.9 and 2.0: `RequestReader` refuses them)."""
        self.keep_alive = keep_alive
        """Whether the connection may carry another request after this one."""
        self.framing = framing
        """"length" (a content-length, or no body), or, ending the parse at the head,
        "transfer-encoding" or "upgrade"."""
        self.content_length = content_length
        self.expects_continue = expects_continue
        """`expect: 100-continue`: the client may wait for a 100 before it sends the body."""


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


END: Final = _Marker("END")
"""The end of a request's body."""
CLOSED: Final = _Marker("CLOSED")
"""The connection ended (`RequestReader.eof`), or a request ended the parse at its head."""
Event = Request | bytes | _Marker


class RequestReader:
    """A connection's requests, fed as they arrive (`feed`, then `eof`) and read as events
    (`next_event`: None when it needs more bytes). A malformed request is a `BadRequest`
    raised once the events before it are read."""

    __slots__ = (
        "_began_in_feed",
        "_between",
        "_ended_in_feed",
        "_error",
        "_events",
        "_feed_len",
        "_head_bytes",
        "_head_slack",
        "_headers",
        "_in_head",
        "_in_message",
        "_max_head",
        "_parser",
        "_stopped",
        "_url",
        "body_pending",
    )

    def __init__(self, *, max_head: int) -> None:
        self._max_head = max_head
        self._parser = httptools.HttpRequestParser(self)
        self._events: collections.deque[Event] = collections.deque()
        self._error: BadRequest | None = None
        self._url: list[bytes] = []
        self._headers: list[Header] = []
        self._in_message = self._in_head = False
        self._head_bytes = self._head_slack = 0
        self._began_in_feed = self._ended_in_feed = False
        self._between = 0
        """Bytes of the reads since the last request in which no request began or ended."""
        self._feed_len = 0
        self._stopped = False
        self.body_pending = False
        """Whether a request's head was read and `END` has not been (its body is unread)."""

    def next_event(self) -> Event | None:
        if self._events:
            event = self._events.popleft()
            if event is END:
                self.body_pending = False
            elif isinstance(event, Request):
                self.body_pending = event.framing == "length"
            return event
        if self._error is not None:
            raise self._error
        if self._stopped:
            return CLOSED
        return None

    def feed(self, data: bytes) -> None:
        """Bytes from the connection, parsed at once into events. While a head is under way,
        only as much as its bound leaves room for (and a byte) is parsed before the bound is
        checked again, so no more than the bound and one read of head is ever held."""
        while data and not self._stopped and self._error is None:
            piece = data
            if self._in_head:  # (room ≥ 1: the bound held after the last piece)
                piece = data[: self._max_head - (self._head_bytes - self._head_slack) + 1]
            self._feed(piece)
            data = data[len(piece) :]

    def _feed(self, data: bytes) -> None:
        was_in_message = self._in_message
        self._began_in_feed = self._ended_in_feed = False
        self._feed_len = len(data)
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if not self._stopped:  # (a callback's own refusal is kept in `_error`)
                reason = parse_error_text(exc)
                self._error = self._error or BadRequest(f"malformed request ({reason})")
        except httptools.HttpParserUpgrade:
            self._stopped = True  # (`on_headers_complete` queued the request as an upgrade)
        except httptools.HttpParserError as exc:
            self._error = BadRequest(f"malformed request ({parse_error_text(exc)})")
        if self._in_head and self._error is None and self._head_over():
            self._error = BadRequest(f"request head longer than {self._max_head} bytes", 431)
        if was_in_message or self._in_message or self._began_in_feed or self._ended_in_feed:
            self._between = 0
        else:  # line ends between requests, which llhttp skips without a word: bounded too
            self._between += len(data)
            if self._between > self._max_head and self._error is None:
                self._error = BadRequest("line ends and no request")

    def eof(self) -> None:
        """The connection ended: a request under way is lost."""
        self._stopped = True

    @property
    def in_message(self) -> bool:
        """Whether a request has begun and not ended (read or not)."""
        return self._in_message

    def _head_over(self) -> bool:
        """Whether the head under way is surely longer than its bound. Bytes are counted from
        the start of the piece the head began in; if an earlier request ended in that piece,
        its length counts as slack, since where the head began in it is unknown."""
        return self._head_bytes - self._head_slack > self._max_head

    # -- llhttp's callbacks (an exception ends the parse; kept in `_error` or `_stopped`) --

    def on_message_begin(self) -> None:
        self._in_message = self._in_head = self._began_in_feed = True
        self._url, self._headers = [], []
        self._head_bytes = self._feed_len  # the read under way, whole
        self._head_slack = self._feed_len if self._ended_in_feed else 0

    def on_url(self, piece: bytes) -> None:
        self._url.append(piece)

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self._headers) >= MAX_HEADERS:
            self._refuse(BadRequest(f"more than {MAX_HEADERS} header fields", 431))
        self._headers.append((name.lower(), value.strip(b" \t")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._in_head = False
        version = parser.get_http_version()
        headers = self._headers
        self._headers = []
        length, framing, hosts, expects = 0, "length", 0, False
        for name, value in headers:
            if name == b"content-length":
                length = int(value)  # (llhttp took it: digits, one, under 2**64)
            elif name == b"transfer-encoding":
                framing = "transfer-encoding"
            elif name == b"host":
                hosts += 1
            elif name == b"expect":
                expects = value.lower() == b"100-continue"
        if version not in ("1.0", "1.1"):
            self._refuse(BadRequest(f"HTTP/{version} is not served", 505))
        if version == "1.1" and hosts != 1:
            self._refuse(BadRequest("an HTTP/1.1 request names one host"))
        if parser.should_upgrade():  # (`upgrade` with `connection: upgrade`, or CONNECT)
            framing = "upgrade"
        request = Request(
            parser.get_method(),
            b"".join(self._url),
            headers,
            version,
            keep_alive=parser.should_keep_alive() and version == "1.1",
            framing=framing,
            content_length=length,
            expects_continue=expects and version == "1.1",
        )
        self._events.append(request)
        if framing != "length":
            self._stop()

    def on_body(self, body: bytes) -> None:
        self._events.append(bytes(body))

    def on_message_complete(self) -> None:
        self._in_message = False
        self._events.append(END)
        self._ended_in_feed = True

    def _refuse(self, error: BadRequest) -> None:
        self._error = error
        raise error

    def _stop(self) -> None:
        self._stopped = True
        raise _Stop


class _Stop(Exception):
    """Ends the parse after a request the server answers and closes on."""


# -- replies -----------------------------------------------------------------------------

_STATUS_LINES = {
    status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode("ascii"))
    for status in HTTPStatus
}


def reply_head(status: int, headers: list[Header]) -> bytes:
    """A reply's head; `headers` are the server's own (never a peer's bytes)."""
    line = _STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status
    return line + b"".join(b"%s: %s\r\n" % header for header in headers) + b"\r\n"


def chunk(data: bytes) -> bytes:
    """One piece of a chunked body (empty data gives nothing: an empty chunk ends a body)."""
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


LAST_CHUNK: Final = b"0\r\n\r\n"
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
