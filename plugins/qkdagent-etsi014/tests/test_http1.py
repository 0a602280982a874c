"""The simulator's lean HTTP/1.1 loop: keep-alive, pipelining, limits, errors; HTTP/2 still works.

Most cases run over in-memory streams (virtual clock for the timeouts); the last ones over the
real mutual-TLS listener.
"""

from __future__ import annotations

import json
from typing import Any

import h11
import httpx
import pytest
import trio
import trio.testing
from qkdagent_etsi014.http1 import Http1Connection, Http1Limits
from qkdagent_etsi014.sim import Simulator

from .conftest import tls_context


class Recorder:
    """An ASGI-style app echoing what it saw; `mode` makes it misbehave."""

    def __init__(self, mode: str = "read") -> None:
        self.mode = mode
        self.scopes: list[dict[str, Any]] = []
        self.bodies: list[bytes] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        if self.mode == "fail":
            raise ValueError("boom")
        body = b""
        if self.mode == "read":
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
        self.bodies.append(body)
        data = json.dumps({"n": len(self.scopes), "size": len(body)}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": data})


class Reader:
    """Reads responses off the client side of a connection (pipelined ones too)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = b""

    async def response(self, method: str = "GET") -> tuple[int, bytes, dict[bytes, bytes]]:
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method=method, target="/", headers=[("host", "kme")]))
        client.send(h11.EndOfMessage())
        if self.buffer:  # (b"" would mean EOF to h11)
            client.receive_data(self.buffer)
        status, body, headers = 0, b"", {}
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.buffer = client.trailing_data[0]
                return status, body, headers
            else:
                raise AssertionError(f"unexpected {event!r}")


async def read_to_eof(stream: trio.abc.Stream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def start(
    nursery: trio.Nursery, app: Recorder, **limits: Any
) -> tuple[trio.abc.Stream, trio.Event]:
    client, server = trio.testing.memory_stream_pair()
    done = trio.Event()

    async def run() -> None:
        await Http1Connection(server, app, limits=Http1Limits(**limits)).serve()
        done.set()

    nursery.start_soon(run)
    return client, done


def get(path: bytes = b"/x?a=1", *extra: bytes) -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nhost: kme\r\n" + b"".join(extra) + b"\r\n"


async def test_keep_alive_and_pipelined_requests() -> None:
    app = Recorder()
    async with trio.open_nursery() as nursery:
        stream, done = await start(nursery, app)
        reader = Reader(stream)
        await stream.send_all(get(b"/a?number=1") + get(b"/b%20c"))  # pipelined
        for n in (1, 2):
            status, body, headers = await reader.response()
            assert (status, json.loads(body)["n"]) == (200, n)
            assert headers[b"content-type"] == b"application/json"
        await stream.send_all(get(b"/c"))  # still open
        assert (await reader.response())[0] == 200
        await stream.send_eof()
        with trio.fail_after(5):
            await done.wait()
    first, second = app.scopes[:2]
    assert (first["raw_path"], first["query_string"], first["method"]) == (
        b"/a",
        b"number=1",
        "GET",
    )
    assert (second["raw_path"], second["path"]) == (b"/b%20c", "/b c")
    assert (b"host", b"kme") in first["headers"]


async def test_post_body_is_delivered_in_full() -> None:
    app = Recorder()
    async with trio.open_nursery() as nursery:
        stream, _ = await start(nursery, app)
        body = b"x" * 200_000
        head = b"POST /p HTTP/1.1\r\nhost: kme\r\ncontent-length: %d\r\n\r\n" % len(body)
        nursery.start_soon(stream.send_all, head + body)
        status, answer, _ = await Reader(stream).response()
        assert (status, json.loads(answer)["size"]) == (200, 200_000)
        nursery.cancel_scope.cancel()
    assert app.bodies == [body]


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /x HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip\r\n\r\n", 501),
        (b"GET /x HTTP/1.1\r\nhost: a\r\nx: " + b"a" * 20_000 + b"\r\n\r\n", 431),
        (b"GET /x HTTP/1.1\r\nhost: a\r\nx: " + b"a" * 20_000, 431),  # incomplete
    ],
    ids=["garbage", "no-host", "two-lengths", "bad-coding", "big-head", "big-incomplete-head"],
)
async def test_malformed_request_is_refused_and_closed(request_bytes: bytes, status: int) -> None:
    app = Recorder()
    async with trio.open_nursery() as nursery:
        stream, done = await start(nursery, app)
        await stream.send_all(request_bytes)
        with trio.fail_after(5):
            data = await read_to_eof(stream)
            await done.wait()
    assert data.startswith(b"HTTP/1.1 %d " % status)
    assert b"connection: close" in data.lower()
    assert app.scopes == []


async def test_unread_body_is_drained_and_the_connection_kept() -> None:
    app = Recorder(mode="ignore-body")
    async with trio.open_nursery() as nursery:
        stream, _ = await start(nursery, app)
        reader = Reader(stream)
        body = b"y" * 5000
        head = b"POST /p HTTP/1.1\r\nhost: kme\r\ncontent-length: %d\r\n\r\n" % len(body)
        await stream.send_all(head + body + get(b"/next"))
        assert (await reader.response())[0] == 200
        status, answer, _ = await reader.response()
        assert (status, json.loads(answer)["n"]) == (200, 2)
        nursery.cancel_scope.cancel()
    assert [s["raw_path"] for s in app.scopes] == [b"/p", b"/next"]


async def test_unread_body_beyond_the_drain_limit_closes() -> None:
    app = Recorder(mode="ignore-body")
    async with trio.open_nursery() as nursery:
        stream, done = await start(nursery, app, drain_limit=1000)
        head = b"POST /p HTTP/1.1\r\nhost: kme\r\ncontent-length: 100000\r\n\r\n"
        nursery.start_soon(stream.send_all, head + b"z" * 100_000)
        with trio.fail_after(5):
            data = await read_to_eof(stream)
            await done.wait()
        nursery.cancel_scope.cancel()
    assert data.startswith(b"HTTP/1.1 200 ")
    assert len(app.scopes) == 1


@pytest.mark.parametrize("mode", ["read", "ignore-body"])
@pytest.mark.parametrize("count", [10, 11, 1000])
async def test_a_body_in_too_many_pieces_is_cut_off_and_the_connection_closed(
    mode: str, count: int
) -> None:
    """One-byte chunks cost about 5 us a piece to parse: past `max_body_pieces` (taken and
    discarded together) the app sees the request end (it refuses it), the rest is not read,
    and the connection closes, a pipelined request unanswered. At the bound all is kept."""
    app = Recorder(mode=mode)
    async with trio.open_nursery() as nursery:
        stream, done = await start(nursery, app, max_body_pieces=10)
        head = b"POST /p HTTP/1.1\r\nhost: kme\r\ntransfer-encoding: chunked\r\n\r\n"
        body = b"1\r\nz\r\n" * count + b"0\r\n\r\n"
        nursery.start_soon(stream.send_all, head + body + b"GET /next HTTP/1.1\r\nhost: k\r\n\r\n")
        with trio.fail_after(5):
            if count <= 10:
                reader = Reader(stream)
                assert (await reader.response("POST"))[0] == 200
                assert (await reader.response())[0] == 200  # kept: the next one is answered
                await stream.aclose()
            else:
                data = await read_to_eof(stream)
                assert data.startswith(b"HTTP/1.1 200 ") and data.count(b"HTTP/1.1") == 1
            await done.wait()
        nursery.cancel_scope.cancel()
    taken = b"z" * min(count, 10) if mode == "read" else b""
    assert app.bodies[0] == taken and len(app.scopes) == (2 if count <= 10 else 1)


async def test_expect_100_continue_is_answered_when_the_body_is_read() -> None:
    app = Recorder()
    async with trio.open_nursery() as nursery:
        stream, _ = await start(nursery, app)
        head = b"POST /p HTTP/1.1\r\nhost: kme\r\ncontent-length: 3\r\nexpect: 100-continue\r\n\r\n"
        await stream.send_all(head)
        with trio.fail_after(5):
            interim = await stream.receive_some(65536)
        assert interim.startswith(b"HTTP/1.1 100 ") and interim.endswith(b"\r\n\r\n")
        await stream.send_all(b"abc")
        status, answer, _ = await Reader(stream).response()
        assert (status, json.loads(answer)["size"]) == (200, 3)
        nursery.cancel_scope.cancel()


async def test_head_answer_has_no_body() -> None:
    async with trio.open_nursery() as nursery:
        stream, _ = await start(nursery, Recorder(mode="ignore-body"))
        await stream.send_all(b"HEAD /h HTTP/1.1\r\nhost: kme\r\n\r\n" + get(b"/after"))
        reader = Reader(stream)
        status, body, headers = await reader.response("HEAD")
        assert (status, body) == (200, b"")
        assert int(headers[b"content-length"]) > 0  # the length a GET would have had
        assert (await reader.response())[0] == 200
        nursery.cancel_scope.cancel()


async def test_app_failure_is_500_and_closes() -> None:
    app = Recorder(mode="fail")
    async with trio.open_nursery() as nursery:
        stream, done = await start(nursery, app)
        await stream.send_all(get())
        with trio.fail_after(5):
            data = await read_to_eof(stream)
            await done.wait()
    assert data.startswith(b"HTTP/1.1 500 ")
    assert b"internal error" in data and b"boom" not in data


async def test_idle_connection_is_closed(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        stream, done = await start(nursery, Recorder(), keep_alive_timeout=30)
        await trio.sleep(29)
        assert not done.is_set()
        await trio.sleep(2)
        assert done.is_set()
        assert await stream.receive_some(10) == b""


async def test_slow_request_is_cut_off(autojump_clock: trio.abc.Clock) -> None:
    app = Recorder()
    async with trio.open_nursery() as nursery:
        stream, done = await start(nursery, app, request_timeout=10, keep_alive_timeout=1000)
        await stream.send_all(b"POST /p HTTP/1.1\r\nhost: kme\r\ncontent-length: 10\r\n\r\nabc")
        await trio.sleep(9)
        assert not done.is_set()
        await trio.sleep(2)
        assert done.is_set()
    assert app.bodies == []  # the app never got a complete body


# -- over the real listener --------------------------------------------------------------------


async def test_pipelined_requests_over_mutual_tls(sim: Simulator) -> None:
    host, port = sim.urls["KME_A"].removeprefix("https://").rsplit(":", 1)
    context = tls_context(sim.pki, "alice")
    stream = await trio.open_ssl_over_tcp_stream(host, int(port), ssl_context=context)
    try:
        request = b"GET /api/v1/keys/bob/enc_keys HTTP/1.1\r\nhost: kme\r\n\r\n"
        await stream.send_all(request * 3)
        reader = Reader(stream)
        ids = set()
        for _ in range(3):
            status, body, _ = await reader.response()
            assert status == 200
            ids.add(json.loads(body)["keys"][0]["key_ID"])
        assert len(ids) == 3
    finally:
        await stream.aclose()
    assert sim.apps["KME_A"].stats["keys"] == 3


async def test_http2_is_still_served(sim: Simulator) -> None:
    async with httpx.AsyncClient(
        base_url=sim.urls["KME_A"],
        verify=tls_context(sim.pki, "alice"),
        http2=True,
        http1=False,
        trust_env=False,
    ) as client:
        response = await client.get("/api/v1/keys/bob/enc_keys", params={"number": 2})
        assert response.http_version == "HTTP/2"
        assert response.status_code == 200
        assert len(response.json()["keys"]) == 2
        refused = await client.get("/api/v1/keys/bob/enc_keys", params={"number": "x"})
        assert refused.status_code == 400


async def test_malformed_request_over_tls_leaves_the_kme_serving(sim: Simulator) -> None:
    host, port = sim.urls["KME_A"].removeprefix("https://").rsplit(":", 1)
    context = tls_context(sim.pki, "alice")
    stream = await trio.open_ssl_over_tcp_stream(
        host, int(port), ssl_context=context, https_compatible=True
    )
    try:
        await stream.send_all(b"GET /api/v1/keys/bob/enc_keys HTTP/1.1\r\n\r\n")  # no Host
        with trio.fail_after(5):
            data = await read_to_eof(stream)
        assert data.startswith(b"HTTP/1.1 400 ")
    finally:
        await trio.aclose_forcefully(stream)
    async with httpx.AsyncClient(verify=context, trust_env=False) as client:
        response = await client.get(sim.urls["KME_A"] + "/api/v1/keys/bob/enc_keys")
        assert response.status_code == 200
    assert sim.apps["KME_A"].stats["keys"] == 1
