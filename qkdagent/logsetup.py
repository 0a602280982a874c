"""Log output: human-readable text or one JSON object per line (for journald/collectors).

Nothing in qkdagent logs key bytes; this module chooses the format and makes sure no text in
a record (a peer's error, a key ID, a file name) can start a line of its own: a newline, a
carriage return or a terminal escape in a message would otherwise forge a log line. Both
formatters escape every control character, so every caller is covered without thinking of it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import TextIO

FIELDS = (
    "link",
    "epoch",
    "stage",
    "sink",
    "reason",
    "component",
    "kind",
    "duration_ms",
    "parts_ms",
)
"""Structured fields a log call may pass with `extra=`; JSON lines carry them as keys, so a
collector can filter by link or stage without parsing messages. None of them is key material."""

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_TRACE_PREFIX = "  | "
"""Starts every line of a traceback in text logs, so no line of it (the exception's message
is not ours) can pass for a log record."""


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(text: str) -> str:
    """`text` with C0/C1 controls, DEL, U+2028/U+2029 and lone surrogates (undecodable file
    names; they cannot be written as UTF-8) written as escapes (`\\n`, `\\x1b`, `\\udcff`).

    Pure; for log lines and for terminal output of text that came from elsewhere."""
    return _CONTROL.sub(_escape_char, text)


def _traceback_block(text: str) -> str:
    """A traceback kept multi-line (it is ours) with each line prefixed and escaped inside."""
    return "\n".join(_TRACE_PREFIX + escape_control(line) for line in text.splitlines())


class TextFormatter(logging.Formatter):
    """`time level logger: message`, one line per record plus an optional traceback block."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_control(super().formatMessage(record))

    def formatException(self, ei: object) -> str:
        return _traceback_block(super().formatException(ei))  # type: ignore[arg-type]

    def formatStack(self, stack_info: str) -> str:
        return _traceback_block(super().formatStack(stack_info))


_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff]")


_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)
"""One encoder for every line (`json.dumps` with options builds one per call)."""


class JsonFormatter(logging.Formatter):
    """One JSON object per line; json.dumps escapes C0 controls, the rest are escaped here."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            # microseconds: lines of two agents on one host order like the events they log
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.created * 1_000_000) % 1_000_000:06d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                data[name] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        text = _ENCODER.encode(data)
        # Outside strings json.dumps writes ASCII only, so these are inside strings: \\uXXXX.
        return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


class StderrHandler(logging.StreamHandler[TextIO]):
    """Writes each record to the `sys.stderr` of that moment, not the one at setup: a handler
    holding a stream that was since replaced and closed (pytest's capture does that) fails on
    every record ("I/O operation on closed file")."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def setup_logging(fmt: str = "text", *, debug: bool = False, level: int | None = None) -> None:
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if level is not None else (logging.DEBUG if debug else logging.INFO))
    # hypercorn's and httpx's per-request chatter is not useful at INFO
    for noisy in ("httpx", "httpcore", "hpack", "qkdagent.http"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
