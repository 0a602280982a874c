"""Requests as the ETSI 014 KME simulator reads them: query strings and JSON bodies through
`reqparse` (only a 400 `ApiError` may come out), and whole requests through the KME's ASGI app
(GET with the input as query string, POST with it as body, and as the SAE ID in the path), whose
answer must be a JSON 4xx (or 503 for an empty store), never a 5xx or an exception.

Run: python3 contrib/fuzz/run_fuzz.py --target etsi014_sim
"""

from __future__ import annotations

import json
from typing import Any

from qkdagent_etsi014 import reqparse
from qkdagent_etsi014.app import KmeApp
from qkdagent_etsi014.network import ApiError, KmeNetwork

FORMAT = "json"
KEY_ID = "3fa85f64-5717-4562-b3fc-2c963f66afa6"
DICTIONARY = [
    b'"number"',
    b'"size"',
    b'"additional_slave_SAE_IDs"',
    b'"extension_mandatory"',
    b'"extension_optional"',
    b'"key_IDs"',
    b'"key_ID"',
    b"number=",
    b"size=",
    b"key_ID=",
    b"&",
    b"%",
]
SEEDS: list[bytes] = [
    b'{"number": 2, "size": 256}',
    b'{"number": 1, "size": 512, "additional_slave_SAE_IDs": ["dave"]}',
    b'{"number": 1, "extension_mandatory": [{"abc_route_type": "direct"}]}',
    b'{"extension_optional": [{"abc_transfer_method": "qkd"}]}',
    json.dumps({"key_IDs": [{"key_ID": KEY_ID}]}).encode(),
    json.dumps({"key_IDs": [{"key_ID": KEY_ID, "key_ID_extension": {}}]}).encode(),
    b"{}",
    b"number=2&size=256",
    b"key_ID=" + KEY_ID.encode(),
    b"",
]

_NETWORK = KmeNetwork({"KME_A": ["alice"], "KME_B": ["bob", "dave"]}, rate_bps=0.0)
_APPS = {kme: KmeApp(_NETWORK, kme) for kme in ("KME_A", "KME_B")}
_PARSERS = (reqparse.enc_get, reqparse.enc_post, reqparse.dec_get, reqparse.dec_post)


def _call(app: KmeApp, method: str, path: bytes, query: bytes, body: bytes, caller: str) -> int:
    """Run the app's coroutine to completion by hand: with no `delay` quirk it never waits."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path.decode("latin-1"),
        "raw_path": path,
        "query_string": query,
        "headers": [(b"content-type", b"application/json")],
    }
    coroutine = app(scope, receive, send, caller)
    try:
        coroutine.send(None)
    except StopIteration:
        pass
    else:
        coroutine.close()
        raise AssertionError("the KME app suspended without a delay quirk")
    status = sent[0]["status"]
    json.loads(sent[1]["body"])  # every answer is JSON
    return status


def target(data: bytes) -> None:
    for parse in _PARSERS:
        try:
            parse(data)
        except ApiError as exc:
            assert exc.status == 400, exc.status
    for sae_part in (b"bob", data):
        for operation in (b"enc_keys", b"dec_keys", b"status"):
            path = b"/api/v1/keys/" + sae_part + b"/" + operation
            for method, query, body in (("GET", data, b""), ("POST", b"", data)):
                status = _call(_APPS["KME_A"], method, path, query, body, "alice")
                assert status < 500 or status == 503, status
    _call(_APPS["KME_B"], "POST", b"/api/v1/keys/alice/dec_keys", b"", data, "bob")
