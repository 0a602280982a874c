"""HTTP/1.1 on the wire for `h1client`: request heads written, replies parsed with llhttp.

The parsing is llhttp's (Node.js's parser, through `httptools`): strict by default (no
obsolete line folding, no bare CR or LF, no content-length beside a transfer-encoding or given
twice, no overflowing lengths), and in C: h11 spent about 40 µs of Python per request and
reply on the client side (issue 18). What llhttp leaves to its caller is done here, each with
a bound: the head's size, all else that is not body (chunk lines and extensions, trailers:
llhttp joins a trailer's value across reads), the body's size and pieces (checked by
`h1client`), at most `MAX_INFORMATIONAL` 1xx replies skipped, an upgrade refused, a
transfer-encoding other than chunked refused (as h11 did), a status under 100 refused, a body
delimited by the connection's close ended at EOF, and bytes after the reply noticed so the
connection is not reused.

Request heads are written here from validated parts: a method token, a target of visible
ASCII, header names that are tokens and values without control characters (what h11 checked),
and none of the headers that frame a request from a caller (`FRAMING`), so no caller's string
can split a request.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import httptools

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff](?:[\x20-\x7e\x80-\xff\t]*[\x21-\x7e\x80-\xff])?)?")

Header = tuple[bytes, bytes]
MAX_INFORMATIONAL = 8
"""1xx replies taken before a reply proper (one `100 Continue` is all HTTP/1.1 needs)."""
OVERHEAD_SLACK = 64 * 1024
PIECE_OVERHEAD = 16
"""Bytes of a reply that are not its body (heads, chunk lines, trailers), at most: the head's
bound plus this slack (one read: a head that came whole may be that long) plus this much per
body piece (an honest chunk's size line and CRLFs take at most 12 bytes, zero-padded to eight
hex digits). llhttp itself bounds none of it, and gathers a trailer field's value across reads
by concatenation."""


class BadHttp(Exception):
    """The reply is not HTTP/1.1 this client takes (its message names what, never a body)."""


class HeadTooLarge(BadHttp):
    """The reply's head is over its bound."""


def check_header(name: bytes, value: bytes) -> Header:
    """A header as it may be written: `ValueError` for a name that is not a token or a value
    with control characters or surrounding whitespace."""
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"not a header name: {name[:40]!r}")
    if not _VALUE.fullmatch(value):
        raise ValueError(f"header {name[:40]!r} has a value that cannot be sent")
    return name.lower(), value


FRAMING = frozenset(
    (b"content-length", b"transfer-encoding", b"host", b"connection", b"upgrade", b"expect",
     b"te", b"trailer", b"keep-alive", b"proxy-connection")
)  # fmt: skip
"""Headers the client writes itself (or never): a caller's could frame the request otherwise
than its body is sent, a second request hidden in the first."""


def caller_header(name: bytes, value: bytes) -> Header:
    """A header a caller asked for (`check_header`), never one of `FRAMING`."""
    checked = check_header(name, value)
    if checked[0] in FRAMING:
        raise ValueError(f"header {name[:40]!r} is the client's to write")
    return checked


def request_head(method: str, target: str, headers: Sequence[Header]) -> bytes:
    """The head of a request; `headers` checked already (`check_header`)."""
    verb, path = method.encode("ascii"), target.encode("ascii")  # (UnicodeError: ValueError)
    if not _TOKEN.fullmatch(verb) or verb.upper() in (b"HEAD", b"CONNECT"):
        # (a reply to HEAD or CONNECT is framed differently; nothing here sends them)
        raise ValueError(f"method {method[:20]!r} cannot be sent")
    if not _TARGET.fullmatch(path):
        raise ValueError(f"request target {target[:60]!r} cannot be sent")
    lines = [verb, b" ", path, b" HTTP/1.1\r\n"]
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


class ReplyParser:
    """One reply, fed as it arrives (`feed`, then `eof` if the connection ends first).

    `on_head(status, headers)` is called once the final (non-1xx) reply's head is complete,
    `on_body(piece)` with each piece of its body; what they raise ends the parse and is raised
    by `feed`. `done` says the reply is complete, `reusable` whether the connection may carry
    another request after it (kept alive, nothing after the reply)."""

    __slots__ = (
        "_body_bytes",
        "_close_delimited",
        "_error",
        "_fed",
        "_head_bytes",
        "_headers",
        "_in_head",
        "_informational",
        "_max_head",
        "_on_body",
        "_on_head",
        "_parser",
        "_pieces",
        "done",
        "reusable",
        "started",
    )

    def __init__(
        self,
        on_head: Callable[[int, list[Header]], None],
        on_body: Callable[[bytes], None],
        *,
        max_head: int,
    ) -> None:
        self._on_head = on_head
        self._on_body = on_body
        self._max_head = max_head
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._headers: list[Header] = []
        self._in_head = True
        self._head_bytes = 0
        self._close_delimited = False
        self._informational = 0
        self._fed = self._body_bytes = self._pieces = 0
        self._error: BaseException | None = None
        self.started = False
        """Whether any byte of a reply came."""
        self.done = False
        self.reusable = False

    def feed(self, data: bytes) -> None:
        if not data:
            return
        self.started = True
        if self.done:  # bytes after the reply: no answer to anything sent
            if data.strip(b"\r\n"):  # (llhttp skips line ends between messages, as here)
                self.reusable = False
            return
        if self._in_head:
            self._head_bytes += len(data)  # an upper bound of the head's size so far
        self._fed += len(data)
        assert self._parser is not None  # (dropped only once done)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            error, self._error = self._error, None
            if isinstance(error, _Trailing):
                return  # the reply is complete, and the connection not reusable
            if error is None:
                raise BadHttp("reply could not be parsed") from None
            raise error from None
        except httptools.HttpParserUpgrade:
            raise BadHttp("reply switches protocols, never asked for") from None
        except httptools.HttpParserError as exc:
            if self.done:  # what follows the reply is no answer to anything sent
                self.reusable = False
                return
            raise BadHttp(f"malformed reply ({parse_error_text(exc)})") from None
        if self._in_head and self._head_bytes > self._max_head:
            raise HeadTooLarge(f"reply head longer than {self._max_head} bytes")
        overhead = self._fed - self._body_bytes
        if overhead > self._max_head + OVERHEAD_SLACK + PIECE_OVERHEAD * self._pieces:
            raise BadHttp("reply framing (heads, chunk lines, trailers) over its bound")

    def eof(self) -> None:
        """The connection ended: the reply is complete only if its body was delimited by it."""
        if not self.done and self._close_delimited:
            self.done, self.reusable = True, False
        if not self.done:
            raise BadHttp("connection closed before the end of the reply")

    # -- llhttp's callbacks (an exception is kept for `feed`: httptools replaces it) ---------

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        raise exc

    def on_message_begin(self) -> None:
        if self.done:  # a second message right after the reply
            self.reusable = False
            self._fail(_Trailing())

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:
            self._headers.append((name.lower(), value))
        # (a chunked body's trailer fields come here after the head: not used)

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        if status < 100:
            self._fail(BadHttp(f"reply status {status:03d}"))
        if status < 200:  # informational: the reply proper follows
            self._headers = []
            self._informational += 1
            if self._informational > MAX_INFORMATIONAL:
                self._fail(BadHttp(f"more than {MAX_INFORMATIONAL} informational replies"))
            return
        self._in_head = False
        headers, self._headers = self._headers, []
        framed = False
        for name, value in headers:
            if name == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    self._fail(BadHttp("reply has a transfer-encoding other than chunked"))
                framed = True
            elif name == b"content-length":
                framed = True
        self._close_delimited = not framed and status not in (204, 304)
        try:
            self._on_head(status, headers)
        except BaseException as exc:
            self._fail(exc)

    def on_body(self, body: bytes) -> None:
        if self._in_head:  # (llhttp gives a 1xx reply no body: defensive only)
            return
        self._body_bytes += len(body)
        self._pieces += 1
        try:
            self._on_body(bytes(body))
        except BaseException as exc:
            self._fail(exc)

    def on_message_complete(self) -> None:
        if self._in_head:  # the end of a 1xx reply: read on
            self._head_bytes = 0
            return
        parser = self._parser
        assert parser is not None
        self.done = True
        self.reusable = parser.should_keep_alive() and parser.get_http_version() == "1.1"
        # The parser holds this object's callbacks and this object the parser: a reference
        # cycle per reply, left for the cyclic collector to find. Done, it is not needed
        # (bytes after the reply are only noticed), so the cycle is broken here.
        self._parser = None


class _Trailing(Exception):
    """Bytes after the reply (caught in `feed`: not an error of the reply itself)."""


def parse_error_text(exc: Exception) -> str:
    """What llhttp said was wrong (its own fixed reasons, never the bytes), for a message."""
    return str(exc)[:80] or type(exc).__name__
