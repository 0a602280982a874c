"""Untrusted text: made safe to show (one rule for error messages, status and reprs), and read
as a number."""

from __future__ import annotations


def printable(value: object, limit: int = 200) -> str:
    """At most `limit` characters of `str(value)`, every non-printable one (newline, ESC, other
    control characters) replaced by `?`, so a peer's text can never forge a log line."""
    return "".join(c if c.isprintable() else "?" for c in str(value)[:limit])


def decimal(text: str, digits: int) -> int | None:
    """`text` as a number of 1 to `digits` ASCII digits, else None. `str.isdigit` alone
    passes "²", which `int` refuses, and `int` refuses over 4,300 digits: both a ValueError
    where a parser of hostile text wants its own typed refusal."""
    if not (0 < len(text) <= digits and text.isascii() and text.isdigit()):
        return None
    try:
        return int(text)
    except ValueError:  # a `digits` over the interpreter's limit
        return None
