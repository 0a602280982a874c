"""qkd-module's REST form (ETSI 004 plugin): the literal-only parser of the module's answers
and of the requests the simulator serves. Only `rest.LiteralError` may come out."""

from __future__ import annotations

from qkdagent_etsi004 import rest

FORMAT = None
SEEDS: list[bytes] = [
    b"[bytearray(b'\\x01\\x02\\x03'), 4, 0]",
    b"[None, -1, 2]",
    b"['0123456789abcdef', 0]",
    b"{'source': 'client://a', 'destination': 'server://b', 'qos': {'timeout': 5000}}",
    b"3",
    b"[[[[[[1]]]]]]",
    b"__import__('os')",
    b"bytes(32)",
]


def target(data: bytes) -> None:
    for read in (
        rest.parse_literal,
        rest.read_open,
        lambda d: rest.read_get_key(d, max_key=8192),
        rest.read_close,
        rest.read_available,
        rest.decode_open,
        rest.decode_get_key,
        rest.decode_close,
    ):
        try:
            read(data)
        except rest.LiteralError:
            pass
