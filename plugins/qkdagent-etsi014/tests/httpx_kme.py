"""An httpx client (with a mock transport) in the shape of the core's `HttpClient`, so unit
tests can script a KME's answers per request without sockets. Real-socket tests use the
source's own client."""

from __future__ import annotations

import math
from collections.abc import Sequence

import httpx
import trio

from qkdagent import ConnectFailed, EncodedReply, HttpReply, ReplyTooLarge, TransportError


class HttpxKme:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def request(
        self,
        method: str,
        base_url: str,
        target: str,
        body: bytes | None = None,
        *,
        headers: Sequence[tuple[str, str]] = (),
        limit: int,
        exchange_timeout: float | None = None,
        wait_timeout: float | None = None,
    ) -> HttpReply:
        """(No bound on connections here: `wait_timeout` is never reached.)"""
        with trio.fail_after(math.inf if exchange_timeout is None else exchange_timeout):
            return await self._exchange(method, base_url + target, body, headers, limit)

    async def _exchange(
        self, method: str, url: str, body: bytes | None, headers: Sequence[tuple[str, str]],
        limit: int,
    ) -> HttpReply:  # fmt: skip
        request = self.client.build_request(method, url, content=body, headers=dict(headers))
        try:
            response = await self.client.send(request, stream=True)
        except httpx.ConnectError as exc:
            raise ConnectFailed(str(exc)) from None
        except httpx.HTTPError as exc:
            raise TransportError(str(exc)) from None
        try:
            encoding = response.headers.get("content-encoding", "identity").lower()
            if encoding != "identity":
                raise EncodedReply(f"reply has a content encoding ({encoding!r}), not asked for")
            data = bytearray()
            async for chunk in response.aiter_raw():
                data += chunk
                if len(data) > limit:
                    raise ReplyTooLarge(f"reply larger than {limit} bytes")
            return HttpReply(response.status_code, bytes(data))
        except httpx.HTTPError as exc:
            raise TransportError(str(exc)) from None
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()
