"""Peer messages (DESIGN §4): strict parsing, canonical encoding and MACs. Pure, no I/O.

Every message is a JSON object whose fields, minus `mac`, are encoded canonically (sorted keys,
no whitespace) and authenticated with HMAC-SHA3-256 under the link's auth key. Parsing is strict:
unknown fields, wrong types and out-of-range values are refused before any key is touched, and
any body (pathological nesting included) either parses or raises `ProtocolError`.

Refusals (DESIGN v2 §4): a responder that refuses a message it could parse answers with a
`refusal`, MAC'd under the link's bootstrap-derived auth key (which both sides always hold,
whatever epoch either is on) and bound to the SHA3-256 digest of the exact request body, so it
can be neither forged by a holder of a CA certificate, nor replayed for another request, nor
provoked by a man in the middle who alters the request on its way. Only an authenticated refusal may
change what the initiator does (resynchronise, resend a commit); anything else is one failed
attempt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from typing import Any

from .errors import ProtocolError
from .ratchet import enc
from .secret import MAX_KEY_ID_ANY, Secret, check_key_id
from .text import printable

VERSION = 1
MAX_BODY = 64 * 1024
MAX_NAME = 128
MAX_SOURCES = 16
NONCE_SIZE = 32
MAX_EPOCH = 2**62
RESYNC_CEILING = 2**48
"""Highest epoch a resync may start a chain at, and the highest epoch hint an initiator acts on.
Honest links only ever step by one, so they never get near it; a resync at most this high
leaves 2**62 - 2**48 rotations of headroom, so no input can strand a link near MAX_EPOCH."""
MAX_LABELS = 64
MAX_ANSWER = 8192
"""Largest answer of an exchange source (an ML-KEM-1024 public key is 1,568 bytes)."""
MAX_ANSWER_B64 = 4 * (MAX_ANSWER // 3 + 1)
MAX_JSON_DEPTH = 8
"""Deeper nesting than any valid message has: refused before `json.loads` recurses."""
MAX_STRUCTURE = 4096
"""Quotes and brackets a message may hold outside escapes, those in strings included: the
largest valid one (16 sources, 64 labels, answers) has about 400 of its own, and key IDs
(UUIDs, KSID:index, hex) hold none. Past it a body is refused before its nesting is measured,
which walks them one by one in Python (a 64 KiB body of them took 8 ms, each refused request
of a flood)."""
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'"[]{}')))

_FIELDS: dict[str, set[str]] = {
    "rotate": {"keys", "labels", "nonce"},
    "resync": {"keys", "labels", "nonce"},
    "rotate-reply": {"nonce", "request_nonce", "confirm", "answers"},
    "resync-reply": {"nonce", "request_nonce", "confirm", "answers"},
    "commit": {"nonce", "confirm"},
    "commit-reply": {"request_nonce"},
    "announce": {"keys", "nonce"},
    "announce-reply": {"request_nonce"},
}
"""`announce` (an extension of DESIGN §4, see docs/design-deviations.md): the initiator names
the key IDs of the rotation to epoch n+1 ahead of it, MAC'd under epoch n's auth key, so the
responder fetches them before the `rotate` arrives. It changes no state on either side."""
_COMMON = {"v", "kind", "link", "from", "to", "epoch", "mac"}


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, field: str, *, size: int | None = None, limit: int = 200) -> bytes:
    if not isinstance(value, str) or len(value) > limit:
        raise ProtocolError(f"field {field!r} must be a base64 string")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"field {field!r} is not valid base64") from None
    if size is not None and len(data) != size:
        raise ProtocolError(f"field {field!r} must decode to {size} bytes")
    return data


@dataclass(frozen=True)
class Message:
    """A parsed, not yet authenticated message. `fields` holds the raw JSON values."""

    kind: str
    link: str
    sender: str
    receiver: str
    epoch: int
    fields: dict[str, Any]
    mac: bytes

    @property
    def nonce(self) -> bytes:
        return _unb64(self.fields["nonce"], "nonce", size=NONCE_SIZE)

    @property
    def request_nonce(self) -> bytes:
        return _unb64(self.fields["request_nonce"], "request_nonce", size=NONCE_SIZE)

    @property
    def confirm(self) -> bytes:
        return _unb64(self.fields["confirm"], "confirm", size=32)

    @property
    def keys(self) -> tuple[tuple[str, str], ...]:
        return tuple((s, k) for s, k in self.fields["keys"])

    @property
    def answers(self) -> tuple[tuple[str, bytes], ...]:
        """Exchange sources' answers (source, bytes), in config order (DESIGN v2 §3)."""
        return tuple((s, base64.b64decode(a)) for s, a in self.fields["answers"])

    @property
    def labels(self) -> tuple[str, ...]:
        """The sender's shared sink labels (sorted), which the receiver compares with its own."""
        return tuple(self.fields["labels"])


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)
"""One encoder for every message: `json.dumps` with options builds one per call (a third of a
small message's encoding time)."""


def canonical(fields: dict[str, Any]) -> bytes:
    return _CANONICAL.encode(fields).encode()


_MESSAGE_LABEL = enc("qkdagent v1 message")


def compute_mac(auth_key: Secret, fields: dict[str, Any]) -> bytes:
    body = {k: v for k, v in fields.items() if k != "mac"}
    return _mac(auth_key, canonical(body))


def _mac(auth_key: Secret, encoded: bytes) -> bytes:
    """The MAC of a message's canonical encoding without its `mac`."""
    return hmac.new(auth_key.reveal(), _MESSAGE_LABEL + encoded, hashlib.sha3_256).digest()


_AFTER_MAC = ("nonce", "request_nonce", "to")
"""The fields that sort after `mac`, in order (`to` is in every message, so one always does)."""


def build(
    kind: str,
    *,
    link: str,
    sender: str,
    receiver: str,
    epoch: int,
    auth_key: Secret,
    **extra: Any,
) -> bytes:
    """Encode and MAC a message; `extra` values that are bytes are base64-encoded."""
    fields: dict[str, Any] = {
        "v": VERSION,
        "kind": kind,
        "link": link,
        "from": sender,
        "to": receiver,
        "epoch": epoch,
    }
    for name, value in extra.items():
        fields[name] = b64(value) if isinstance(value, bytes) else value
    if set(fields) | {"mac"} != _COMMON | _FIELDS[kind]:
        raise ValueError(f"wrong fields for {kind}")
    # The canonical encoding with the MAC is the one without it, the `mac` member put where
    # sorting puts it: before the first field that sorts after it. That field's `,"name":` is
    # found by its first occurrence, as no string holds an unescaped quote (one encoding, not
    # two, per message).
    encoded = canonical(fields)
    after = next(name for name in _AFTER_MAC if name in fields)
    at = encoded.index(b',"' + after.encode() + b'":')
    mac = b64(_mac(auth_key, encoded)).encode()
    return encoded[:at] + b',"mac":"' + mac + b'"' + encoded[at:]


def load_json(body: bytes, *, limit: int = MAX_BODY, depth: int = MAX_JSON_DEPTH) -> Any:
    """Decode an untrusted JSON body: bounded size and nesting, `ProtocolError` on any defect.

    `json.loads` recurses once per nesting level, so `"[" * 5000` would raise RecursionError
    (and a deep enough document could exhaust the stack); the nesting is measured first by a
    linear scan that skips string contents.
    """
    if len(body) > limit:
        raise ProtocolError(f"message larger than {limit} bytes", status=413)
    # The depth is at most the number of opening brackets (in strings or not): a body with
    # few of them, as every message is, needs no scan.
    if body.count(b"[") + body.count(b"{") > depth:
        structure = _structure(body)
        if _depth(structure[:MAX_STRUCTURE], depth) > depth:
            raise ProtocolError(f"JSON nested deeper than {depth} levels")
        if len(structure) > MAX_STRUCTURE:
            raise ProtocolError(f"message has more than {MAX_STRUCTURE} quotes and brackets")
    try:
        # UTF-8 only: `json.loads(bytes)` also reads UTF-16 and UTF-32, where a quote byte
        # can be half of another character and the nesting measured above would be wrong
        return json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ProtocolError("message is not valid JSON") from None


def nesting_depth(body: bytes) -> int:
    """Maximum bracket nesting of a JSON text, ignoring brackets inside strings (no recursion)."""
    return _depth(_structure(body), len(body))


def _structure(body: bytes) -> bytes:
    """The quotes and brackets of a JSON text that delimit strings and values, in order: its
    escapes taken out first (a run of backslashes pairs up from the left, as in a string,
    and an escaped quote ends nothing), then every other byte. Each step runs in C."""
    return body.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)


def _depth(structure: bytes, limit: int) -> int:
    """The deepest nesting of `structure` (`_structure`), or the first depth past `limit`."""
    depth = deepest = 0
    in_string = False
    for byte in structure:
        if byte == 0x22:  # quote
            in_string = not in_string
        elif in_string:
            continue
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        else:
            depth -= 1
    return deepest


def parse(body: bytes, *, expect: tuple[str, ...]) -> Message:
    """Parse a message strictly; raise ProtocolError (status 400/413) on any defect."""
    data = load_json(body)
    if not isinstance(data, dict):
        raise ProtocolError("message must be a JSON object")
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in expect:
        raise ProtocolError(f"unexpected message kind {printable(kind, 40)!r}")
    if set(data) != _COMMON | _FIELDS[kind]:
        missing = sorted((_COMMON | _FIELDS[kind]) - set(data))
        extra = sorted(set(data) - (_COMMON | _FIELDS[kind]))
        raise ProtocolError(f"message fields wrong (missing {missing[:5]}, unknown {extra[:5]})")
    if data["v"] != VERSION or isinstance(data["v"], bool):
        raise ProtocolError(f"unsupported protocol version {printable(data['v'], 20)}")
    for name in ("link", "from", "to"):
        value = data[name]
        if not isinstance(value, str) or not value or len(value) > MAX_NAME:
            raise ProtocolError(f"field {name!r} must be a name of 1-{MAX_NAME} characters")
    epoch = data["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 < epoch < MAX_EPOCH:
        raise ProtocolError("field 'epoch' must be a positive integer")
    mac = _unb64(data["mac"], "mac", size=32)
    message = Message(kind, data["link"], data["from"], data["to"], epoch, data, mac)
    _check_fields(message)
    return message


def _check_fields(message: Message) -> None:
    names = _FIELDS[message.kind]
    if "nonce" in names:
        message.nonce  # noqa: B018 - validates
    if "request_nonce" in names:
        message.request_nonce  # noqa: B018
    if "confirm" in names:
        message.confirm  # noqa: B018
    if "keys" in names:
        keys = message.fields["keys"]
        if not isinstance(keys, list) or not 0 < len(keys) <= MAX_SOURCES:
            raise ProtocolError(f"field 'keys' must list 1-{MAX_SOURCES} source keys")
        for item in keys:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                raise ProtocolError("each entry of 'keys' must be [source, key_id]")
            if not item[0] or len(item[0]) > MAX_NAME:
                raise ProtocolError("a source name in 'keys' is empty or too long")
            try:
                check_key_id(item[1], MAX_KEY_ID_ANY)  # the source's own limit: responder rules
            except (ValueError, TypeError) as exc:
                raise ProtocolError(f"bad key ID in 'keys': {exc}") from None
    if "answers" in names:
        answers = message.fields["answers"]
        if not isinstance(answers, list) or len(answers) > MAX_SOURCES:
            raise ProtocolError(f"field 'answers' must list at most {MAX_SOURCES} answers")
        for item in answers:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                raise ProtocolError("each entry of 'answers' must be [source, base64]")
            if not 0 < len(item[0]) <= MAX_NAME:
                raise ProtocolError("a source name in 'answers' is empty or too long")
            _unb64(item[1], "answers", limit=MAX_ANSWER_B64)
    if "labels" in names:
        labels = message.fields["labels"]
        if not isinstance(labels, list) or len(labels) > MAX_LABELS:
            raise ProtocolError(f"field 'labels' must list at most {MAX_LABELS} sink labels")
        for label in labels:
            if not isinstance(label, str) or not 0 < len(label) <= MAX_NAME:
                raise ProtocolError("a sink label in 'labels' is empty, too long or not text")
            if not label.isprintable():
                raise ProtocolError("a sink label in 'labels' has control characters")
        if labels != sorted(set(labels)):
            raise ProtocolError("field 'labels' must be sorted and without duplicates")


def verify_mac(message: Message, auth_key: Secret) -> bool:
    return hmac.compare_digest(compute_mac(auth_key, message.fields), message.mac)


def error_code(body: bytes) -> str | None:
    """The `error` of an unauthenticated error body, if it is one."""
    try:
        data = load_json(body)
    except ProtocolError:
        return None
    code = data.get("error") if isinstance(data, dict) else None
    return code if isinstance(code, str) else None


def error_body(code: str, message: str) -> bytes:
    """An unauthenticated error reply (a request that could not be parsed or routed): the
    receiver counts it as a failed attempt and acts on nothing in it."""
    return canonical({"error": code, "message": message})


_REFUSAL_FIELDS = {"v", "kind", "link", "from", "to", "error", "message", "epoch",
                   "request", "mac"}  # fmt: skip
REFUSAL_CODES = frozenset(
    {"epoch", "pending", "auth", "confirm", "sources", "labels", "key-not-found", "source",
     "replay", "role", "identity", "busy"}
)  # fmt: skip
"""Why a responder refused; `epoch` and `pending` change what the initiator does next."""


@dataclass(frozen=True)
class Refusal:
    """A parsed refusal. `authentic` only once `verify_refusal` checked it."""

    code: str
    message: str
    epoch: int
    """The refusing side's committed epoch (a hint for `epoch` refusals)."""
    link: str
    sender: str
    receiver: str
    request: bytes
    """SHA3-256 of the refused request's body."""
    fields: dict[str, Any]
    mac: bytes


def request_digest(body: bytes) -> bytes:
    return hashlib.sha3_256(body).digest()


def _refusal_mac(bootstrap_auth: Secret, fields: dict[str, Any]) -> bytes:
    body = {k: v for k, v in fields.items() if k != "mac"}
    return hmac.new(
        bootstrap_auth.reveal(), enc("qkdagent v1 refusal") + canonical(body), hashlib.sha3_256
    ).digest()


def build_refusal(
    code: str,
    message: str,
    *,
    link: str,
    sender: str,
    receiver: str,
    epoch: int,
    request: bytes,
    bootstrap_auth: Secret,
) -> bytes:
    """A refusal bound to one request (`request` = its body's digest), MAC'd under the
    bootstrap-derived auth key."""
    if code not in REFUSAL_CODES:
        raise ValueError(f"unknown refusal code {code!r}")
    fields: dict[str, Any] = {
        "v": VERSION,
        "kind": "refusal",
        "link": link,
        "from": sender,
        "to": receiver,
        "error": code,
        "message": message[:300],
        "epoch": epoch,
        "request": b64(request),
    }
    fields["mac"] = b64(_refusal_mac(bootstrap_auth, fields))
    return canonical(fields)


def parse_refusal(body: bytes) -> Refusal:
    """Parse a refusal strictly (not yet authenticated); ProtocolError on any defect."""
    data = load_json(body)
    if not isinstance(data, dict) or data.get("kind") != "refusal":
        raise ProtocolError("not a refusal")
    if set(data) != _REFUSAL_FIELDS:
        raise ProtocolError("refusal fields wrong")
    if data["v"] != VERSION or isinstance(data["v"], bool):
        raise ProtocolError("unsupported refusal version")
    for name in ("link", "from", "to"):
        value = data[name]
        if not isinstance(value, str) or not value or len(value) > MAX_NAME:
            raise ProtocolError(f"refusal field {name!r} must be a name")
    code, text, epoch = data["error"], data["message"], data["epoch"]
    if not isinstance(code, str) or code not in REFUSAL_CODES:
        raise ProtocolError("unknown refusal code")
    if not isinstance(text, str) or len(text) > 300:
        raise ProtocolError("refusal message must be text of at most 300 characters")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch < MAX_EPOCH:
        raise ProtocolError("refusal epoch out of range")
    request = _unb64(data["request"], "request", size=32)
    mac = _unb64(data["mac"], "mac", size=32)
    return Refusal(code, text, epoch, data["link"], data["from"], data["to"], request, data, mac)


def verify_refusal(
    refusal: Refusal,
    *,
    bootstrap_auth: Secret,
    link: str,
    sender: str,
    receiver: str,
    request: bytes,
) -> bool:
    """Whether the refusal comes from the link's peer and answers this very request body."""
    return (
        refusal.link == link
        and refusal.sender == sender
        and refusal.receiver == receiver
        and hmac.compare_digest(refusal.request, request_digest(request))
        and hmac.compare_digest(_refusal_mac(bootstrap_auth, refusal.fields), refusal.mac)
    )
