"""Fuzz target for the 004 frame parser, both directions and both dialects (contrib/fuzz style).

`target(data)` feeds the bytes as a whole frame to the module side (header, then a request) and
to the client side (a response), and checks that what decodes re-encodes to a frame that decodes
to the same message. Only `FrameError` may come out.

Run: python3 contrib/fuzz/run_fuzz.py --target etsi004 (contrib/fuzz/fuzz_etsi004.py loads this
file; the REST form's parser is contrib/fuzz/fuzz_etsi004_rest.py)
"""

from __future__ import annotations

import struct

from qkdagent_etsi004 import codec
from qkdagent_etsi004.codec import Dialect, FrameError, QoS

FORMAT = "binary"
_QOS = QoS(32, 40000, 5000, 10, 0, 5000, 3600)
_KSID = bytes(range(16))
SEEDS: list[bytes] = [
    codec.encode(d, m)
    for d in Dialect
    for m in (
        codec.OpenConnectRequest("client://a", "server://b", _QOS),
        codec.OpenConnectResponse(0, _QOS, _KSID),
        codec.GetKeyRequest(_KSID, 3, 2, b"\0\0" if d is Dialect.V2 else b""),
        codec.GetKeyResponse(0, 3, bytes(range(1, 33)), b'{"age":1,"hops":0}'),
        codec.GetKeyResponse(8, 3, required_metadata_size=40),
        codec.CloseRequest(_KSID),
        codec.CloseResponse(0),
    )
] + [
    b"",
    b"\x02\x01\x01\xff\x00\x00\x00\x00",
    b"\x01\x00\x01\x05\xff\xff\xff\xff",
    # a v1 GET_KEY failure carrying index, key and metadata anyway (accepted, re-encoded short)
    b"\x01\x00\x01\x05\x00\x00\x00\x10" + struct.pack("!IIII", 2, 3, 0, 0),
]
DICTIONARY = [b"\x01\x00\x01", b"\x02\x01\x01", b"\x00" * 16, b"application/json\x00"]


def _check(dialect: Dialect, service: int, message: codec.Message, request: bool) -> None:
    try:
        frame = codec.encode(dialect, message)
    except FrameError:
        return  # e.g. a v1 status-only OPEN answer has no v2 form: refusing is fine
    assert frame[3] == service or not request
    header = codec.decode_header(frame[:8], max_length=1 << 20)
    decode = codec.decode_request if request else codec.decode_response
    assert decode(dialect, header.service, frame[8:]) == _canonical(dialect, message)


def _canonical(dialect: Dialect, message: codec.Message) -> codec.Message:
    """What `message` is on the wire: a v1 GET_KEY failure (not 0, not 8) is the status alone,
    though the decoder also takes one that carries index, key and metadata (all ignored)."""
    if (
        dialect is Dialect.V1
        and isinstance(message, codec.GetKeyResponse)
        and message.status not in (codec.Status.SUCCESSFUL, codec.Status.METADATA_TOO_SMALL)
    ):
        return codec.GetKeyResponse(message.status)
    return message


def target(data: bytes) -> None:
    for bound, request in ((codec.MAX_REQUEST_PAYLOAD, True), (codec.MAX_RESPONSE_PAYLOAD, False)):
        try:
            header = codec.decode_header(data[:8], max_length=bound)
        except FrameError:
            header = None
        for dialect in Dialect:
            service = header.service if header else (data[3] if len(data) > 3 else 0)
            payload = data[8:]
            if header is not None:
                assert header.length <= bound
            decode = codec.decode_request if request else codec.decode_response
            try:
                message = decode(dialect, service, payload)
            except FrameError:
                continue
            _check(dialect, service, message, request)
    struct.calcsize("!I")
