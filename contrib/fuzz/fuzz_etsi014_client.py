"""KME answers as the ETSI 014 source reads them: an Error object's message (`error_message`,
which must never fail), the retry decision (`classify`), Get status (`parse_status`, then the
limits check) and key containers through the source's own `_parse` (enc_keys and dec_keys,
strict and lax key IDs, for one key and for two: a shared call's answer). Only `WireError` /
`SourceError` may come out.

Run: python3 contrib/fuzz/run_fuzz.py --target etsi014_client
"""

from __future__ import annotations

import base64
import json
import tempfile
from pathlib import Path

from qkdagent_etsi014 import wire
from qkdagent_etsi014.retry import classify
from qkdagent_etsi014.source import Etsi014Source

from qkdagent import Options, PluginContext, SourceError

FORMAT = "json"
KEY_ID = "3fa85f64-5717-4562-b3fc-2c963f66afa6"
KEY_ID_2 = "9bf5c3a2-0d4e-4f61-8a7b-5c2d1e0f9a8b"
"""A second key, for answers to a call for two keys (a shared call, `batching`)."""
STATUSES = (None, 200, 400, 401, 404, 405, 501, 503, 500)
DICTIONARY = [
    b'"keys"',
    b'"Keys"',
    b'"key_ID"',
    b'"key_id"',
    b'"key"',
    b'"message"',
    b'"details"',
    f'"{KEY_ID}"'.encode(),
    b'"' + base64.b64encode(bytes(32)) + b'"',
    *(f'"{name}"'.encode() for name in (*wire.STATUS_INT_FIELDS, *wire.STATUS_STR_FIELDS)),
]


def _source(strict: bool) -> Etsi014Source:
    table = {
        "kme_url": "https://kme.example:8443",
        "cert": "c.pem",
        "key": "k.pem",
        "ca": "ca.pem",
        "strict_key_ids": strict,
    }
    options = Options(table, where="sources.fuzz")
    source = Etsi014Source("fuzz", options, PluginContext("alice", Path(tempfile.gettempdir())))
    options.finish()
    return source


_SOURCES = (_source(True), _source(False))


def _key(key_id: str = KEY_ID, raw: bytes = bytes(range(32))) -> dict[str, str]:
    return {"key_ID": key_id, "key": base64.b64encode(raw).decode()}


_STATUS = {
    "source_KME_ID": "KME_A",
    "target_KME_ID": "KME_B",
    "master_SAE_ID": "alice",
    "slave_SAE_ID": "bob",
    "key_size": 256,
    "stored_key_count": 25000,
    "max_key_count": 100000,
    "max_key_per_request": 128,
    "max_key_size": 1024,
    "min_key_size": 64,
    "max_SAE_ID_count": 0,
}
SEEDS: list[bytes] = [
    json.dumps(doc).encode()
    for doc in (
        {"keys": [_key()]},
        {"keys": [_key(), _key(KEY_ID_2)]},
        {"keys": [_key(KEY_ID_2), _key()]},
        {"keys": [_key(), _key()]},
        {"Keys": [_key()]},
        {"keys": _key()},
        {"keys": [{"key_id": KEY_ID, "key": _key()["key"]}]},
        {"keys": [_key("kme-7f3a")]},
        _STATUS,
        {"message": "one or more keys specified are not found on KME"},
        {"message": "size shall be a multiple of 8", "details": [{"x": 1}]},
        {"detail": "Not Found"},
    )
] + [b"", b"<html>502 Bad Gateway</html>"]


def target(data: bytes) -> None:
    message = wire.error_message(data)  # used on every answer, whatever its status: never fails
    assert message is None or (message.isprintable() and len(message) <= 203)
    for status in STATUSES:
        for operation in ("status", "enc_keys", "dec_keys"):
            classify(operation, status, message)
    try:
        status_object = wire.parse_status(wire.loads(data))
    except wire.WireError:
        pass
    else:
        status_object.describe()
        status_object.mismatch(256, "KME_A", "alice")
    for source in _SOURCES:
        for operation, number, expected in (
            ("enc_keys", 1, None),
            ("dec_keys", 1, [KEY_ID]),
            ("enc_keys", 2, None),
            ("dec_keys", 2, [KEY_ID, KEY_ID_2]),
        ):
            try:
                keys = source._parse(operation, "bob", data, number, expected)
            except SourceError:
                continue
            # to a call for several keys, fewer are taken too (a KME ignoring `number`)
            assert 1 <= len(keys) <= number
            assert len({key.key_id for key in keys}) == len(keys)
            assert all(len(key.value.reveal()) == 32 for key in keys)
            if expected is not None:
                assert {key.key_id for key in keys} <= set(expected)
