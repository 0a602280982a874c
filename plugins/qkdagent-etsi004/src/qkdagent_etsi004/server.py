"""One simulated QKD module serving 004 frames over mutual TLS (trio), both binary dialects.

The dialect is read from each frame's version byte. Nothing a client sends stops the server: a
failed handshake, an unknown service, an unauthenticated CLOSE_SERVER (0xFF), a malformed or
oversized frame each get an error frame (service 0x00) where the byte stream is still in step, the
connection is closed where it is not, and the next connection is served as usual.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from pathlib import Path

import trio
from cryptography import x509
from cryptography.x509.oid import NameOID

from qkdagent import load_tls_identity

from . import codec
from .codec import Dialect, FrameError, Service, Status
from .network import ModuleNetwork, Wait
from .transport import FrameReader, TransportError

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 600.0
"""A connection with no frame started for this long is closed."""
FRAME_TIMEOUT = 10.0
"""A frame once started must arrive whole within this (slow senders are cut off)."""
MAX_CONNECTIONS = 2048


def server_ssl_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    load_tls_identity(context, cert, key, what="qkdm-sim")
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def common_name(der: bytes | None) -> str | None:
    if not der:
        return None
    names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if len(names) == 1 else None
    return value if isinstance(value, str) and value else None


def _clean(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:80]


class ModuleServer:
    """Module `module_id` of `network`, listening on (host, port)."""

    def __init__(
        self,
        network: ModuleNetwork,
        module_id: str,
        context: ssl.SSLContext,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        v1_status_one: bool = False,
        close_after_request: bool = False,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.network = network
        self.module_id = module_id
        self.context = context
        self.host = host
        self.port = port
        self.v1_status_one = v1_status_one
        """False (the v1 dialect as observed): a first OPEN_CONNECT answers 0, never 1."""
        self.close_after_request = close_after_request
        """True: like the ETSI reference module, close (close_notify, FIN) after each answer."""
        self.accepted = 0
        self.refused_frames = 0
        self.frame_timeout = FRAME_TIMEOUT
        self._connections: set[trio.CancelScope] = set()
        self._on_event = on_event

    def _event(self, text: str) -> None:
        log.info("qkdm-sim %s: %s", self.module_id, text)
        if self._on_event is not None:
            self._on_event(text)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    def disconnect(self) -> None:
        """Drop every connection (no close_notify), keeping the streams."""
        for scope in list(self._connections):
            scope.cancel()

    def restart(self) -> None:
        """Drop every connection and all the module's streams (a module restart)."""
        self.disconnect()
        self.network.restart(self.module_id)
        self._event("restarted: every stream and connection dropped")

    async def _handle(self, tcp: trio.SocketStream) -> None:
        if len(self._connections) >= MAX_CONNECTIONS:
            await trio.aclose_forcefully(tcp)
            return
        with trio.CancelScope() as scope:
            self._connections.add(scope)
            try:
                await self._serve(tcp)
            finally:
                self._connections.discard(scope)
                await trio.aclose_forcefully(tcp)

    async def _serve(self, tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, self.context, server_side=True)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await stream.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError, OSError) as exc:
            self._event(f"TLS handshake failed ({type(exc).__name__})")
            return
        app = common_name(stream.getpeercert(binary_form=True)) or "?"
        self.accepted += 1
        self._event(f"connection from application {_clean(app)!r}")
        reader = FrameReader(stream, max_length=codec.MAX_REQUEST_PAYLOAD)
        try:
            while await self._one_frame(stream, reader, app):
                if self.close_after_request:
                    with trio.move_on_after(HANDSHAKE_TIMEOUT):
                        await stream.aclose()  # close_notify, then the socket
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError, TransportError, OSError):
            pass
        self._event(f"connection from {_clean(app)!r} closed")

    async def _one_frame(self, stream: trio.abc.SendStream, reader: FrameReader, app: str) -> bool:
        """Serve one frame; False when the connection should end."""
        # one cancel scope per frame (they cost): idle until a frame starts, then its deadline
        with trio.CancelScope(deadline=trio.current_time() + IDLE_TIMEOUT) as scope:
            if not reader.buffer and not await reader.receive_more():
                return False
            scope.deadline = trio.current_time() + self.frame_timeout
            try:
                header, payload = await reader.frame()
            except FrameError as exc:
                self._refuse(app, str(exc))
                await self._send_error(stream, Dialect.V2)
                return False
        if scope.cancelled_caught:
            if reader.buffer:
                self._refuse(app, "frame not received within the timeout")
            return False
        dialect = header.dialect
        if header.service == Service.CLOSE_SERVER:
            self._refuse(app, "CLOSE_SERVER (0xFF) ignored: the server is not stopped by clients")
            await self._send_error(stream, dialect)
            return True
        if header.service not in codec.REQUESTS:
            self._refuse(app, f"unknown service 0x{header.service:02x}")
            await self._send_error(stream, dialect)
            return True
        try:
            request = codec.decode_request(dialect, header.service, payload)
        except FrameError as exc:
            self._refuse(app, str(exc))
            await self._send_error(stream, dialect)
            return True
        response = await self._answer(dialect, app, request)
        await stream.send_all(codec.encode(dialect, response))
        return True

    async def _answer(self, dialect: Dialect, app: str, request: codec.Message) -> codec.Message:
        module = self.module_id
        if isinstance(request, codec.OpenConnectRequest):
            response = self.network.open_connect(module, app, request)
            if dialect is Dialect.V1 and response.status == Status.PEER_NOT_CONNECTED:
                if not self.v1_status_one:
                    response = codec.OpenConnectResponse(Status.SUCCESSFUL, *_rest(response))
            if dialect is Dialect.V1 and response.status not in (0, 1, 7):
                response = codec.OpenConnectResponse(response.status)
            self._event(
                f"OPEN_CONNECT by {_clean(app)!r}: status {response.status} KSID "
                f"{codec.ksid_text(response.ksid) if response.qos else '-'}"
            )
            return response
        if isinstance(request, codec.GetKeyRequest):
            deadline = trio.current_time() + 60.0
            while True:
                answer = self.network.get_key(module, app, request)
                if not isinstance(answer, Wait):
                    return answer
                if trio.current_time() + answer.seconds > deadline:
                    return codec.GetKeyResponse(Status.TIMEOUT, request.index)
                await trio.sleep(answer.seconds)
        if isinstance(request, codec.CloseRequest):
            closed = self.network.close(module, app, request)
            self._event(f"CLOSE by {_clean(app)!r}: status {closed.status}")
            return closed
        raise AssertionError(type(request))

    def _refuse(self, app: str, why: str) -> None:
        self.refused_frames += 1
        self._event(f"refused a frame from {_clean(app)!r}: {why}")

    async def _send_error(self, stream: trio.abc.SendStream, dialect: Dialect) -> None:
        try:
            await stream.send_all(codec.encode_header(dialect, Service.ERROR, 0))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _rest(response: codec.OpenConnectResponse) -> tuple[codec.QoS | None, bytes]:
    return response.qos, response.ksid
