"""Serving simulated KMEs over HTTPS with mutual TLS, inside a trio nursery.

The SAE ID must come from the client certificate, which ASGI servers do not hand to the app. So
each KME accepts TCP connections itself, completes the TLS handshake (client certificate
required, verified against the CA), derives the SAE ID from the certificate once per connection
and then serves the connection with an app bound to that identity: HTTP/1.1 with the lean h11
loop of `http1` (one task and one send per answer), HTTP/2 (ALPN "h2") with hypercorn's trio
`TCPServer`. A connection that fails the handshake never reaches the app.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import cast

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ASGIFramework, ConnectionState

from qkdagent import load_tls_identity

from .app import KmeApp, Receive, Scope, Send, body_pieces
from .http1 import Http1Connection, Http1Limits
from .identity import IdentityRule

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
HTTP1_LIMITS = Http1Limits(keep_alive_timeout=30.0, request_timeout=30.0)


class ListenError(OSError):
    """A KME's port cannot be bound (the message names the KME, address and reason)."""


def server_ssl_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """TLS ≥ 1.2, client certificate required and verified against `ca`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    load_tls_identity(context, cert, key, what="kme-sim")
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


def _hypercorn_config() -> HypercornConfig:
    config = HypercornConfig()
    config.keep_alive_max_requests = 1 << 30
    config.keep_alive_timeout = 30
    config.read_timeout = 30  # a stream that stops sending mid-request is not held for good
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
    accepted: int = 0
    """TLS connections that completed the handshake (tests check clients reuse them)."""

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, report the bound port through `task_status`, then serve until cancelled."""
        try:
            listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        except OSError as exc:  # port in use, address not local, unknown host name
            raise ListenError(
                f"KME {self.app.kme_id}: cannot listen on {self.host} port {self.port}: "
                f"{exc.strerror or exc}"
            ) from None
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
        self.accepted += 1
        caller = self._identify(tls.getpeercert(binary_form=True))
        app = self.app

        async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
            await app(scope, receive, send, caller)

        if tls.selected_alpn_protocol() == "h2":
            # KmeApp reads ASGI as plain dicts; hypercorn's TypedDict scope and events are dicts.
            framework = cast(ASGIFramework, asgi)
            await TCPServer(ASGIWrapper(framework), config, context, ConnectionState({}), tls)
            return
        try:
            server, client = stream.socket.getsockname()[:2], stream.socket.getpeername()[:2]
        except OSError:  # the peer is already gone
            await trio.aclose_forcefully(tls)
            return
        limits = replace(HTTP1_LIMITS, max_body_pieces=body_pieces(app.max_body))
        connection = Http1Connection(tls, asgi, limits=limits, server=server, client=client)
        try:
            await connection.serve()
        except Exception:  # one broken connection must not stop the KME (serve_listeners would)
            log.exception("KME %s: connection from %s failed", self.app.kme_id, client)

    def _identify(self, der: bytes | None) -> str | None:
        try:
            return self.identity.identify(der)
        except ValueError:
            return None
