"""What `h1request.RequestReader` makes of bytes fed in given pieces, in a form to compare
(whole against split): for the fuzz target `http` and the reader's tests."""

from __future__ import annotations

from ..h1request import CLOSED, BadRequest, Request, RequestReader


def request_outcome(pieces: list[bytes], max_head: int) -> list[object]:
    """The events (a `Request` as a tuple of its fields, each body whole), then `CLOSED` or
    the `("error", status)` of a `BadRequest`."""
    reader = RequestReader(max_head=max_head)
    out: list[object] = []

    def read() -> bool:
        while (event := reader.next_event()) is not None:
            if event is CLOSED:
                out.append(event)
                return True
            if isinstance(event, Request):
                out.append((event.method, event.target, event.headers, event.version,
                            event.keep_alive, event.framing, event.content_length,
                            event.expects_continue))  # fmt: skip
            elif isinstance(event, bytes) and out and isinstance(out[-1], bytes):
                out[-1] += event  # a body comes in as many pieces as reads
            else:
                out.append(event)
        return False

    try:
        for piece in pieces:
            reader.feed(piece)
            if read():
                return out
        reader.eof()
        read()
    except BadRequest as exc:
        out.append(("error", exc.status))
    return out
