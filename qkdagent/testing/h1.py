"""HTTP/1.1 parses compared whole against split: mutated messages cut into pieces
(`mutated_pieces`, for hypothesis tests) and what `h1request.RequestReader` makes of pieces
(`request_outcome`), for the fuzz target `http` and the parsers' tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..h1request import CLOSED, BadRequest, Request, RequestReader

if TYPE_CHECKING:
    from hypothesis.strategies import DataObject


def mutated_pieces(data: DataObject, seeds: list[bytes]) -> tuple[bytes, list[bytes]]:
    """A seed with up to three bytes changed or short runs inserted, whole and cut into up to
    seven non-empty pieces."""
    from hypothesis import strategies as st

    message = bytearray(data.draw(st.sampled_from(seeds)))
    for _ in range(data.draw(st.integers(0, 3))):
        at = data.draw(st.integers(0, len(message)))
        if data.draw(st.booleans()) and message:
            message[min(at, len(message) - 1)] = data.draw(st.integers(0, 255))
        else:
            message[at:at] = data.draw(st.binary(max_size=8))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(message)), max_size=6)))
    edges = zip([0, *cuts], [*cuts, len(message)], strict=True)
    return bytes(message), [bytes(message[a:b]) for a, b in edges if b > a]


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
