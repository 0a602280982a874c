"""quPSKd's peer messages (REFERENCE §11), pure: routes, answers, and the checks every answer
from the peer passes before anything is used. The peer is unauthenticated and the path may be
hostile, so an answer is bounded, typed, and anything unexpected is a `WireError`."""

from __future__ import annotations

import json
from typing import Any

MAX_ANSWER_BYTES = 16 * 1024
"""quPSKd's answers are a few dozen bytes; anything past this is refused while reading."""
MAX_KEY_ID_BYTES = 256
"""As the ETSI 014 source's bound on key IDs (a longer one could never be looked up)."""
ROUTES = {"/new": "new", "/rotate": "rotate", "/ack": "ack"}
"""The only paths served (exact, as quPSKd matches them); anything else is 404."""


class WireError(ValueError):
    """An answer from the peer that is not what the protocol allows."""


def route(method: str, target: str) -> str | None:
    return ROUTES.get(target) if method == "GET" else None


def key_answer(key_id: str) -> bytes:
    return json.dumps({"status": "ok", "key_ID": key_id}).encode()


def ack_answer() -> bytes:
    return json.dumps({"status": "ok"}).encode()


def error_answer(message: str) -> bytes:
    return json.dumps({"status": "error", "message": message}).encode()


def _object(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_ANSWER_BYTES:
        raise WireError(f"answer is larger than {MAX_ANSWER_BYTES} bytes")
    try:
        value = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):  # json recurses per nesting level
        raise WireError("answer is not JSON (or nested too deeply)") from None
    if not isinstance(value, dict):
        raise WireError(f"answer is a JSON {type(value).__name__}, not an object")
    status = value.get("status")
    if status != "ok":
        shown = status[:40] if isinstance(status, str) else type(status).__name__
        raise WireError(f"answer's status is {shown!r}, not 'ok'")
    return value


def check_key_id(key_id: object) -> str:
    if not isinstance(key_id, str) or not key_id:
        raise WireError("key_ID is missing or not a non-empty string")
    if len(key_id.encode("utf-8", "surrogatepass")) > MAX_KEY_ID_BYTES:
        raise WireError(f"key_ID is longer than {MAX_KEY_ID_BYTES} bytes")
    if not key_id.isprintable() or "&" in key_id or "=" in key_id:
        raise WireError("key_ID has characters a key ID cannot have")
    return key_id


def parse_key_answer(body: bytes) -> str:
    """The key ID of a `/new` or `/rotate` answer."""
    return check_key_id(_object(body).get("key_ID"))


def parse_ack(body: bytes) -> None:
    _object(body)
