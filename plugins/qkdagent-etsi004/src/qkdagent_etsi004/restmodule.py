"""A qkd-module (REST form, REFERENCE §2.6) as the `etsi004` source calls it: typed outcomes.

Plain HTTP, so every call is bounded in time (`timeout`; OPEN_CONNECT gets `OPEN_EXTRA` more,
as the module sleeps 1-10 s in it) and in size (`rest.MAX_BODY`); transport failures become
`SourceUnavailable`, malformed answers `SourceError`, and nothing the module sends is evaluated.
"""

from __future__ import annotations

import trio

from qkdagent import SourceError, SourceUnavailable

from . import rest
from .restclient import HttpError, post
from .transport import TransportError

OPEN_EXTRA = 12.0
"""Seconds OPEN_CONNECT may take beyond the QoS timeout (the module sleeps up to 10 s)."""


class RestModule:
    def __init__(self, host: str, port: int, where: str, timeout: float, max_key: int) -> None:
        self.host = host
        self.port = port
        self.where = where
        self.timeout = timeout
        self.max_key = max_key

    async def _post(self, path: str, body: bytes, seconds: float) -> tuple[int, bytes]:
        try:
            with trio.fail_after(seconds):
                return await post(self.host, self.port, path, body, limit=rest.MAX_BODY)
        except trio.TooSlowError:
            raise SourceUnavailable(f"{self.where}: no answer to {path} in time") from None
        except TransportError as exc:
            raise SourceUnavailable(f"{self.where}: {path}: {exc}") from None
        except HttpError as exc:
            raise SourceError(f"{self.where}: {path}: {exc}") from None

    def _refused(self, path: str, code: int, exc: rest.LiteralError) -> SourceError:
        if code >= 500:
            return SourceUnavailable(f"{self.where}: {path}: HTTP {code} (module error)")
        return SourceError(f"{self.where}: {path}: malformed answer refused (HTTP {code}): {exc}")

    async def available(self) -> int:
        code, body = await self._post("/available_keys", b"", self.timeout)
        try:
            count = rest.read_available(body)
        except rest.LiteralError as exc:
            raise self._refused("/available_keys", code, exc) from None
        if code != 200:
            raise SourceError(f"{self.where}: /available_keys answered HTTP {code}")
        return count

    async def open(self, request: rest.OpenRequest) -> str:
        """The KSID of the stream (the one asked, if any); typed errors otherwise."""
        path = "/open_connect"
        code, body = await self._post(path, rest.encode_open(request), self.timeout + OPEN_EXTRA)
        try:
            answer = rest.read_open(body)
        except rest.LiteralError as exc:
            raise self._refused(path, code, exc) from None
        where = f"{self.where}: OPEN_CONNECT status {answer.status} (HTTP {code})"
        if answer.status == rest.SUCCESSFUL and code == 200:
            if answer.ksid is None:
                raise SourceError(f"{where}: no Key_stream_ID")
            if request.ksid is not None and answer.ksid != request.ksid:
                raise SourceError(f"{where}: answered another Key_stream_ID")
            return answer.ksid
        if answer.status == rest.NO_QKD_CONNECTION:
            raise SourceUnavailable(
                f"{where}: no QKD connection (peer module unreachable, or the module already "
                "holds a stream: it serves one at a time)"
            )
        raise SourceError(f"{where}: not a valid OPEN_CONNECT answer")

    async def get_key(self, ksid: str, index: int) -> rest.KeyAnswer:
        """Status 0 with a key, or status 1 (`key` None); anything else raises."""
        path = "/get_key"
        body_out = rest.encode_get_key(rest.GetKeyRequest(ksid, index))
        code, body = await self._post(path, body_out, self.timeout)
        try:
            answer = rest.read_get_key(body, max_key=self.max_key)
        except rest.LiteralError as exc:
            raise self._refused(path, code, exc) from None
        if answer.status == rest.SUCCESSFUL and code == 200 and answer.key is not None:
            return answer
        if answer.status == rest.INSUFFICIENT_KEY and answer.key is None:
            return answer
        raise SourceError(f"{self.where}: GET_KEY status {answer.status} (HTTP {code}) refused")

    async def close(self, ksid: str) -> int:
        code, body = await self._post("/close", rest.encode_close(ksid), self.timeout)
        try:
            return rest.read_close(body)
        except rest.LiteralError as exc:
            raise self._refused("/close", code, exc) from None
