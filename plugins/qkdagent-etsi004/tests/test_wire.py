"""Byte-exact frames of both dialects (REFERENCE §2.5), each direction, against hand-written hex
and against transcriptions of the two real peers' parsing code (QUBIP `client/client.py` for v1,
the ETSI reference C `serializers.c` for v2), then bounds and typed errors."""

from __future__ import annotations

import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qkdagent_etsi004 import codec
from qkdagent_etsi004.codec import Dialect, FrameError, QoS

QOS = QoS(32, 40000, 5000, 10, 0, 5000, 3600, "application/json")
QOS_HEX = "00000020 00009c40 00001388 0000000a 00000000 00001388 00000e10"
KSID = bytes.fromhex("0123456789abcdef0123456789abcdef")


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def mime_v1() -> bytes:
    return b"application/json".ljust(256, b"\0")


def test_v2_open_connect_request_bytes() -> None:
    payload = b"client://a\0server://b\0" + h(QOS_HEX) + b"application/json\0" + bytes(16)
    expected = h("02 01 01 02") + struct.pack("!I", len(payload)) + payload
    req = codec.OpenConnectRequest("client://a", "server://b", QOS)
    assert codec.encode(Dialect.V2, req) == expected
    header = codec.decode_header(expected[:8], max_length=codec.MAX_REQUEST_PAYLOAD)
    assert (header.version, header.service, header.length) == ((2, 1, 1), 2, len(payload))
    assert codec.decode_request(Dialect.V2, header.service, expected[8:]) == req


def test_v1_open_connect_request_bytes() -> None:
    payload = b"client://a\0server://b\0" + h(QOS_HEX) + mime_v1() + bytes(16)
    assert len(payload) == 22 + 28 + 256 + 16
    expected = h("01 00 01 02") + struct.pack("!I", len(payload)) + payload
    req = codec.OpenConnectRequest("client://a", "server://b", QOS)
    assert codec.encode(Dialect.V1, req) == expected
    assert codec.decode_request(Dialect.V1, 2, expected[8:]) == req


def test_get_key_requests_differ_between_dialects() -> None:
    v1 = codec.encode(Dialect.V1, codec.GetKeyRequest(KSID, 7, 1024))
    assert v1 == h("01 00 01 04 00000018") + KSID + h("00000007 00000400")
    v2 = codec.encode(Dialect.V2, codec.GetKeyRequest(KSID, 7, 2, b"\0\0"))
    assert v2 == h("02 01 01 04 0000001a") + KSID + h("00000007 00000002 0000")


def test_close_frames() -> None:
    assert codec.encode(Dialect.V2, codec.CloseRequest(KSID)) == h("02010108 00000010") + KSID
    assert codec.encode(Dialect.V1, codec.CloseResponse(0)) == h("01000109 00000004 00000000")


# -- what the real clients would read from our simulator's answers -------------------------


def qubip_parse_open(response: bytes) -> tuple[int, uuid.UUID | None, dict[str, object]]:
    """QUBIP client.parse_open_connect_response + parse_qos, transcribed."""
    length = struct.unpack("!I", response[4:8])[0]
    payload = response[8 : 8 + length]
    status = struct.unpack("!I", payload[:4])[0]
    if status in (0, 7):
        qos_data = payload[4 : 4 + 28 + 256]
        fields = struct.unpack("!7I", qos_data[:28])
        mimetype = qos_data[28:].decode().strip("\x00")
        ksid = uuid.UUID(bytes=payload[4 + 28 + 256 : 4 + 28 + 256 + 16])
        return status, ksid, {"fields": fields, "mime": mimetype}
    return status, None, {}


def qubip_parse_get_key(response: bytes) -> tuple[int, bytes, str]:
    """QUBIP client.parse_get_key_response, transcribed."""
    length = struct.unpack("!I", response[4:8])[0]
    payload = response[8 : 8 + length]
    status = struct.unpack("!I", payload[:4])[0]
    if status != 0:
        return status, b"", ""
    chunk = struct.unpack("!I", payload[8:12])[0]
    key = payload[12 : 12 + chunk]
    msize = struct.unpack("!I", payload[12 + chunk : 16 + chunk])[0]
    return status, key, payload[16 + chunk : 16 + chunk + msize].decode()


def test_v1_answers_parse_in_the_qubip_client() -> None:
    frame = codec.encode(Dialect.V1, codec.OpenConnectResponse(0, QOS, KSID))
    status, ksid, qos = qubip_parse_open(frame)
    assert (status, ksid, qos["mime"]) == (0, uuid.UUID(bytes=KSID), "application/json")
    assert qos["fields"] == (32, 40000, 5000, 10, 0, 5000, 3600)
    key = bytes(range(1, 33))
    frame = codec.encode(Dialect.V1, codec.GetKeyResponse(0, 5, key, b'{"age":3,"hops":0}'))
    assert qubip_parse_get_key(frame) == (0, key, '{"age":3,"hops":0}')
    assert codec.encode(Dialect.V1, codec.GetKeyResponse(2, 5)) == h("01000105 00000004 00000002")
    eight = codec.GetKeyResponse(8, 5, required_metadata_size=33)
    assert codec.encode(Dialect.V1, eight) == h("01000105 00000008 00000008 00000021")


def c_get_key_response_from_stream(payload: bytes) -> tuple[int, int, bytes, bytes]:
    """qkd_get_key_response_from_stream (serializers.c), transcribed: u32 status, u32 index,
    u32-sized key, u32-sized metadata."""
    status, index, size = struct.unpack("!III", payload[:12])
    key = payload[12 : 12 + size]
    (msize,) = struct.unpack("!I", payload[12 + size : 16 + size])
    return status, index, key, payload[16 + size : 16 + size + msize]


def test_v2_answers_parse_in_the_c_reference() -> None:
    key = bytes(range(1, 33))
    frame = codec.encode(Dialect.V2, codec.GetKeyResponse(0, 9, key, b"{}"))
    assert frame[:4] == h("02 01 01 05")
    assert c_get_key_response_from_stream(frame[8:]) == (0, 9, key, b"{}")
    frame = codec.encode(Dialect.V2, codec.OpenConnectResponse(1, QOS, KSID))
    assert frame[8:] == h("00000001") + h(QOS_HEX) + b"application/json\0" + KSID


def test_c_reference_answers_decode() -> None:
    """What the C server sends: a NUL-terminated, non-JSON metadata string is accepted as bytes."""
    meta = b'{"device_info": ["key_rate": 32768, "qber": 0.490000]}\0'
    key = bytes(range(1, 33))
    payload = struct.pack("!III", 0, 3, 32) + key + struct.pack("!I", len(meta)) + meta
    answer = codec.decode_response(Dialect.V2, 5, payload)
    assert answer == codec.GetKeyResponse(0, 3, key, meta)


# -- typed errors and bounds ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (h("03000102 00000000"), "version"),
        (h("02010102 7fffffff"), "exceeds"),
        (h("020101"), "truncated"),
    ],
)
def test_bad_headers_are_frame_errors(header: bytes, why: str) -> None:
    with pytest.raises(FrameError, match=why):
        codec.decode_header(header, max_length=codec.MAX_RESPONSE_PAYLOAD)


@pytest.mark.parametrize(
    "payload",
    [
        h("00000000 00000001 ffffffff"),  # key size beyond the bound
        h("00000000 00000001 00000020") + bytes(5),  # truncated key
        struct.pack("!III", 0, 1, 1) + b"k" + struct.pack("!I", 0) + b"junk",  # trailing bytes
        h("000000"),
    ],
)
def test_bad_get_key_answers_are_frame_errors(payload: bytes) -> None:
    for dialect in Dialect:
        with pytest.raises(FrameError):
            codec.decode_response(dialect, 5, payload)


def test_error_and_non_response_services_are_frame_errors() -> None:
    with pytest.raises(FrameError, match="error frame"):
        codec.decode_response(Dialect.V2, 0, b"")
    with pytest.raises(FrameError, match="not a response"):
        codec.decode_response(Dialect.V2, 0x04, b"")
    with pytest.raises(FrameError, match="not a request"):
        codec.decode_request(Dialect.V1, 0xFF, b"")


def test_unterminated_uri_is_refused() -> None:
    with pytest.raises(FrameError, match="NUL-terminated"):
        codec.decode_request(Dialect.V2, 2, b"x" * 2000)


def test_key_ids() -> None:
    text = codec.key_id(KSID, 42)
    assert text == "01234567-89ab-cdef-0123-456789abcdef:42"
    assert codec.parse_key_id(text) == (KSID, 42)
    for bad in (
        "x",
        f"{text}0000000000",
        "01234567-89ab-cdef-0123-456789abcdef:-1",
        "00000000-0000-0000-0000-000000000000:1",
        "01234567-89AB-cdef-0123-456789abcdef:1",
        "01234567-89ab-cdef-0123-456789abcdef:\u0661",
    ):
        assert codec.parse_key_id(bad) is None


qos_strategy = st.builds(
    QoS,
    *[st.integers(0, codec.UINT32_MAX)] * 7,
    metadata_mimetype=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=200),
)
ksids = st.binary(min_size=16, max_size=16)
uris = st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=60)
messages = st.one_of(
    st.builds(codec.OpenConnectRequest, uris, uris, qos_strategy, ksids),
    st.builds(codec.OpenConnectResponse, st.sampled_from([0, 1, 7]), qos_strategy, ksids),
    st.builds(codec.GetKeyRequest, ksids, st.integers(0, codec.UINT32_MAX), st.just(0)),
    st.builds(
        codec.GetKeyResponse,
        st.just(0),
        st.integers(0, 99),
        st.binary(max_size=64),
        st.binary(max_size=64),
    ),
    st.builds(codec.CloseRequest, ksids),
    st.builds(codec.CloseResponse, st.integers(0, 9)),
)


@settings(max_examples=300, derandomize=True, deadline=None, database=None)
@given(st.sampled_from(list(Dialect)), messages)
def test_round_trip(dialect: Dialect, message: codec.Message) -> None:
    frame = codec.encode(dialect, message)
    header = codec.decode_header(frame[:8], max_length=codec.MAX_RESPONSE_PAYLOAD)
    assert header.length == len(frame) - 8 and header.dialect is dialect
    decode = codec.decode_request if header.service in codec.REQUESTS else codec.decode_response
    assert decode(dialect, header.service, frame[8:]) == message
