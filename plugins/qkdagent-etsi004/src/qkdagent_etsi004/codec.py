"""ETSI GS QKD 004 binary frames, both dialects found in the wild (REFERENCE §2.5). Pure: no I/O.

Written by hand with `struct` because 004 fixes semantics, not a wire format: the two binary
mappings exist only as the ETSI reference C code ("v2", version 2.1.1) and the QUBIP Python port
("v1", version 1.0.1); no library implements either, and they differ in details a generic
serialiser would get wrong (fixed 256-byte vs NUL-terminated mimetype, metadata bytes in the
GET_KEY request, which responses carry QoS/metadata).

Frame: major, minor, patch, service (u8 each), payload length (u32 BE), payload. Every length is
checked against a bound before anything is allocated, every decoder consumes its payload exactly
(trailing bytes are an error), and every failure is a `FrameError`.
"""

from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass, field

HEADER = struct.Struct("!BBBBI")
U32 = struct.Struct("!I")
QOS_INTS = struct.Struct("!7I")
UINT32_MAX = 0xFFFFFFFF

MIMETYPE_V1_SIZE = 256
"""v1: the mimetype is always 256 bytes, NUL-padded."""
MAX_MIMETYPE = 255
"""v2: at most 255 characters plus the terminating NUL (MIMETYPE_MAX in the C models.h)."""
MAX_URI = 1024
MAX_KEY_CHUNK = 8192
"""Largest key chunk accepted (65,536 bits), in bytes."""
MAX_METADATA = 65536
MAX_REQUEST_PAYLOAD = 16 + 4 + 4 + MAX_METADATA
"""The largest request: a v2 GET_KEY with a full metadata buffer (OPEN is ~2.3 KiB at most)."""
MAX_RESPONSE_PAYLOAD = 4 + 4 + 4 + MAX_KEY_CHUNK + 4 + MAX_METADATA
NULL_KSID = bytes(16)


class FrameError(ValueError):
    """Bytes that are not a well-formed 004 frame of the expected kind (never echoes them)."""


class Dialect(enum.Enum):
    V1 = "binary-v1"
    V2 = "binary-v2"

    @property
    def version(self) -> tuple[int, int, int]:
        return (1, 0, 1) if self is Dialect.V1 else (2, 1, 1)

    @classmethod
    def from_major(cls, major: int) -> Dialect:
        if major == 1:
            return cls.V1
        if major == 2:
            return cls.V2
        raise FrameError(f"unknown protocol version {major}.x")


class Service(enum.IntEnum):
    ERROR = 0x00
    OPEN_CONNECT_REQUEST = 0x02
    OPEN_CONNECT_RESPONSE = 0x03
    GET_KEY_REQUEST = 0x04
    GET_KEY_RESPONSE = 0x05
    CLOSE_REQUEST = 0x08
    CLOSE_RESPONSE = 0x09
    CLOSE_SERVER = 0xFF


REQUESTS = (Service.OPEN_CONNECT_REQUEST, Service.GET_KEY_REQUEST, Service.CLOSE_REQUEST)


class Status(enum.IntEnum):
    """REFERENCE §2.3. 1 is a success (first side of OPEN_CONNECT), 3 the GET_KEY failure."""

    SUCCESSFUL = 0
    PEER_NOT_CONNECTED = 1
    INSUFFICIENT_KEY = 2
    GET_KEY_PEER_NOT_CONNECTED = 3
    NO_QKD_CONNECTION = 4
    KSID_IN_USE = 5
    TIMEOUT = 6
    QOS_NOT_SATISFIABLE = 7
    METADATA_TOO_SMALL = 8


@dataclass(frozen=True)
class Header:
    version: tuple[int, int, int]
    service: int
    length: int

    @property
    def dialect(self) -> Dialect:
        return Dialect.from_major(self.version[0])


@dataclass(frozen=True)
class QoS:
    key_chunk_size: int = 32
    max_bps: int = 0
    min_bps: int = 0
    jitter: int = 0
    priority: int = 0
    timeout: int = 0
    """Milliseconds."""
    ttl: int = 0
    """Seconds."""
    metadata_mimetype: str = "application/json"


@dataclass(frozen=True)
class OpenConnectRequest:
    source: str
    destination: str
    qos: QoS
    ksid: bytes = NULL_KSID


@dataclass(frozen=True)
class OpenConnectResponse:
    status: int
    qos: QoS | None = None
    """None when the (v1) module sent the status alone."""
    ksid: bytes = NULL_KSID


@dataclass(frozen=True)
class GetKeyRequest:
    ksid: bytes
    index: int
    metadata_size: int = 1024
    """v1: capacity only. v2: the size of `metadata`, sent as bytes."""
    metadata: bytes = b""
    """v2 only: the request metadata (the C fork reads key_type, key_role: 00 00 = symmetric)."""


@dataclass(frozen=True)
class GetKeyResponse:
    status: int
    index: int = 0
    key: bytes = field(default=b"", repr=False)
    metadata: bytes = b""
    required_metadata_size: int = 0
    """Status 8: the metadata size the module needs."""


@dataclass(frozen=True)
class CloseRequest:
    ksid: bytes


@dataclass(frozen=True)
class CloseResponse:
    status: int


Message = (
    OpenConnectRequest
    | OpenConnectResponse
    | GetKeyRequest
    | GetKeyResponse
    | CloseRequest
    | CloseResponse
)


# -- header -------------------------------------------------------------------------------


def encode_header(dialect: Dialect, service: int, length: int) -> bytes:
    return HEADER.pack(*dialect.version, service, length)


def decode_header(data: bytes, *, max_length: int) -> Header:
    """The 8-byte header; the length is refused above `max_length` before any payload is read."""
    if len(data) != HEADER.size:
        raise FrameError(f"truncated header ({len(data)} of {HEADER.size} bytes)")
    major, minor, patch, service, length = HEADER.unpack(data)
    Dialect.from_major(major)
    if length > max_length:
        raise FrameError(f"payload length {length} exceeds the bound of {max_length} bytes")
    return Header((major, minor, patch), service, length)


# -- payload pieces -----------------------------------------------------------------------


class Reader:
    """A cursor over one payload: every read is bounds-checked."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.at = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.at + n > len(self.data):
            raise FrameError(f"truncated payload: {what} needs {n} bytes")
        chunk = bytes(self.data[self.at : self.at + n])
        self.at += n
        return chunk

    def u32(self, what: str) -> int:
        value: int = U32.unpack(self.take(4, what))[0]
        return value

    def sized(self, what: str, bound: int) -> bytes:
        size = self.u32(f"{what} size")
        if size > bound:
            raise FrameError(f"{what} size {size} exceeds the bound of {bound}")
        return self.take(size, what)

    def cstring(self, what: str, bound: int) -> str:
        view = self.data[self.at : self.at + bound + 1]
        end = bytes(view).find(b"\0")
        if end < 0:
            raise FrameError(f"{what} is not NUL-terminated within {bound} bytes")
        raw = self.take(end + 1, what)[:-1]
        return _text(raw, what)

    @property
    def remaining(self) -> int:
        return len(self.data) - self.at

    def done(self, what: str) -> None:
        if self.remaining:
            raise FrameError(f"{self.remaining} unexpected bytes after the {what}")


def _text(raw: bytes, what: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(f"{what} is not UTF-8") from None
    if not text.isprintable():
        raise FrameError(f"{what} contains control characters")
    return text


def _cstring(text: str, what: str, bound: int) -> bytes:
    raw = text.encode("utf-8")
    if b"\0" in raw or len(raw) > bound:
        raise FrameError(f"{what} must be at most {bound} bytes without NUL")
    return raw + b"\0"


def _check_u32(value: int, what: str) -> int:
    if not 0 <= value <= UINT32_MAX:
        raise FrameError(f"{what} {value} is not a uint32")
    return value


def encode_qos(dialect: Dialect, qos: QoS) -> bytes:
    ints = (
        qos.key_chunk_size,
        qos.max_bps,
        qos.min_bps,
        qos.jitter,
        qos.priority,
        qos.timeout,
        qos.ttl,
    )
    head = QOS_INTS.pack(*(_check_u32(v, "QoS field") for v in ints))
    if dialect is Dialect.V1:
        raw = qos.metadata_mimetype.encode("utf-8")
        if b"\0" in raw or len(raw) > MIMETYPE_V1_SIZE:
            raise FrameError(f"mimetype must be at most {MIMETYPE_V1_SIZE} bytes without NUL")
        return head + raw.ljust(MIMETYPE_V1_SIZE, b"\0")
    return head + _cstring(qos.metadata_mimetype, "mimetype", MAX_MIMETYPE)


def decode_qos(dialect: Dialect, reader: Reader) -> QoS:
    ints = QOS_INTS.unpack(reader.take(QOS_INTS.size, "QoS"))
    if dialect is Dialect.V1:
        raw = reader.take(MIMETYPE_V1_SIZE, "mimetype").split(b"\0", 1)[0]
        mimetype = _text(raw, "mimetype")
    else:
        mimetype = reader.cstring("mimetype", MAX_MIMETYPE)
    a, b, c, d, e, f, g = ints
    return QoS(a, b, c, d, e, f, g, mimetype)


def _ksid(value: bytes) -> bytes:
    if len(value) != 16:
        raise FrameError("a Key_stream_ID is 16 bytes")
    return value


# -- messages -----------------------------------------------------------------------------


def encode_payload(dialect: Dialect, message: Message) -> tuple[Service, bytes]:
    """The service byte and payload of `message` in `dialect`."""
    if isinstance(message, OpenConnectRequest):
        body = (
            _cstring(message.source, "source URI", MAX_URI)
            + _cstring(message.destination, "destination URI", MAX_URI)
            + encode_qos(dialect, message.qos)
            + _ksid(message.ksid)
        )
        return Service.OPEN_CONNECT_REQUEST, body
    if isinstance(message, OpenConnectResponse):
        body = U32.pack(_check_u32(message.status, "status"))
        if message.qos is not None:
            body += encode_qos(dialect, message.qos) + _ksid(message.ksid)
        elif dialect is Dialect.V2:
            raise FrameError("a v2 OPEN_CONNECT response always carries QoS and KSID")
        return Service.OPEN_CONNECT_RESPONSE, body
    if isinstance(message, GetKeyRequest):
        body = _ksid(message.ksid) + U32.pack(_check_u32(message.index, "index"))
        if dialect is Dialect.V1:
            body += U32.pack(_check_u32(message.metadata_size, "metadata size"))
        else:
            if len(message.metadata) > MAX_METADATA:
                raise FrameError("request metadata too large")
            body += U32.pack(len(message.metadata)) + message.metadata
        return Service.GET_KEY_REQUEST, body
    if isinstance(message, GetKeyResponse):
        return Service.GET_KEY_RESPONSE, _encode_get_key_response(dialect, message)
    if isinstance(message, CloseRequest):
        return Service.CLOSE_REQUEST, _ksid(message.ksid)
    if isinstance(message, CloseResponse):
        return Service.CLOSE_RESPONSE, U32.pack(_check_u32(message.status, "status"))
    raise TypeError(f"not a 004 message: {type(message).__name__}")


def _encode_get_key_response(dialect: Dialect, m: GetKeyResponse) -> bytes:
    status = U32.pack(_check_u32(m.status, "status"))
    index = U32.pack(_check_u32(m.index, "index"))
    if len(m.key) > MAX_KEY_CHUNK or len(m.metadata) > MAX_METADATA:
        raise FrameError("key or metadata too large")
    if m.status == Status.METADATA_TOO_SMALL:
        required = U32.pack(_check_u32(m.required_metadata_size, "metadata size"))
        # v1: status and required size only; v2 (our convention, the C code never sends 8): the
        # usual fields with an empty key and the required size where the metadata size goes
        return (
            status + required if dialect is Dialect.V1 else status + index + U32.pack(0) + required
        )
    if dialect is Dialect.V1 and m.status != Status.SUCCESSFUL:
        return status
    return status + index + U32.pack(len(m.key)) + m.key + U32.pack(len(m.metadata)) + m.metadata


def encode(dialect: Dialect, message: Message) -> bytes:
    """A whole frame: header plus payload."""
    service, body = encode_payload(dialect, message)
    return encode_header(dialect, service, len(body)) + body


def decode_request(dialect: Dialect, service: int, payload: bytes) -> Message:
    """A module's view of a client frame; `service` must be one of the three requests."""
    reader = Reader(payload)
    if service == Service.OPEN_CONNECT_REQUEST:
        source = reader.cstring("source URI", MAX_URI)
        destination = reader.cstring("destination URI", MAX_URI)
        qos = decode_qos(dialect, reader)
        ksid = reader.take(16, "Key_stream_ID")
        reader.done("OPEN_CONNECT request")
        return OpenConnectRequest(source, destination, qos, ksid)
    if service == Service.GET_KEY_REQUEST:
        ksid = reader.take(16, "Key_stream_ID")
        index = reader.u32("index")
        if dialect is Dialect.V1:
            size, metadata = reader.u32("metadata size"), b""
        else:
            metadata = reader.sized("metadata", MAX_METADATA)
            size = len(metadata)
        reader.done("GET_KEY request")
        return GetKeyRequest(ksid, index, size, metadata)
    if service == Service.CLOSE_REQUEST:
        ksid = reader.take(16, "Key_stream_ID")
        reader.done("CLOSE request")
        return CloseRequest(ksid)
    raise FrameError(f"service 0x{service:02x} is not a request")


def decode_response(dialect: Dialect, service: int, payload: bytes) -> Message:
    """A client's view of a module frame."""
    reader = Reader(payload)
    if service == Service.ERROR:
        raise FrameError("the module answered with an error frame (service 0x00)")
    if service == Service.OPEN_CONNECT_RESPONSE:
        status = reader.u32("status")
        if dialect is Dialect.V1 and reader.remaining == 0:
            return OpenConnectResponse(status)
        qos = decode_qos(dialect, reader)
        ksid = reader.take(16, "Key_stream_ID")
        reader.done("OPEN_CONNECT response")
        return OpenConnectResponse(status, qos, ksid)
    if service == Service.GET_KEY_RESPONSE:
        return _decode_get_key_response(dialect, reader)
    if service == Service.CLOSE_RESPONSE:
        status = reader.u32("status")
        reader.done("CLOSE response")
        return CloseResponse(status)
    raise FrameError(f"service 0x{service:02x} is not a response")


def _decode_get_key_response(dialect: Dialect, reader: Reader) -> GetKeyResponse:
    status = reader.u32("status")
    if dialect is Dialect.V1 and status == Status.METADATA_TOO_SMALL:
        required = reader.u32("required metadata size")
        reader.done("GET_KEY response")
        return GetKeyResponse(status, required_metadata_size=required)
    if dialect is Dialect.V1 and status != Status.SUCCESSFUL and reader.remaining == 0:
        return GetKeyResponse(status)
    index = reader.u32("index")
    key = reader.sized("key", MAX_KEY_CHUNK)
    if status == Status.METADATA_TOO_SMALL:
        required = reader.u32("required metadata size")
        reader.done("GET_KEY response")
        return GetKeyResponse(status, index, key, required_metadata_size=required)
    metadata = reader.sized("metadata", MAX_METADATA)
    reader.done("GET_KEY response")
    return GetKeyResponse(status, index, key, metadata)


def ksid_text(ksid: bytes) -> str:
    return str(uuid.UUID(bytes=ksid))


def parse_key_id(key_id: str) -> tuple[bytes, int] | None:
    """`KSID:index` (UUID text, decimal uint32) as this source hands it out; None if not."""
    head, sep, tail = key_id.partition(":")
    if not sep or len(head) != 36 or not tail.isdigit() or not tail.isascii() or len(tail) > 10:
        return None
    try:
        ksid = uuid.UUID(head).bytes
    except ValueError:
        return None
    index = int(tail)
    if index > UINT32_MAX or ksid == NULL_KSID or str(uuid.UUID(bytes=ksid)) != head:
        return None
    return ksid, index


def key_id(ksid: bytes, index: int) -> str:
    return f"{ksid_text(ksid)}:{index}"
