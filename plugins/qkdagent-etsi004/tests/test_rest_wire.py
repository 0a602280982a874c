"""qkd-module's REST form (REFERENCE §2.6) byte for byte, and the literal-only parser.

The expected bytes are what the module's own code writes and reads: request bodies are the
`repr()` of a list (its README's client examples), answers `repr([str(ksid), status])`,
`repr([key, index, status])` with the key a `bytearray`, `str(status)` and `repr([count])`.
"""

from __future__ import annotations

import ast
import re

import pytest
from qkdagent_etsi004 import rest

KSID = "3f2b8c1e-9a4d-4e6f-8b1a-2c3d4e5f6a7b"
KEY = bytes(range(1, 33))


def test_requests_are_the_repr_the_module_evals() -> None:
    request = rest.OpenRequest("qkd://alice", "10.0.0.2:5000", 5000, 256, None)
    body = rest.encode_open(request)
    assert body == b"['qkd://alice', '10.0.0.2:5000', {'timeout': 5000, 'length': 256}, None]"
    assert rest.encode_open(rest.OpenRequest("s", "d", 1, 8, KSID)).endswith(f"'{KSID}']".encode())
    assert rest.encode_get_key(rest.GetKeyRequest(KSID, -1)) == f"['{KSID}', -1, None]".encode()
    assert rest.encode_get_key(rest.GetKeyRequest(KSID, 7)) == f"['{KSID}', 7, None]".encode()
    assert rest.encode_close(KSID) == f"['{KSID}']".encode()
    # the module reads them with eval(); they are plain literals, so literal_eval agrees
    assert ast.literal_eval(body.decode()) == [
        "qkd://alice",
        "10.0.0.2:5000",
        {"timeout": 5000, "length": 256},
        None,
    ]
    assert rest.decode_open(body) == request
    assert rest.decode_get_key(rest.encode_get_key(rest.GetKeyRequest(KSID, -1))).index == -1
    assert rest.decode_close(rest.encode_close(KSID)) == KSID


def test_answers_as_the_module_writes_them() -> None:
    # the module: repr([str(Key_stream_ID), status]); key = eval(str(bytearray)) -> repr
    assert rest.answer_open(rest.OpenAnswer(KSID, 0)) == repr([KSID, 0]).encode()
    assert rest.answer_open(rest.OpenAnswer(None, 2)) == b"['None', 2]"
    body = rest.answer_get_key(rest.KeyAnswer(KEY, 3, 0))
    assert body == repr([bytearray(KEY), 3, 0]).encode()
    assert re.fullmatch(rb"\[bytearray\(b'.*'\), 3, 0\]", body, re.S)
    assert rest.answer_get_key(rest.KeyAnswer(None, -1, 1)) == b"[None, -1, 1]"
    assert rest.answer_close(0) == b"0"
    assert rest.answer_available(12) == b"[12]"


def test_reading_the_module_answers() -> None:
    assert rest.read_open(repr([KSID, 0]).encode()) == rest.OpenAnswer(KSID, 0)
    assert rest.read_open(b"['None', 2]") == rest.OpenAnswer(None, 2)
    answer = rest.read_get_key(repr([bytearray(KEY), 3, 0]).encode(), max_key=64)
    assert (answer.key, answer.index, answer.status) == (KEY, 3, 0)
    assert rest.read_get_key(repr([KEY, 3, 0]).encode(), max_key=64).key == KEY
    assert rest.read_get_key(b"[None, 5, 1]", max_key=64).key is None
    assert rest.read_close(b"0") == 0 and rest.read_close(b"2") == 2
    assert rest.read_available(b"[4]") == 4
    assert KEY.hex() not in repr(answer)


@pytest.mark.parametrize(
    "body",
    [
        b"__import__('os').system('touch /tmp/pwned')",
        b"[bytearray(b'a', 1), 0, 0]",
        b"[bytearray(x), 0, 0]",
        b"[bytes(32), 0, 0]",
        b"[open('/etc/passwd').read(), 0, 0]",
        b"[(lambda: 1)(), 0, 0]",
        b"[1.5, 0, 0]",
        b"[10**100, 0, 0]",
        b"[" * 5000 + b"]" * 5000,
        b"[[[[[[[1]]]]]]]",
        b"[" + b"1, " * 100 + b"]",
        b"{1: 2}",
        b"[b'a' b'b' * 3]",
        b"9" * 5000,
        b"\xff\xfe",
        b"['a',",
        b"'" + b"a" * (rest.MAX_BODY + 1) + b"'",
    ],
)
def test_hostile_literals_are_refused_never_evaluated(body: bytes) -> None:
    with pytest.raises(rest.LiteralError):
        rest.parse_literal(body)


@pytest.mark.parametrize(
    ("reader", "body"),
    [
        (rest.read_open, b"['not-a-uuid', 0]"),
        (rest.read_open, repr([KSID.upper(), 0]).encode()),
        (rest.read_open, b"[1, 0]"),
        (rest.read_open, repr([KSID, "0"]).encode()),
        (rest.read_open, repr([KSID, 0, 0]).encode()),
        (rest.read_close, b"'0'"),
        (rest.read_available, b"[True]"),
        (lambda b: rest.read_get_key(b, max_key=64), b"['abc', 0, 0]"),
        (lambda b: rest.read_get_key(b, max_key=64), repr([bytes(65), 0, 0]).encode()),
        (lambda b: rest.read_get_key(b, max_key=64), repr([KEY, True, 0]).encode()),
        (rest.decode_open, b"['s', 'd', {'timeout': '5', 'length': 256}, None]"),
        (rest.decode_open, b"['s', '', {'timeout': 5, 'length': 256}, None]"),
        (rest.decode_get_key, b"['x', 0, None]"),
    ],
)
def test_wrong_shapes_are_typed_errors(reader, body: bytes) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(rest.LiteralError):
        reader(body)
