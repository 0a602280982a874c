"""004 frames over TLS streams (trio): bounded reads, and a client for one QKD module.

Reading a frame takes its 8-byte header first and refuses a length over the bound before any
payload is read, so a hostile peer can make us hold at most the bound. A connection that carried
a broken frame is closed: the byte stream cannot be trusted to be in step any more.

`FrameReader` reads in large pieces and keeps what follows a frame: a request and its answer are
each one TLS record, so a frame usually costs one receive instead of two (trio's SSLStream is
pure Python; receives were a quarter of the time per GET_KEY).
"""

from __future__ import annotations

import enum
import select
import ssl
from dataclasses import dataclass

import trio

from . import codec
from .codec import Dialect, FrameError, Header


class TransportError(Exception):
    """The connection failed or closed: nothing was (certainly) delivered."""


async def read_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    """`n` bytes, or TransportError at EOF (a truncated frame)."""
    data = bytearray()
    while len(data) < n:
        chunk = await stream.receive_some(min(65536, n - len(data)))
        if not chunk:
            raise TransportError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


async def read_frame(stream: trio.abc.ReceiveStream, *, max_length: int) -> tuple[Header, bytes]:
    """One frame: header (length checked against `max_length` first), then its payload."""
    head = bytearray()
    while len(head) < codec.HEADER.size:
        chunk = await stream.receive_some(codec.HEADER.size - len(head))
        if not chunk:
            if not head:
                raise EOFError
            raise TransportError(f"connection closed inside a frame header ({len(head)} bytes)")
        head += chunk
    header = codec.decode_header(bytes(head), max_length=max_length)
    return header, await read_exactly(stream, header.length)


RECEIVE_SIZE = 65536


class FrameReader:
    """Frames from one stream, read ahead in pieces of up to RECEIVE_SIZE bytes.

    The buffer never holds more than the frame being read plus one piece: a piece is received
    only while the frame is incomplete, and a frame's length is checked before it is awaited.
    """

    def __init__(self, stream: trio.abc.ReceiveStream, *, max_length: int) -> None:
        self.stream = stream
        self.max_length = max_length
        self.buffer = bytearray()

    async def receive_more(self) -> bool:
        """Receive one more piece; False at EOF."""
        chunk = await self.stream.receive_some(RECEIVE_SIZE)
        if not chunk:
            return False
        self.buffer += chunk
        return True

    async def frame(self) -> tuple[Header, bytes]:
        """The next frame: EOFError at a clean EOF before it, TransportError inside it,
        FrameError for a bad header (its length refused before the payload is awaited)."""
        buffer = self.buffer
        size = codec.HEADER.size
        while len(buffer) < size:
            if not await self.receive_more():
                if not buffer:
                    raise EOFError
                raise TransportError(
                    f"connection closed inside a frame header ({len(buffer)} bytes)"
                )
        header = codec.decode_header(bytes(buffer[:size]), max_length=self.max_length)
        end = size + header.length
        while len(buffer) < end:
            if not await self.receive_more():
                got = len(buffer) - size
                raise TransportError(f"connection closed after {got} of {header.length} bytes")
        payload = bytes(buffer[size:end])
        del buffer[:end]
        return header, payload


PROBE_TIMEOUT = 0.5
"""Seconds a probe of an idle connection may take once the kernel says bytes are waiting (an EOF
or a close_notify record is already there: reading it does not wait)."""


class Idle(enum.Enum):
    """What an idle kept connection holds before the next request is written."""

    OPEN = "open"
    CLOSED = "closed by the module"
    UNUSABLE = "bytes nobody asked for"


def _socket(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The socket under a TLS stream over TCP; None for in-memory streams."""
    transport = getattr(stream, "transport_stream", None)
    sock = getattr(transport, "socket", None)
    return sock if isinstance(sock, trio.socket.SocketType) else None


def _waiting(sock: trio.socket.SocketType) -> bool:
    """Whether bytes or an EOF wait in the kernel for `sock` (never waits)."""
    fd = sock.fileno()
    if fd < 0:
        return True  # closed on our side: reading says so at once
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI)  # POLLHUP/POLLERR always reported
        return bool(poller.poll(0))
    readable, _, _ = select.select([fd], [], [], 0)
    return bool(readable)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    server_hostname: str


class ModuleConnection:
    """One mutually authenticated TLS connection to a module, one request at a time."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream], dialect: Dialect) -> None:
        self.stream = stream
        self.dialect = dialect
        self.broken = False
        self.answered = 0
        """Requests this connection carried to a complete answer."""
        self.answered_at = 0.0
        self.reader = FrameReader(stream, max_length=codec.MAX_RESPONSE_PAYLOAD)

    @classmethod
    async def connect(
        cls, endpoint: Endpoint, context: ssl.SSLContext, dialect: Dialect
    ) -> ModuleConnection:
        try:
            tcp = await trio.open_tcp_stream(endpoint.host, endpoint.port)
        except OSError as exc:
            raise TransportError(f"cannot connect: {exc.strerror or exc}") from None
        stream = trio.SSLStream(tcp, context, server_hostname=endpoint.server_hostname)
        try:
            await stream.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
            await trio.aclose_forcefully(tcp)
            cause = exc.__cause__ or exc
            raise TransportError(f"TLS handshake failed: {cause}") from None
        return cls(stream, dialect)

    def peer_certificate(self) -> bytes | None:
        der = self.stream.getpeercert(binary_form=True)
        return der if isinstance(der, bytes) else None

    async def call(self, message: codec.Message, expect: codec.Service) -> codec.Message:
        """Send one request and read its response; FrameError/TransportError mark it broken."""
        self.broken = True  # until the whole exchange succeeded
        try:
            await self.stream.send_all(codec.encode(self.dialect, message))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise TransportError(f"sending the request failed: {type(exc).__name__}") from None
        try:
            header, payload = await self.reader.frame()
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            how = "" if isinstance(exc, EOFError) else f" ({type(exc).__name__})"
            raise TransportError(
                f"the module closed the connection without answering{how}; the request may "
                "have been executed and is not sent again"
            ) from None
        if header.dialect is not self.dialect:
            raise FrameError(f"answer in version {'.'.join(map(str, header.version))}")
        if header.service not in (expect, codec.Service.ERROR):
            raise FrameError(f"answer has service 0x{header.service:02x}, not 0x{expect:02x}")
        if self.reader.buffer:  # one answer per request: more is a module out of step
            raise FrameError(f"{len(self.reader.buffer)} unexpected bytes after the answer")
        response = codec.decode_response(self.dialect, header.service, payload)
        self.broken = False
        self.answered += 1
        self.answered_at = trio.current_time()
        return response

    async def idle(self, grace: float = 0.0) -> Idle:
        """Whether this connection, idle since its last answer, can carry the next request.

        Writes nothing, so a connection found closed costs no request: the module cannot have
        seen one. Reads only when the kernel holds bytes or an EOF (a module closing sends
        close_notify and FIN; `receive_some` then ends at once), bounded by PROBE_TIMEOUT. With
        `grace`, waits up to that long after the last answer for such bytes to arrive: a module
        that closes after each answer may not have closed yet when the next request follows at
        once (an OPEN_CONNECT then a GET_KEY). Whatever was there, a connection not OPEN is
        marked broken. Streams without a socket (in-memory) count as OPEN.
        """
        if self.broken:
            return Idle.CLOSED
        if self.reader.buffer:
            self.broken = True
            return Idle.UNUSABLE
        sock = _socket(self.stream)
        if sock is None:
            return Idle.OPEN
        waiting = _waiting(sock)
        left = self.answered_at + grace - trio.current_time()
        if not waiting and left > 0:
            with trio.move_on_after(left):
                await trio.lowlevel.wait_readable(sock)
                waiting = True
        if not waiting:
            return Idle.OPEN
        self.broken = True
        try:
            with trio.move_on_after(PROBE_TIMEOUT):
                more = await self.reader.receive_more()
                return Idle.UNUSABLE if more else Idle.CLOSED
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return Idle.CLOSED  # EOF without close_notify, or reset
        return Idle.UNUSABLE  # part of a TLS record, or a record that is not data

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)
