"""The ASGI application of one simulated KME (ETSI GS QKD 014 REST API).

Plain ASGI without a framework: three routes, strict parsing, JSON answers. The caller's SAE ID is
passed in by the server from the TLS client certificate of the connection (never read from the
request). `Quirks` make the KME behave like the non-conforming KMEs found in the field, so the
source can be tested against them.
"""

from __future__ import annotations

import binascii
import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import trio

from . import reqparse
from .network import ApiError, KmeNetwork
from .wire import MSG_KEYS_NOT_FOUND

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

PREFIX = b"/api/v1/keys/"
DEFAULT_MAX_BODY = 64 * 1024
MAX_BODY_PIECES = 4096
"""ASGI body messages a request may come in (HTTP/2 DATA frames, HTTP/1.1 reads), or one per
8 KiB of a larger `max_body` (`body_pieces`): an honest body comes in records of 16 KiB."""


def body_pieces(max_body: int) -> int:
    return max(MAX_BODY_PIECES, max_body // 8192)


@dataclass(frozen=True)
class Quirks:
    """Deviations from the spec that real KMEs and simulators show (all off by default)."""

    only_method: str | None = None
    """"GET" or "POST": the only method accepted on enc_keys/dec_keys (others get 405)."""
    method_refusal_status: int = 405
    """Status for a refused method: 405, or 404 with a body that is no Error object
    (`{"detail": "Not Found"}`), as KMEs built on web frameworks without that route answer."""
    not_found_status: int = 400
    """Status for unknown key IDs on dec_keys (the spec says 400; many KMEs answer 404)."""
    container_name: str = "keys"
    """Name of the key array ("Keys" as in Table 11, or other spellings)."""
    key_id_name: str = "key_ID"
    """Name of the key ID member (some simulators write "key_id")."""
    single_object: bool = False
    """Answer a one-key request with a key object instead of a one-element array."""
    delay: float = 0.0
    """Seconds to wait before answering (a slow or distant KME)."""
    one_key_per_answer: bool = False
    """Answer one key whatever `number` asks for, and only the first of several key IDs (a KME
    that ignores them: the others stay on the KME)."""


class KmeApp:
    """One KME of a `KmeNetwork`, as an ASGI callable taking the caller's identity."""

    def __init__(
        self,
        network: KmeNetwork,
        kme_id: str,
        *,
        max_body: int = DEFAULT_MAX_BODY,
        quirks: Quirks | None = None,
    ) -> None:
        if kme_id not in network.kmes:
            raise ValueError(f"unknown KME {kme_id!r}")
        self.network = network
        self.kme_id = kme_id
        self.max_body = max_body
        self.quirks = quirks or Quirks()
        self.stats: Counter[str] = Counter()
        """Answers by status code, and keys handed out."""
        self.received = 0
        """Requests that reached the app (counted before the `delay` quirk)."""
        self.before_answer: Callable[[], Awaitable[None]] | None = None
        """Awaited before each request is handled, after `delay` (tests hold answers with it)."""

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, caller: str | None
    ) -> None:
        if scope["type"] != "http":
            return
        self.received += 1  # before any delay: tests cancel a request in flight
        if self.quirks.delay:
            await trio.sleep(self.quirks.delay)
        if self.before_answer is not None:
            await self.before_answer()
        try:
            status, body = await self._handle(scope, receive, caller)
        except ApiError as exc:
            status, body = exc.status, exc.body()
            if exc.status == 400 and exc.message == MSG_KEYS_NOT_FOUND:
                status = self.quirks.not_found_status
            elif exc.status == 405 and self.quirks.method_refusal_status == 404:
                status, body = 404, {"detail": "Not Found"}
        self.stats[str(status)] += 1
        data = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
        if status == 405:
            headers.append((b"allow", body.get("details", [{}])[0].get("allow", "").encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    async def _handle(self, scope: Scope, receive: Receive, caller: str | None) -> tuple[int, Any]:
        path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        if not path.startswith(PREFIX) or path.count(b"/") != 5:
            raise ApiError(404, "no such resource; the API lives under /api/v1/keys/{SAE_ID}/")
        sae_part, _, operation = path[len(PREFIX) :].partition(b"/")
        try:
            sae = unquote(sae_part.decode("ascii"), errors="strict")
        except UnicodeDecodeError:
            raise ApiError(400, "SAE ID in the path is not valid percent-encoded UTF-8") from None
        if not sae:
            raise ApiError(404, "SAE ID missing in the path")
        method = scope["method"]
        network, kme = self.network, self.kme_id
        if operation == b"status":
            self._allow(method, ("GET",))
            return 200, network.status(kme, caller, sae)
        if operation not in (b"enc_keys", b"dec_keys"):
            raise ApiError(404, "no such resource; use status, enc_keys or dec_keys")
        self._allow(
            method, (self.quirks.only_method,) if self.quirks.only_method else ("GET", "POST")
        )
        body = b""
        if method == "POST":
            self._check_content_type(scope)
            body = await self._read_body(scope, receive)
        query: bytes = scope.get("query_string", b"")
        if method == "POST" and query:
            raise ApiError(400, "POST requests take their parameters in the body, not the query")
        if operation == b"enc_keys":
            request = reqparse.enc_post(body) if method == "POST" else reqparse.enc_get(query)
            if self.quirks.one_key_per_answer:
                request = dataclasses.replace(request, number=1)
            keys = network.enc_keys(kme, caller, sae, request)
        else:
            ids = reqparse.dec_post(body) if method == "POST" else reqparse.dec_get(query)
            keys = network.dec_keys(
                kme, caller, sae, ids[:1] if self.quirks.one_key_per_answer else ids
            )
        self.stats["keys"] += len(keys)
        return 200, self._container(keys)

    def _container(self, keys: list[tuple[str, bytes]]) -> bytes:
        """The Key container as JSON text, formatted directly (3x faster than json.dumps).

        Safe without escaping: key IDs come from `new_key_ids` (hex and dashes), keys are base64.
        """
        b64 = binascii.b2a_base64
        name = json.dumps(self.quirks.key_id_name)
        items = [
            f'{{{name}:"{key_id}","key":"{b64(value, newline=False).decode()}"}}'
            for key_id, value in keys
        ]
        container = json.dumps(self.quirks.container_name)
        if self.quirks.single_object and len(items) == 1:
            return f"{{{container}:{items[0]}}}".encode()
        return f"{{{container}:[{','.join(items)}]}}".encode()

    @staticmethod
    def _allow(method: str, allowed: tuple[str | None, ...]) -> None:
        if method not in allowed:
            allow = ", ".join(a for a in allowed if a)
            raise ApiError(405, f"method {method} is not allowed here", [{"allow": allow}])

    @staticmethod
    def _check_content_type(scope: Scope) -> None:
        for name, value in scope.get("headers", ()):
            if name == b"content-type":
                media = value.split(b";", 1)[0].strip().lower()
                if media != b"application/json":
                    raise ApiError(400, "Content-Type must be application/json")

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body:
                raise ApiError(400, f"request body is larger than {self.max_body} bytes")
        chunks: list[bytes] = []
        size, pieces = 0, body_pieces(self.max_body)
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise ApiError(400, "request was aborted")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise ApiError(400, f"request body is larger than {self.max_body} bytes")
            chunks.append(chunk)
            if len(chunks) > pieces:  # HTTP/2: one-byte DATA frames
                raise ApiError(400, f"request body in more than {pieces} pieces")
            if not message.get("more_body", False):
                return b"".join(chunks)
