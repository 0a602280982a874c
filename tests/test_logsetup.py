"""Log lines: text from elsewhere (a peer's error, a key ID, a file name) cannot forge a line."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from qkdagent.logsetup import JsonFormatter, TextFormatter, escape_control, setup_logging

FORGERY = "bad\n2030-01-01 00:00:00,000 INFO    qkdagent: rotated\r\x1b[2J\u2028\x85\x00\udcff"
"""Newline, CR, a terminal escape, Unicode line/paragraph separators, NEL, NUL, a lone
surrogate (an undecodable file name): each either breaks a line or cannot be written."""


def _record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError(FORGERY)
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("qkdagent.link", logging.WARNING, "x.py", 1, msg, args, exc_info)


def test_escape_control_is_total_and_keeps_printable_text() -> None:
    assert escape_control("plain text: ünïcödé ✓") == "plain text: ünïcödé ✓"
    escaped = escape_control(FORGERY)
    assert escaped.isprintable() and len(escaped.splitlines()) == 1
    assert "\\n2030-01-01" in escaped and "\\x1b[2J" in escaped and "\\u2028" in escaped
    escaped.encode("utf-8")  # no lone surrogate left


@pytest.mark.parametrize("args", [(), ("%s",)])
def test_text_lines_escape_control_characters(args: tuple[str, ...]) -> None:
    """Whether the text is the message or one of its arguments, the record stays one line."""
    msg, argv = (FORGERY, ()) if not args else ("peer said: %s", (FORGERY,))
    line = TextFormatter().format(_record(msg, *argv))
    assert len(line.splitlines()) == 1
    assert "\x1b" not in line and "\\x1b[2J" in line and "\\n2030-01-01" in line
    line.encode("utf-8")


def test_text_traceback_stays_multiline_but_no_line_passes_for_a_record() -> None:
    text = TextFormatter().format(_record("rotation failed", exc=True))
    first, *rest = text.split("\n")
    assert first.endswith("qkdagent.link: rotation failed")
    assert any("Traceback" in line for line in rest) and len(rest) >= 3
    assert all(line.startswith("  | ") for line in rest)
    assert "\x1b" not in text and "\r" not in text and "\u2028" not in text


def test_json_lines_are_one_line_and_round_trip() -> None:
    line = JsonFormatter().format(_record("peer said: %s", FORGERY, exc=True))
    assert len(line.splitlines()) == 1 and "\x85" not in line and "\u2028" not in line
    data = json.loads(line)
    assert data["msg"] == "peer said: " + FORGERY
    assert FORGERY.splitlines()[0] in data["exc"]


def test_json_fields_that_json_cannot_encode_do_not_break_the_line() -> None:
    record = _record("ok")
    record.link = object()  # a structured field of an odd type: written as text
    data = json.loads(JsonFormatter().format(record))
    assert data["msg"] == "ok" and data["link"].startswith("<object")


def test_handler_follows_the_current_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler set up once keeps working when stderr is replaced (and the old one closed)."""
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging("text")
    try:
        first.close()
        second = io.StringIO()
        monkeypatch.setattr(sys, "stderr", second)
        logging.getLogger("qkdagent.test").warning("hello\nforged")
        assert second.getvalue().endswith("qkdagent.test: hello\\nforged\n")
    finally:
        logging.getLogger().handlers.clear()
