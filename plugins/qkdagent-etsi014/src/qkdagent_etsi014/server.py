"""Serving simulated KMEs with hypercorn over HTTPS with mutual TLS, inside a trio nursery.

hypercorn's `serve()` does not hand the client certificate to the application, and the SAE ID
must come from it. So each KME accepts TCP connections itself, completes the TLS handshake
(client certificate required, verified against the CA), derives the SAE ID from the certificate
once per connection and then gives the connection to hypercorn's trio `TCPServer` with an ASGI app
bound to that identity. A connection that fails the handshake never reaches the app.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState

from .app import KmeApp
from .identity import IdentityRule

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0


def server_ssl_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """TLS ≥ 1.2, client certificate required and verified against `ca`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


def _hypercorn_config() -> HypercornConfig:
    config = HypercornConfig()
    config.keep_alive_max_requests = 1 << 30
    config.keep_alive_timeout = 30
    config.accesslog = None
    config.errorlog = None
    return config


@dataclass
class KmeServer:
    """One KME listening on a TCP port."""

    app: KmeApp
    ssl_context: ssl.SSLContext
    identity: IdentityRule
    host: str = "127.0.0.1"
    port: int = 0

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, report the bound port through `task_status`, then serve until cancelled."""
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        port = listeners[0].socket.getsockname()[1]
        config = _hypercorn_config()
        context = WorkerContext(None)
        async with trio.open_nursery() as nursery:
            handler = partial(self._connection, config, context)
            task_status.started(port)
            await trio.serve_listeners(handler, listeners, handler_nursery=nursery)

    async def _connection(
        self, config: HypercornConfig, context: WorkerContext, stream: trio.SocketStream
    ) -> None:
        tls = trio.SSLStream(stream, self.ssl_context, server_side=True, https_compatible=True)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await tls.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError):
            log.debug("KME %s: TLS handshake refused or timed out", self.app.kme_id)
            await trio.aclose_forcefully(tls)
            return
        caller = self._identify(tls.getpeercert(binary_form=True))
        app = self.app

        async def asgi(scope: dict[str, Any], receive: Callable, send: Callable) -> None:
            await app(scope, receive, send, caller)

        await TCPServer(ASGIWrapper(asgi), config, context, ConnectionState({}), tls)

    def _identify(self, der: bytes | None) -> str | None:
        try:
            return self.identity.identify(der)
        except ValueError:
            return None
