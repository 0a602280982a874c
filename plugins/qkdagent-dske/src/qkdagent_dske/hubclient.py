"""HTTP calls to one security hub, with a kept-open connection pool and bounded reads.

Only transport: signing, checking and PSRD bookkeeping are the source's (`source.py`). Every
answer is read up to a limit without decompression (`identity` asked for, raw bytes read), so a
hostile hub cannot make the client buffer more than `limit` bytes.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from . import wire


class HubDown(Exception):
    """The hub could not be reached, timed out or broke the HTTP exchange."""


@dataclass(frozen=True)
class HubReply:
    status: int
    body: bytes = field(repr=False)
    """Hidden from reprs: a PSRD refill answer carries the block's bytes."""
    signature: str | None


def client_ssl_context(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key else None)
    return context


class HubClient:
    def __init__(
        self,
        name: str,
        url: str,
        *,
        ssl_context: ssl.SSLContext | None,
        timeout: float,
    ) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(
            verify=ssl_context if ssl_context is not None else True,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=8),
            headers={"accept-encoding": "identity"},
            trust_env=False,
        )

    def __repr__(self) -> str:
        return f"<HubClient {self.name} {self.url}>"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def call(
        self,
        method: str,
        path: str,
        *,
        query: bytes = b"",
        body: bytes | None = None,
        signature: str | None = None,
        limit: int = wire.MAX_BODY,
    ) -> HubReply:
        url = f"{self.url}/dske/{path}" + (f"?{query.decode('ascii')}" if query else "")
        headers = {}
        if signature is not None:
            headers[wire.SIGNATURE_HEADER] = signature
        if body is not None:
            headers["content-type"] = "application/json"
        try:
            async with self._http.stream(method, url, content=body, headers=headers) as response:
                data = bytearray()
                async for chunk in response.aiter_raw():
                    data += chunk
                    if len(data) > limit:
                        raise HubDown(f"hub {self.name}: the answer is larger than {limit} bytes")
                return HubReply(
                    response.status_code,
                    bytes(data),
                    response.headers.get(wire.SIGNATURE_HEADER),
                )
        except httpx.HTTPError as exc:
            raise HubDown(f"hub {self.name}: {type(exc).__name__}") from None
        except ssl.SSLError as exc:
            raise HubDown(f"hub {self.name}: TLS: {exc.reason}") from None
