"""Untrusted text made safe to show: one rule for error messages, status and reprs."""

from __future__ import annotations


def printable(value: object, limit: int = 200) -> str:
    """At most `limit` characters of `str(value)`, every non-printable one (newline, ESC, other
    control characters) replaced by `?`, so a peer's text can never forge a log line."""
    return "".join(c if c.isprintable() else "?" for c in str(value)[:limit])
