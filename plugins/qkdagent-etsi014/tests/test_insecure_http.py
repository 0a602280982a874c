"""`insecure_http = true`: the 014 source over plain HTTP (quPSKd's simulated KME), opt-in only.

The plain KME here behaves as REFERENCE §11 describes quPSKd's: every GET under /api/v1/keys/
(status included) gets a fresh key container whose key is base64(SHA3-256(key_ID)); POST gets
501. Hostile variants check that answers are bounded and validated as over HTTPS.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import trio
from qkdagent_etsi014 import wire
from qkdagent_etsi014.sim import Simulator
from qkdagent_etsi014.source import INSECURE_HTTP_WARNING, Etsi014Source

from qkdagent import ComponentEvent, ConfigError, Link, Options, PluginContext, SourceError
from qkdagent.testing import build_component

LINK = Link("alice-bob", "alice", "bob", True)
Answer = Callable[[str, str], tuple[int, bytes]]


def qupskd_key(key_id: str) -> str:
    return base64.b64encode(hashlib.sha3_256(key_id.encode()).digest()).decode()


def qupskd_answer(method: str, target: str) -> tuple[int, bytes]:
    """quPSKd's fake KME, from its observed behaviour (REFERENCE §11)."""
    if method != "GET":
        return 501, b"Unsupported method"
    parts = urlsplit(target)
    if not parts.path.startswith("/api/v1/keys/"):
        return 404, b"404 Not Found"
    ids = parse_qs(parts.query).get("key_ID")
    key_id = ids[0] if ids and parts.path.endswith("/dec_keys") else str(uuid.uuid4())
    return 200, json.dumps({"keys": [{"key": qupskd_key(key_id), "key_ID": key_id}]}).encode()


class PlainKme:
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[tuple[str, str]] = []
        self.url = ""

    async def handle(self, stream: trio.SocketStream) -> None:
        data = b""
        with trio.move_on_after(10):
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
            head = data.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            if len(head) == 3:
                self.requests.append((head[0], head[1]))
                status, body = self.answer(head[0], head[1])
                reply = (
                    f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                ).encode()
                try:
                    await stream.send_all(reply + body)
                except trio.BrokenResourceError:
                    pass
        await trio.aclose_forcefully(stream)


@asynccontextmanager
async def plain_kme(answer: Answer = qupskd_answer) -> AsyncIterator[PlainKme]:
    kme = PlainKme(answer)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, kme.handle, 0, host="127.0.0.1"))
        kme.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        yield kme
        nursery.cancel_scope.cancel()


class Events:
    def __init__(self) -> None:
        self.seen: list[ComponentEvent] = []

    def kinds(self) -> list[str]:
        return [e.kind for e in self.seen]


def plain_source(
    url: str, tmp_path: Path, events: Events | None = None, **extra: Any
) -> Etsi014Source:
    context = PluginContext(
        "alice", tmp_path, reporter=(events.seen.append if events is not None else None)
    )
    table = {"kme_url": url, "insecure_http": True, "peer_sae_ids": {"bob": "sae_bob"}, **extra}
    return build_component(Etsi014Source, table, context=context, links=(LINK,))


def test_plain_http_without_the_opt_in_is_a_config_error_that_says_how(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="insecure_http = true"):
        build_component(Etsi014Source, {"kme_url": "http://127.0.0.1:1"}, state_dir=tmp_path)
    # https stays the default and the only way without the flag: it needs the TLS identity
    with pytest.raises(ConfigError, match="cert.*required"):
        build_component(Etsi014Source, {"kme_url": "https://kme.example"}, state_dir=tmp_path)
    with pytest.raises(ConfigError, match="https"):
        build_component(Etsi014Source, {"kme_url": "ftp://kme.example"}, state_dir=tmp_path)


def test_plain_http_needs_no_tls_files_refuses_kme_id_and_warns_at_check(tmp_path: Path) -> None:
    warned: list[str] = []
    options = Options(
        {"kme_url": "http://127.0.0.1:1", "insecure_http": True},
        where="sources.qkd",
        warn=warned.append,
    )
    source = Etsi014Source("qkd", options, PluginContext("alice", tmp_path))
    options.finish()
    assert "INSECURE plain HTTP" in repr(source)
    assert warned and INSECURE_HTTP_WARNING in warned[0]
    for tls_option in ("cert", "key", "ca"):  # plain HTTP has no TLS identity to load
        with pytest.raises(ConfigError, match=f"{tls_option}.*not a known"):
            plain_source("http://127.0.0.1:1", tmp_path, **{tls_option: "x.pem"})
    with pytest.raises(ConfigError, match="kme_id.*https"):
        plain_source("http://127.0.0.1:1", tmp_path, kme_id="hsn_bob")


async def test_a_qupskd_kme_is_used_over_plain_http_with_a_loud_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events = Events()
    async with plain_kme() as kme:
        source = plain_source(kme.url, tmp_path, events, dec_method="auto")
        try:
            await source.prepare()  # its Get status answers a key container: tolerated
            assert events.kinds() == ["insecure_transport", "status_unusable"]
            assert "plain HTTP to the KME" in caplog.text and "is unusable" in caplog.text
            key = await source.new_key(LINK)
            assert key.value.reveal() == hashlib.sha3_256(key.key_id.encode()).digest()
            again = await source.key_by_id(LINK, key.key_id)  # POST refused (501) -> GET
            assert again.key_id == key.key_id and again.value == key.value
        finally:
            await source.aclose()
        paths = [target for _, target in kme.requests]
        assert paths[0] == "/api/v1/keys/sae_bob/status"
        assert ("POST", "/api/v1/keys/sae_bob/dec_keys") in kme.requests
        assert f"/api/v1/keys/sae_bob/dec_keys?key_ID={key.key_id}" in paths


def _fixed(status: int, body: bytes) -> Answer:
    def answer(method: str, target: str) -> tuple[int, bytes]:
        if target.endswith("/status"):
            return qupskd_answer(method, target)
        return status, body

    return answer


KEY_ID = "3f0c2b0e-1a8b-4c53-9a0e-6d9b2b2f4a11"
HOSTILE = [
    pytest.param(_fixed(200, b"x" * (2 * 1024 * 1024)), "larger than", id="oversized"),
    pytest.param(_fixed(200, b"<html>not json"), "answer rejected", id="not-json"),
    pytest.param(_fixed(200, b'{"keys": "nope"}'), "answer rejected", id="wrong-type"),
    pytest.param(
        _fixed(200, json.dumps({"keys": [{"key_ID": KEY_ID, "key": "AAAA"}]}).encode()),
        "answer rejected",
        id="short-key",
    ),
    pytest.param(
        _fixed(200, json.dumps({"keys": [{"key_ID": "k" * 300, "key": qupskd_key("k")}]}).encode()),
        "answer rejected",
        id="long-key-id",
    ),
    pytest.param(_fixed(500, b"{}"), "answered 500", id="server-error"),
]


@pytest.mark.parametrize(("answer", "problem"), HOSTILE)
async def test_plain_http_answers_are_bounded_and_validated_as_over_https(
    tmp_path: Path, answer: Answer, problem: str
) -> None:
    async with plain_kme(answer) as kme:
        source = plain_source(kme.url, tmp_path, retries=0)
        try:
            await source.prepare()
            with pytest.raises(SourceError, match=problem):
                await source.new_key(LINK)
        finally:
            await source.aclose()


async def test_a_plain_kme_that_does_not_answer_still_fails_prepare(tmp_path: Path) -> None:
    async with plain_kme(lambda method, target: (503, b"{}")) as kme:
        source = plain_source(kme.url, tmp_path, retries=0)
        try:
            with pytest.raises(SourceError, match="unavailable"):
                await source.prepare()
        finally:
            await source.aclose()


async def test_an_unusable_status_is_refused_over_https_without_the_flag(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(data: Any) -> Any:
        raise wire.WireError("not a status object")

    monkeypatch.setattr(wire, "parse_status", broken)
    table = sim.source_table("alice")
    events = Events()
    context = PluginContext("alice", tmp_path, reporter=events.seen.append)
    strict = build_component(Etsi014Source, table, context=context, links=(LINK,))
    try:
        with pytest.raises(SourceError, match="not a status object"):
            await strict.prepare()
        assert events.kinds() == []  # HTTPS: nothing insecure to report
    finally:
        await strict.aclose()
    tolerant = build_component(
        Etsi014Source, {**table, "insecure_http": True}, context=context, links=(LINK,)
    )
    try:
        await tolerant.prepare()  # still TLS, but the flag tolerates the status endpoint
        assert events.kinds() == ["insecure_transport", "status_unusable"]
    finally:
        await tolerant.aclose()


async def test_a_kme_request_is_never_sent_twice_by_the_http_client(tmp_path: Path) -> None:
    """A KME call takes a key: the source's client never resends one a kept connection took
    without answering (the core's client does that only for idempotent peer requests)."""
    source = plain_source("http://127.0.0.1:1", tmp_path)
    client = await source._open()
    assert client.resend_unanswered is False  # type: ignore[attr-defined]
    await source.aclose()
