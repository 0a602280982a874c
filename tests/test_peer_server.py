"""The peer API server (`qkdagent/peerserver.py`) over real loopback TLS: routing, body bounds,
the client certificate's names, handshake and slow-sender timeouts, admission under a flood of
idle connections, running out of descriptors, and agents at a 1,024 descriptor limit that keep
rotating while 2,000 idle connections are held against their peer port."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import resource
import select
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import trio
import trio.testing

from qkdagent import batchwire
from qkdagent.admission import Admission
from qkdagent.config import Address, TlsFiles
from qkdagent.errors import ProtocolError
from qkdagent.identity import PeerIdentity
from qkdagent.observability import Metrics
from qkdagent.peering import ReplyNow
from qkdagent.peerserver import ServerLimits, _Conn, _Server, serve_peers
from qkdagent.pki import PkiFiles, write_test_pki
from qkdagent.protocol import error_body
from qkdagent.testing.procs import AgentProcess, process_pair, wait_until
from tests.helpers import TaskSteps

Handler = Callable[[str, str, bytes, PeerIdentity, ReplyNow], Awaitable[bytes]]


@dataclass
class Running:
    port: int
    pki: PkiFiles
    metrics: Metrics
    calls: list[tuple[str, str, bytes, PeerIdentity]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def context(self, name: str | None = "alice") -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        if name is not None:
            ctx.load_cert_chain(str(self.pki[name].cert), str(self.pki[name].key))
        return ctx

    def dropped(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "qkdagent_peer_connections_refused_total", {"reason": reason}
        )
        return value or 0.0

    def refused(self, status: int) -> float:
        value = self.metrics.registry.get_sample_value(
            "qkdagent_peer_requests_refused_total", {"status": str(status)}
        )
        return value or 0.0

    async def tls(self, name: str | None = "alice") -> trio.SSLStream[Any]:
        return await trio.open_ssl_over_tcp_stream(
            "127.0.0.1", self.port, ssl_context=self.context(name)
        )


@asynccontextmanager
async def running(
    tmp_path: Path,
    handler: Handler | None = None,
    is_peer: Callable[[PeerIdentity], bool] | None = None,
    serves: Callable[[PeerIdentity, str], bool] | None = None,
    **limits: Any,
) -> AsyncIterator[Running]:
    pki = write_test_pki(tmp_path / "pki", ["alice", "bob", "mallory"])
    server = Running(0, pki, Metrics())

    async def record(
        link: str, action: str, body: bytes, identity: PeerIdentity, reply_now: ReplyNow
    ) -> bytes:
        server.calls.append((link, action, body, identity))
        return b'{"ok":true}'

    tls = TlsFiles(pki["bob"].cert, pki["bob"].key, pki.ca_cert)
    async with trio.open_nursery() as nursery:
        (url,) = await nursery.start(
            lambda task_status: serve_peers(
                handler or record,
                listen=Address("127.0.0.1", 0),
                tls=tls,
                limits=ServerLimits(**limits),
                metrics=server.metrics,
                is_peer=is_peer,
                serves=serves,
                task_status=task_status,
            )
        )
        server.port = int(url.rsplit(":", 1)[1])
        yield server
        nursery.cancel_scope.cancel()


async def exchange(
    stream: trio.abc.Stream, request: h11.Request, body: bytes | None = None
) -> tuple[h11.Response, bytes]:
    """Send one request (the body only if given) and read the whole answer."""
    client = h11.Connection(h11.CLIENT)
    data = client.send(request)
    if body is not None:
        data += client.send(h11.Data(data=body)) + client.send(h11.EndOfMessage())
    await stream.send_all(data)
    response, chunks = None, []
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            return response, b"".join(chunks)
        else:
            raise AssertionError(f"unexpected {event!r}")


def post(path: str, length: int | None = None, *, chunked: bool = False) -> h11.Request:
    headers = [("host", "bob"), ("content-type", "application/json")]
    if chunked:
        headers.append(("transfer-encoding", "chunked"))
    elif length is not None:
        headers.append(("content-length", str(length)))
    return h11.Request(method="POST", target=path, headers=headers)


async def closed_by_server(stream: trio.abc.Stream, bound: float = 20) -> bool:
    """Whether the server closes the connection within `bound` seconds (data is ignored)."""
    with trio.move_on_after(bound):
        try:
            while await stream.receive_some(4096):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return True
    return False


async def read_until_closed(stream: trio.abc.Stream) -> bytes:
    """What the server sent before closing (a reset after the answer is tolerated: the server
    closes with part of our request unread)."""
    data = b""
    try:
        while chunk := await stream.receive_some(4096):
            data += chunk
    except trio.BrokenResourceError:
        pass
    return data


ROTATE = "/v1/links/alice-bob/rotate"


async def test_routes_statuses_and_keep_alive(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        async with httpx.AsyncClient(verify=server.context(), timeout=5) as http:
            for action in ("rotate", "commit", "resync"):
                reply = await http.post(f"{server.url}/v1/links/alice-bob/{action}", content=b"{}")
                assert reply.status_code == 200 and reply.json() == {"ok": True}
                assert reply.headers["content-type"] == "application/json"
            for path in ("/v1/links/alice-bob/erase", "/v1/links/rotate", "/status", "/"):
                reply = await http.post(server.url + path, content=b"{}")
                assert reply.status_code == 404 and reply.json()["error"] == "not-found"
            reply = await http.get(server.url + ROTATE)
            assert reply.status_code == 405 and reply.json()["error"] == "method"
        assert [(c[0], c[1], c[2]) for c in server.calls] == [
            ("alice-bob", "rotate", b"{}"),
            ("alice-bob", "commit", b"{}"),
            ("alice-bob", "resync", b"{}"),
        ]
        stream = await server.tls()
        for _ in range(3):  # one connection, several requests
            response, body = await exchange(stream, post(ROTATE, 2), b"{}")
            assert response.status_code == 200 and body == b'{"ok":true}'
        response, body = await exchange(stream, post("/nope", 2), b"{}")
        assert response.status_code == 404
        response, body = await exchange(stream, post(ROTATE, 2), b"{}")
        assert response.status_code == 200  # kept alive after a 404
        await stream.aclose()
        assert server.refused(404) == 5 and server.refused(405) == 1


async def test_handler_refusals_and_failures(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(
        link: str, action: str, body: bytes, identity: PeerIdentity, reply_now: ReplyNow
    ) -> bytes:
        if action == "rotate":
            raise ProtocolError("wrong epoch", status=409, body=b'{"error":"epoch","epoch":3}')
        if action == "commit":
            raise ProtocolError("bad MAC", status=403)
        raise RecursionError("deep")

    caplog.set_level(logging.DEBUG)
    async with running(tmp_path, handler) as server:
        async with httpx.AsyncClient(verify=server.context(), timeout=5) as http:
            reply = await http.post(server.url + ROTATE, content=b"{}")
            assert reply.status_code == 409 and reply.content == b'{"error":"epoch","epoch":3}'
            reply = await http.post(f"{server.url}/v1/links/alice-bob/commit", content=b"{}")
            assert reply.status_code == 403 and reply.json()["error"] == "refused"
            reply = await http.post(f"{server.url}/v1/links/alice-bob/resync", content=b"{}")
            assert reply.status_code == 500 and reply.json()["error"] == "internal"
            reply = await http.post(server.url + ROTATE, content=b"{}")  # still serving
            assert reply.status_code == 409
    assert "RecursionError" in caplog.text and "Traceback" not in caplog.text


async def test_a_handler_replies_early_and_the_connection_reads_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`reply_now`: the client has the 200 while the handler still works (the responder's
    install after its commit); the body the handler then returns is not sent again, and the
    connection's next request (another link's) is answered meanwhile: one link's slow sink
    never holds up another's requests. A bug after the early reply is logged, never answered
    a second time."""
    release = trio.Event()
    finished: list[str] = []

    async def handler(
        link: str, action: str, body: bytes, identity: PeerIdentity, reply_now: ReplyNow | None
    ) -> bytes:
        if link.startswith("slow"):
            assert reply_now is not None
            assert await reply_now(b'{"early":true}')
            assert not await reply_now(b'{"twice":true}')  # a second early reply is ignored
            await release.wait()
            finished.append(link)
            if link == "slow2":
                raise RecursionError("after the reply")
            return b'{"late":true}'
        return b'{"other":true}'

    caplog.set_level(logging.DEBUG)
    async with running(tmp_path, handler) as server:
        stream = await server.tls()
        with trio.fail_after(10):  # a reply that waited for the handler would never come
            response, body = await exchange(stream, post("/v1/links/slow/commit", 2), b"{}")
            assert response.status_code == 200 and body == b'{"early":true}'
            response, body = await exchange(stream, post(ROTATE, 2), b"{}")
            assert response.status_code == 200 and body == b'{"other":true}'
            response, body = await exchange(stream, post("/v1/links/slow2/commit", 2), b"{}")
            assert response.status_code == 200 and body == b'{"early":true}'
        assert finished == []  # every answer above came while the slow handlers still worked
        release.set()
        with trio.fail_after(10):
            while len(finished) < 2:  # noqa: ASYNC110
                await trio.sleep(0.01)
            response, body = await exchange(stream, post(ROTATE, 2), b"{}")  # no stray 500
        assert response.status_code == 200 and body == b'{"other":true}'
        assert sorted(finished) == ["slow", "slow2"]
        assert server.refused(500) == 0  # the peer had its 200: not a refusal
    assert "commit for link 'slow2': RecursionError failed after its reply" in caplog.text


@pytest.mark.parametrize("batched", [False, True])
async def test_only_a_commit_may_reply_early(tmp_path: Path, batched: bool) -> None:
    """The other actions' handlers get no `reply_now` (alone, they run in the connection's
    task): only the responder's commit answers before its install."""
    given: dict[str, bool] = {}

    async def handler(
        link: str, action: str, body: bytes, identity: PeerIdentity, reply_now: ReplyNow | None
    ) -> bytes:
        given[action] = reply_now is not None
        return b"{}"

    async with running(tmp_path, handler) as server:
        stream = await server.tls()
        actions = ("rotate", "resync", "announce", "commit")
        with trio.fail_after(10):
            if batched:
                data = _batch(*((f"l{i}", action, b"") for i, action in enumerate(actions)))
                response, _ = await exchange(stream, post("/v1/batch", len(data)), data)
                assert response.status_code == 200
            else:
                for action in actions:
                    response, _ = await exchange(stream, post(f"/v1/links/l/{action}", 2), b"{}")
                    assert response.status_code == 200
    assert given == {"rotate": False, "resync": False, "announce": False, "commit": True}


async def test_handlers_going_on_after_an_early_reply_are_capped_per_client(
    tmp_path: Path,
) -> None:
    """Past `max_per_identity` handlers of one client still running after their early
    reply, a handler answers only when it returns: a peer pipelining commits on one
    connection cannot make the server hold unbounded work."""
    release, second_waits = trio.Event(), trio.Event()
    finished: list[str] = []
    early: dict[str, bool] = {}

    async def handler(
        link: str, action: str, body: bytes, identity: PeerIdentity, reply_now: ReplyNow
    ) -> bytes:
        early[link] = await reply_now(b'{"early":true}')
        if link == "two":
            second_waits.set()
        await release.wait()
        finished.append(link)
        return b'{"late":true}'

    async with running(tmp_path, handler, max_per_identity=1) as server:
        stream = await server.tls()
        replies: list[bytes] = []

        async def second() -> None:
            _, body = await exchange(stream, post("/v1/links/two/commit", 2), b"{}")
            replies.append(body)

        with trio.fail_after(10):
            _, body = await exchange(stream, post("/v1/links/one/commit", 2), b"{}")
            assert body == b'{"early":true}' and finished == []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(second)
                await second_waits.wait()  # while the first still goes on
                release.set()
        assert replies == [b'{"late":true}']  # answered when it returned, not early
        assert sorted(finished) == ["one", "two"]
        assert early == {"one": True, "two": False}  # the handler is told it was declined


async def test_an_early_reply_the_client_does_not_take_leaves_the_handler_working(
    tmp_path: Path,
) -> None:
    """A client that stops reading: the handler's work after its early reply runs whole (it
    is not cancelled with the connection), and the reply's send gives up at the request
    timeout and closes the connection."""
    entered = trio.Event()
    finished = trio.Event()

    async def handler(
        link: str, action: str, body: bytes, identity: PeerIdentity, reply_now: ReplyNow
    ) -> bytes:
        entered.set()
        await reply_now(b"{}" + b" " * 20_000_000)  # more than the socket buffers hold
        await trio.lowlevel.checkpoint()
        finished.set()
        return b"{}"

    async with running(tmp_path, handler, request_timeout=0.5) as server:
        stream = await server.tls()
        request = post("/v1/links/alice-bob/commit", 2)
        await stream.send_all(h11.Connection(h11.CLIENT).send(request) + b"{}")
        with trio.fail_after(10):
            await entered.wait()
            await finished.wait()  # while the reply is stuck in the socket buffers
        await trio.sleep(4 * 0.5)  # the scenario: no read for longer than request_timeout
        assert await closed_by_server(stream)
        assert server.calls == []  # (the handler is this test's, not the recording one)


async def test_oversized_bodies_are_refused_without_being_read(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        # declared far too large and never sent: answered at once from the content-length
        stream = await server.tls()
        response, body = await exchange(stream, post(ROTATE, 100_000_000))
        assert response.status_code == 413 and b"too-large" in body
        assert (b"connection", b"close") in response.headers
        assert await closed_by_server(stream)
        # declared just over the bound and sent: 413, the rest discarded, connection kept
        stream = await server.tls()
        response, _ = await exchange(stream, post(ROTATE, 70_000), b"x" * 70_000)
        assert response.status_code == 413
        response, _ = await exchange(stream, post(ROTATE, 2), b"{}")
        assert response.status_code == 200
        assert len(server.calls) == 1 and len(server.calls[0][2]) == 2
        assert server.refused(413) == 2


async def test_bodies_framed_other_than_by_content_length_are_411_and_closed(
    tmp_path: Path,
) -> None:
    """A chunked body of one-byte chunks cost seconds of CPU to take in (issue 18 review):
    none reaches a handler, on the lone path or the batch path. Beside a content-length, a
    transfer-encoding is malformed (400: llhttp refuses the pair, which h11 had read as
    chunked)."""
    async with running(tmp_path) as server:
        for target in (ROTATE, "/v1/batch"):
            for both in (False, True):
                head = f"POST {target} HTTP/1.1\r\nhost: bob\r\ntransfer-encoding: chunked\r\n"
                head += "content-length: 0\r\n" if both else ""
                stream = await server.tls()
                await stream.send_all(head.encode() + b"\r\n1\r\n{\r\n1\r\n}\r\n0\r\n\r\n")
                data = await read_until_closed(stream)
                status = b"400" if both else b"411"
                assert data.startswith(b"HTTP/1.1 " + status) and b"connection: close" in data
        assert not server.calls and server.refused(411) == 2 and server.refused(400) == 2


async def test_malformed_http_is_400(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        stream = await server.tls()
        await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        data = await read_until_closed(stream)
        assert data.startswith(b"HTTP/1.1 400 ") and b"connection: close" in data
        stream = await server.tls()
        await stream.send_all(b"POST " + ROTATE.encode() + b" HTTP/1.1\r\nhost: b\r\n")
        await stream.send_all(b"x-big: " + b"a" * 20_000 + b"\r\n\r\n")  # head over 16 KiB
        data = await read_until_closed(stream)
        assert data.startswith(b"HTTP/1.1 431 ")
        assert not server.calls and server.refused(400) == 1


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"POST /v1/links/a/rotate HTTP/1.1\r\ncontent-length: 0\r\n\r\n", b"400"),  # no host
        (b"POST /v1/links/a/rotate HTTP/2.0\r\ncontent-length: 0\r\n\r\n", b"505"),
        (b"POST /v1/links/a/rotate HTTP/1.1\r\nhost: b\r\nconnection: upgrade\r\n"
         b"upgrade: h2c\r\ncontent-length: 0\r\n\r\n", b"400"),
    ],
)  # fmt: skip
async def test_requests_refused_at_their_head_are_answered_counted_and_closed(
    tmp_path: Path, request_head: bytes, status: bytes
) -> None:
    async with running(tmp_path) as server:
        stream = await server.tls()
        await stream.send_all(request_head + post_bytes(ROTATE, b"{}"))  # and one after it
        data = await read_until_closed(stream)
        assert data.startswith(b"HTTP/1.1 " + status + b" ") and b"connection: close" in data
        assert data.count(b"HTTP/1.1") == 1  # the request after it is not answered
        assert not server.calls and server.refused(int(status)) == 1


async def test_line_ends_without_a_request_are_refused_once_over_a_head(tmp_path: Path) -> None:
    """llhttp skips CR and LF between requests: a peer sending only those is answered 400 and
    closed once they are longer than a head may be, not read until the request timeout."""
    async with running(tmp_path, request_timeout=60, max_head=1024) as server:
        stream = await server.tls()
        with trio.fail_after(10):
            response, _ = await exchange(stream, post(ROTATE, 2), b"{}")
            assert response.status_code == 200
            await stream.send_all(b"\r\n" * 513)  # (all read: no reset loses the answer)
            data = await read_until_closed(stream)
        assert data.startswith(b"HTTP/1.1 400 ") and b"connection: close" in data
        assert server.refused(400) == 1


async def test_a_head_request_gets_a_head_and_no_body(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        stream = await server.tls()
        response, body = await exchange(
            stream, h11.Request(method="HEAD", target=ROTATE, headers=[("host", "bob")])
        )
        assert response.status_code == 405 and body == b""
        assert int(dict(response.headers)[b"content-length"]) > 0  # a GET's, not sent
        # pipelined with a request after it: nothing comes between the two answers
        await stream.send_all(
            b"HEAD /nope HTTP/1.1\r\nhost: bob\r\n\r\n" + post_bytes(ROTATE, b"{}")
        )
        data = b""
        with trio.fail_after(10):
            while not data.endswith(b'{"ok":true}'):
                data += await stream.receive_some(4096)
        assert data.startswith(b"HTTP/1.1 404 ")
        assert data.partition(b"\r\n\r\n")[2].startswith(b"HTTP/1.1 200 OK\r\n")


async def test_part_of_a_request_after_an_answer_is_held_to_the_request_timeout(
    tmp_path: Path,
) -> None:
    """A head begun in the read that carried the last request is a request under way: it
    has the request timeout, not the idle one."""
    async with running(tmp_path, request_timeout=0.5, idle_timeout=60) as server:
        stream = await server.tls()
        await stream.send_all(post_bytes(ROTATE, b"{}") + post_bytes(ROTATE, b"{}")[:30])
        assert await closed_by_server(stream, 10)
        assert len(server.calls) == 1 and server.dropped("request-timeout") == 1


def post_bytes(path: str, body: bytes, *headers: bytes, version: bytes = b"1.1") -> bytes:
    head = b"POST " + path.encode() + b" HTTP/" + version + b"\r\nhost: bob\r\n"
    head += b"content-length: %d\r\n" % len(body) + b"".join(h + b"\r\n" for h in headers)
    return head + b"\r\n" + body


async def test_pipelined_requests_are_answered_in_turn(tmp_path: Path) -> None:
    """Requests sent together, before any answer: each is answered in order, for the link it
    named, and a malformed one after them is answered 400 once those before it are."""
    async with running(tmp_path) as server:
        stream = await server.tls()
        links = [f"link{i}" for i in range(5)]
        await stream.send_all(
            b"".join(post_bytes(f"/v1/links/{link}/rotate", link.encode()) for link in links)
            + post_bytes("/nope", b"{}") + b"NOT HTTP\r\n\r\n"
        )  # fmt: skip
        data = await read_until_closed(stream)
        statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", data)
        assert statuses == [b"200"] * 5 + [b"404", b"400"]
        assert [(c[0], c[2]) for c in server.calls] == [(link, link.encode()) for link in links]


async def test_pipelined_requests_are_answered_one_per_pass_of_the_loop(tmp_path: Path) -> None:
    """A client sending 200 small requests in one go (a peer's certificate is enough) whose
    handler returns at once: each request is a step of its own, as if it had been read alone,
    not all of them answered in one step while every other connection and link waits."""
    steps, seen = TaskSteps(), []

    async def handler(
        link: str, action: str, body: bytes, identity: PeerIdentity, reply_now: ReplyNow
    ) -> bytes:
        seen.append(steps.total)  # two calls with one count ran in one step
        return b"{}"

    async with running(tmp_path, handler) as server:
        stream = await server.tls()
        count = 200
        with steps:
            await stream.send_all(post_bytes("/v1/links/l/rotate", b"") * count)
            with trio.fail_after(20):
                received = b""
                while received.count(b"HTTP/1.1 200 ") < count:
                    received += await stream.receive_some(65536)
        assert len(seen) == count
        assert len(set(seen)) == count  # no two in one step


async def test_http_1_0_gets_one_answer_and_a_close(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        stream = await server.tls()
        await stream.send_all(post_bytes(ROTATE, b"{}", version=b"1.0") + post_bytes(ROTATE, b"{}"))
        data = await read_until_closed(stream)
        assert data.startswith(b"HTTP/1.1 200 ") and b"connection: close" in data
        assert data.endswith(b'{"ok":true}') and data.count(b"HTTP/1.1") == 1
        stream = await server.tls()  # a batch, unframed: it ends with the connection
        batch = _batch(("a", "rotate", b"1"), ("b", "commit", b"2"))
        await stream.send_all(post_bytes("/v1/batch", batch, version=b"1.0"))
        data = await read_until_closed(stream)
        head, _, body = data.partition(b"\r\n\r\n")
        assert b"connection: close" in head and b"transfer-encoding" not in head
        assert batchwire.decode_reply(body, 2) == [batchwire.Answer(200, b'{"ok":true}')] * 2


def expecting(path: str) -> bytes:
    """The head of a two-byte request whose client waits for `100 Continue`."""
    return post_bytes(path, b"{}", b"expect: 100-continue")[:-2]


async def test_a_client_expecting_100_continue_gets_it_then_its_answer(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        stream = await server.tls()
        for _ in range(2):  # and the connection is kept
            await stream.send_all(expecting(ROTATE))
            data = b""
            with trio.fail_after(10):
                while b"\r\n\r\n" not in data:
                    data += await stream.receive_some(4096)
            assert data == b"HTTP/1.1 100 Continue\r\n\r\n"
            await stream.send_all(b"{}")
            while not data.endswith(b'{"ok":true}'):
                data += await stream.receive_some(4096)
            assert b"HTTP/1.1 200 OK\r\n" in data
        # refused before its body is read: closed, the client may be waiting for a 100
        await stream.send_all(expecting("/nope"))
        data = await read_until_closed(stream)
        assert data.startswith(b"HTTP/1.1 404 ") and b"connection: close" in data
        assert [c[2] for c in server.calls] == [b"{}", b"{}"]


async def test_the_client_certificate_names_reach_the_handler(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        for name in ("alice", "mallory"):
            async with httpx.AsyncClient(verify=server.context(name), timeout=5) as http:
                reply = await http.post(server.url + ROTATE, content=b"{}")
                assert reply.status_code == 200
    alice, mallory = (c[3] for c in server.calls)
    assert alice.matches("alice") and not alice.matches("mallory")
    assert mallory.matches("mallory") and not mallory.matches("alice")
    assert "mallory" in mallory.dns and mallory.common_names == ("mallory",)


async def test_a_certificate_naming_no_peer_gets_no_slot(tmp_path: Path) -> None:
    """Review finding: any CA-certificate holder could fill every established slot with cheap
    requests; now a certificate that names no configured peer is reset after the handshake,
    and one identity holds at most `max_per_identity` connections."""
    peers = {"alice"}
    async with running(
        tmp_path, is_peer=lambda i: any(i.matches(p) for p in peers), max_per_identity=2
    ) as server:
        async with httpx.AsyncClient(verify=server.context("mallory"), timeout=5) as http:
            with pytest.raises(httpx.TransportError):
                await http.post(server.url + ROTATE, content=b"{}")
        assert not server.calls
        refused = server.metrics.peer_connections_refused
        assert refused.labels("not-a-peer")._value.get() == 1
        held = []
        for _ in range(2):  # alice's two slots, each proven established by an answer
            stream = await server.tls(name="alice")
            response, _ = await exchange(stream, post(ROTATE, 2), b"{}")
            assert response.status_code == 200
            held.append(stream)
        third = await server.tls(name="alice")
        with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)):
            await exchange(third, post(ROTATE, 2), b"{}")  # reset: identity-full
        assert refused.labels("identity-full")._value.get() == 1
        for stream in held:
            await stream.aclose()
        async with httpx.AsyncClient(verify=server.context("alice"), timeout=5) as http:
            reply = await http.post(server.url + ROTATE, content=b"{}")  # a slot is free again
        assert reply.status_code == 200


async def test_a_client_without_certificate_fails_the_handshake(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        stream = await server.tls(name=None)
        with pytest.raises((trio.BrokenResourceError, AssertionError, h11.RemoteProtocolError)):
            await exchange(stream, post(ROTATE, 2), b"{}")  # TLS 1.3: the alert comes here
        for _ in range(1000):  # the server's task counts it a moment later
            if server.dropped("handshake-failed"):
                break
            await trio.sleep(0.01)
        assert server.dropped("handshake-failed") == 1
        assert not server.calls


async def test_a_connection_that_never_says_hello_is_closed(tmp_path: Path) -> None:
    async with running(
        tmp_path, handshake_timeout=0.3, idle_timeout=60, defer_accept=False
    ) as server:
        silent = await trio.open_tcp_stream("127.0.0.1", server.port)
        assert await closed_by_server(silent)
        assert server.dropped("handshake-timeout") == 1


async def test_a_trickling_sender_is_closed_after_the_request_timeout(tmp_path: Path) -> None:
    async with running(tmp_path, request_timeout=0.5, idle_timeout=60) as server:
        stream = await server.tls()
        client = h11.Connection(h11.CLIENT)
        await stream.send_all(client.send(post(ROTATE, 1000)))

        async def trickle() -> None:  # 1 byte / 50 ms: 50 s for the body
            try:
                for _ in range(1000):
                    await stream.send_all(b"x")
                    await trio.sleep(0.05)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            assert await closed_by_server(stream)
            nursery.cancel_scope.cancel()
        assert server.dropped("request-timeout") == 1 and not server.calls


async def test_idle_flood_evicts_the_oldest_handshakes_and_a_peer_gets_through(
    tmp_path: Path,
) -> None:
    async with running(
        tmp_path, max_handshaking=4, handshake_timeout=60, defer_accept=False
    ) as server:
        idle = [await trio.open_tcp_stream("127.0.0.1", server.port) for _ in range(20)]
        async with httpx.AsyncClient(verify=server.context(), timeout=5) as http:
            reply = await http.post(server.url + ROTATE, content=b"{}")
        assert reply.status_code == 200 and len(server.calls) == 1
        assert server.dropped("handshaking-full") == 17  # 20 + the peer - 4
        assert await closed_by_server(idle[0], bound=5)  # the oldest went first
        for stream in idle:
            await stream.aclose()


async def test_a_silent_socket_stays_in_the_kernel_until_it_speaks(tmp_path: Path) -> None:
    async with running(tmp_path, max_handshaking=1, handshake_timeout=60) as server:
        silent = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with httpx.AsyncClient(verify=server.context(), timeout=5) as http:
            reply = await http.post(server.url + ROTATE, content=b"{}")
        assert reply.status_code == 200
        assert server.dropped("handshaking-full") == 0  # it held no handshake slot
        late = trio.SSLStream(silent, server.context(), server_hostname="127.0.0.1")
        response, _ = await exchange(late, post(ROTATE, 2), b"{}")  # a late talker is served
        assert response.status_code == 200 and len(server.calls) == 2


async def test_reopening_evicted_sockets_in_a_loop_is_refused_beyond_the_churn_budget(
    tmp_path: Path,
) -> None:
    limits = {"max_handshaking": 2, "handshake_timeout": 60, "defer_accept": False}
    async with running(tmp_path, churn_rate=0.001, churn_burst=3, **limits) as server:
        # Connected before the server accepts any (a refusal resets them, so no trio connect)
        socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(8)]
        streams = [trio.SocketStream(trio.socket.from_stdlib_socket(s)) for s in socks]
        for stream in streams[-3:]:  # 2 held, 3 that each pushed an older one out, 3 refused
            assert await closed_by_server(stream, bound=5)
        assert server.dropped("handshaking-full") == 3 and server.dropped("churn") == 3
        for stream in streams:
            await stream.aclose()


async def test_refused_requests_beyond_the_address_budget_wait_and_others_do_not(
    tmp_path: Path,
) -> None:
    async with running(tmp_path, refusal_rate=0.001, refusal_burst=3) as server:
        flood = await server.tls("mallory")
        for _ in range(4):  # the budget, then one more answer before the wait
            response, _ = await exchange(flood, post("/nope", 2), b"{}")
            assert response.status_code == 404
        with trio.move_on_after(1) as waited:  # the next token is 1,000 s away
            await exchange(flood, post("/nope", 2), b"{}")
        assert waited.cancelled_caught
        peer = await server.tls()  # same address, nothing refused on it: served at once
        response, _ = await exchange(peer, post(ROTATE, 2), b"{}")
        assert response.status_code == 200 and len(server.calls) == 1
        assert server.refused(404) == 4


async def test_a_client_reconnecting_for_each_refused_request_waits_as_one_connection_would(
    tmp_path: Path,
) -> None:
    """Review finding: a new connection started with no penalty, so a client opening one per
    refused request was never slowed (28 times the budget). A new connection waits for the
    debt of its address and certificate; another certificate at the same address does not."""
    async with running(tmp_path, refusal_rate=0.001, refusal_burst=3) as server:
        for _ in range(4):  # the budget, then one more answer (its tokens reserved ahead)
            flood = await server.tls("mallory")
            response, _ = await exchange(flood, post("/nope", 2), b"{}")
            assert response.status_code == 404
            await flood.aclose()
        late = await server.tls("mallory")
        with trio.move_on_after(1) as waited:  # the debt is paid in 1,000 s
            await exchange(late, post("/nope", 2), b"{}")
        assert waited.cancelled_caught and server.refused(404) == 4
        peer = await server.tls()  # alice, same address: not her debt
        response, _ = await exchange(peer, post(ROTATE, 2), b"{}")
        assert response.status_code == 200 and len(server.calls) == 1


async def test_connections_opened_before_any_refusal_wait_for_their_clients_debt_too(
    tmp_path: Path,
) -> None:
    """Review finding: connections opened ahead, each refused once, were all answered at
    once (20 at a burst of 3). A connection checks its client's debt again once a request's
    head is in, and waits before handling it."""
    async with running(tmp_path, refusal_rate=0.001, refusal_burst=3) as server:
        opened = [await server.tls("mallory") for _ in range(5)]
        for stream in opened:  # each served once: waiting for its next request, before the debt
            response, _ = await exchange(stream, post(ROTATE, 2), b"{}")
            assert response.status_code == 200
        for stream in opened[:4]:  # the budget, then one more answer (reserved ahead)
            response, _ = await exchange(stream, post("/nope", 2), b"{}")
            assert response.status_code == 404
        with trio.move_on_after(1) as waited:  # opened before the debt, used after it
            await exchange(opened[4], post("/nope", 2), b"{}")
        assert waited.cancelled_caught and server.refused(404) == 4
        peer = await server.tls()  # alice: not her debt
        response, _ = await exchange(peer, post(ROTATE, 2), b"{}")
        assert response.status_code == 200 and len(server.calls) == 6


async def test_a_stranger_reopening_at_once_is_refused_at_accept_beyond_its_budget(
    tmp_path: Path,
) -> None:
    limits = {"stranger_rate": 0.001, "stranger_burst": 2}
    async with running(tmp_path, is_peer=lambda i: i.matches("alice"), **limits) as server:
        for _ in range(3):  # 2 handshakes, each reset after it; then reset at accept
            with pytest.raises((OSError, trio.BrokenResourceError, trio.ClosedResourceError)):
                stream = await server.tls("mallory")
                await exchange(stream, post(ROTATE, 2), b"{}")
        assert server.dropped("not-a-peer") == 2 and server.dropped("stranger") == 1
        assert not server.calls


class _FakeTcp:
    class socket:  # stands in for trio.SocketStream.socket
        closed = False
        reset = False

        @classmethod
        def setsockopt(cls, *option: Any) -> None:
            cls.reset = option[1] == socket.SO_LINGER

        @classmethod
        def close(cls) -> None:
            cls.closed = True


class _OutOfDescriptors:
    def __init__(self, failures: int) -> None:
        self.failures = failures

    async def accept(self) -> Any:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        await trio.sleep_forever()


async def test_running_out_of_descriptors_backs_off_sheds_and_logs_a_summary(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    metrics = Metrics()
    admission = Admission(max_connections=8, max_per_address=8, max_handshaking=4)
    limits = ServerLimits(summary_interval=60)
    server = _Server(None, None, limits, admission, metrics, None)  # type: ignore[arg-type]
    waiting = _Conn(_FakeTcp, "198.51.100.1")  # type: ignore[arg-type]
    admission.admit(waiting, "198.51.100.1")
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.accept_loop, _OutOfDescriptors(1000), nursery)
        nursery.start_soon(server.summaries)
        await trio.sleep(61)
        nursery.cancel_scope.cancel()
    sample = metrics.registry.get_sample_value(
        "qkdagent_peer_connections_refused_total", {"reason": "no-descriptors"}
    )
    assert sample == 1000  # every failure counted, none crashed the loop
    assert trio.current_time() - started >= 1000 * 0.05  # it backed off, it did not spin
    assert _FakeTcp.socket.closed and len(admission) == 0  # a handshake was shed
    assert _FakeTcp.socket.reset  # with RST: it never authenticated
    lines = [r.getMessage() for r in caplog.records]
    assert sum("no-descriptors" in line and "closed" in line for line in lines) == 10
    assert "peer API: refused 0 requests, dropped 1000 connections" in caplog.text
    assert "Traceback" not in caplog.text


# -- agents at a 1,024 descriptor limit under 2,000 idle connections --------------------------


def _limited(nofile: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return apply


class LimitedAgent(AgentProcess):
    """An agent process started with RLIMIT_NOFILE soft = hard = `nofile`."""

    def __init__(self, config: Path, log: Path, nofile: int) -> None:
        super().__init__(config, log, preexec=_limited(nofile))

    def descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


def _open_idle(port: int, count: int, bound: float) -> list[socket.socket]:
    """`count` plain TCP connections that never send a byte (non-blocking connects, then
    waiting up to `bound` s for them to be established)."""
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        socks.append(sock)
    poller = select.poll()
    for sock in socks:
        poller.register(sock, select.POLLOUT)
    pending, deadline = len(socks), time.monotonic() + bound
    while pending and time.monotonic() < deadline:
        for fd, _ in poller.poll(100):
            poller.unregister(fd)
            pending -= 1
    return socks


LINK = "alice-bob"


def test_two_thousand_idle_connections_at_a_1024_limit_leave_rotations_going(
    tmp_path: Path,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 4096
    try:  # this process holds the 2,000 sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), max(hard, needed)))
    except (OSError, ValueError):
        pytest.fail(f"cannot raise this process's descriptor limit to {needed} (hard {hard})")
    paths = process_pair(tmp_path, link={"interval": 0.2, "jitter": 0, "reject_after": 60})
    agents = {n: LimitedAgent(paths[n], tmp_path / f"{n}.log", 1024) for n in ("bob", "alice")}
    alice, bob = agents["alice"], agents["bob"]
    held: list[socket.socket] = []
    try:
        wait_until(lambda: alice.epochs().get(LINK, 0) >= 2, 30, "the first rotations")
        held = _open_idle(bob.peer_port, 2000, bound=30)
        start = alice.epochs()[LINK]
        peak = bob.descriptors()
        wait_until(
            lambda: alice.epochs().get(LINK, 0) >= start + 10 and bob.epochs().get(LINK, 0) > start,
            60,
            "ten more rotations while 2,000 idle connections are held",
        )
        peak = max(peak, bob.descriptors())
        assert all(sock.fileno() != -1 for sock in held)  # still held by the attacker
        assert peak < 1024
    finally:
        for sock in held:
            sock.close()
        for agent in agents.values():
            agent.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    log = (tmp_path / "bob.log").read_text()
    assert "Traceback" not in log


# -- batches (issue 18) --------------------------------------------------------------------


def _batch(*items: tuple[str, str, bytes]) -> bytes:
    return batchwire.encode_request([batchwire.Item(*item) for item in items])


async def send_batch(stream: trio.abc.Stream, data: bytes) -> h11.Connection:
    """Send a batch request whole; the client connection reads what comes back."""
    client = h11.Connection(h11.CLIENT)
    await stream.send_all(
        client.send(post("/v1/batch", len(data))) + client.send(h11.Data(data=data))
        + client.send(h11.EndOfMessage())
    )  # fmt: skip
    return client


def _reset(stream: trio.SSLStream[Any]) -> None:
    """Close the client's socket with a reset (SO_LINGER 0): the server's next write fails."""
    sock = stream.transport_stream.socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def _reply_data(client: h11.Connection, stream: trio.abc.Stream) -> AsyncIterator[h11.Data]:
    """The body pieces of a 200 reply to what `client` sent, reading as needed, to its end."""
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            assert event.status_code == 200
        elif isinstance(event, h11.Data):
            yield event
        elif isinstance(event, h11.EndOfMessage):
            return


async def test_a_batch_is_answered_item_by_item_as_if_each_came_alone(tmp_path: Path) -> None:
    async def handler(
        link: str, action: str, body: bytes, identity: PeerIdentity, reply_now: ReplyNow
    ) -> bytes:
        calls.append((link, action, body, identity))
        if link == "refused":
            raise ProtocolError("wrong epoch", status=409, body=b'{"error":"epoch"}')
        if link == "bug":
            raise RecursionError("deep")
        return b"answer-" + body

    calls: list[tuple[str, str, bytes, PeerIdentity]] = []
    async with running(tmp_path, handler) as server:
        stream = await server.tls()
        data = _batch(("a", "rotate", b"1"), ("refused", "commit", b"2"), ("bug", "resync", b"3"),
                      ("b", "announce", b"4"))  # fmt: skip
        response, body = await exchange(stream, post("/v1/batch", len(data)), data)
        assert response.status_code == 200
        assert batchwire.decode_reply(body, 4) == [
            batchwire.Answer(200, b"answer-1"),
            batchwire.Answer(409, b'{"error":"epoch"}'),
            batchwire.Answer(500, error_body("internal", "internal error")),
            batchwire.Answer(200, b"answer-4"),
        ]
        assert sorted((c[0], c[1], c[2]) for c in calls) == [
            ("a", "rotate", b"1"), ("b", "announce", b"4"), ("bug", "resync", b"3"),
            ("refused", "commit", b"2"),
        ]  # fmt: skip
        assert all(c[3].matches("alice") for c in calls)  # the connection's certificate
        response, body = await exchange(stream, post(ROTATE, 1), b"5")  # kept alive
        assert response.status_code == 200 and body == b"answer-5"
        assert server.refused(409) == 1 and server.refused(500) == 1
        sample = server.metrics.registry.get_sample_value
        assert sample("qkdagent_peer_batches_received_total") == 1
        assert sample("qkdagent_peer_batched_requests_received_total") == 4


async def test_a_batch_runs_its_items_side_by_side_and_answers_once_all_have(
    tmp_path: Path,
) -> None:
    """Item `a` waits for item `b` (which it could not, one after the other); a commit that
    replies early counts as answered, and goes on after its answer is sent."""
    b_ran, release, finished = trio.Event(), trio.Event(), trio.Event()

    async def handler(
        link: str, action: str, body: bytes, identity: PeerIdentity, reply_now: ReplyNow
    ) -> bytes:
        if link == "a":
            await b_ran.wait()
        elif link == "b":
            b_ran.set()
        else:
            await reply_now(b"early")
            await release.wait()
            finished.set()
        return link.encode()

    async with running(tmp_path, handler) as server:
        stream = await server.tls()
        data = _batch(("a", "rotate", b""), ("b", "rotate", b""), ("c", "commit", b""))
        with trio.fail_after(10):
            _, body = await exchange(stream, post("/v1/batch", len(data)), data)
        assert [a.body for a in batchwire.decode_reply(body, 3)] == [b"a", b"b", b"early"]
        assert not finished.is_set()
        release.set()
        with trio.fail_after(10):
            await finished.wait()


async def test_each_answer_of_a_batch_is_streamed_as_soon_as_it_is_given(tmp_path: Path) -> None:
    """A slow item holds up no other's answer, and an item that answered early goes on as
    soon as its own answer is sent (here it is what lets the slow one finish)."""
    committed_on = trio.Event()

    async def handler(
        link: str, action: str, body: bytes, identity: PeerIdentity, reply_now: ReplyNow
    ) -> bytes:
        if link == "slow":
            await committed_on.wait()
        elif link == "commit":
            await reply_now(b"acknowledged")
            committed_on.set()  # only once its answer is out
        return link.encode()

    async with running(tmp_path, handler) as server:
        stream = await server.tls()
        data = _batch(("slow", "rotate", b""), ("fast", "rotate", b""), ("commit", "commit", b""))
        client = await send_batch(stream, data)
        reader, answers = batchwire.ReplyReader(3), {}
        with trio.fail_after(10):
            async for event in _reply_data(client, stream):
                for index, answer in reader.feed(bytes(event.data)):
                    assert index != 0 or {1, 2} <= set(answers)  # the slow one last
                    answers[index] = answer.body
        reader.finish()
        assert answers == {0: b"slow", 1: b"fast", 2: b"acknowledged"}


async def _read_chunks(
    client: h11.Connection, stream: trio.abc.Stream, count: int
) -> tuple[list[bytes], dict[int, bytes]]:
    """The chunks of a streamed batch reply as the server wrote them, and its answers' bodies
    by index (read here without the client's bound on an answer's size)."""
    chunks, piece = [], b""
    async for event in _reply_data(client, stream):
        piece += bytes(event.data)
        if event.chunk_end:
            chunks.append(piece)
            piece = b""
    data = b"".join(chunks)
    offset, answers = len(batchwire.reply_head(count)), {}
    assert data[:offset] == batchwire.reply_head(count)
    while offset < len(data):
        index, status, size = struct.unpack_from(">HHI", data, offset)
        offset += 8
        assert status == 200
        answers[index] = data[offset : offset + size]
        offset += size
    return chunks, answers


async def test_answers_given_at_one_moment_go_out_in_one_write(tmp_path: Path) -> None:
    """Ten items answered at the same moment (as a group commit answers them): one chunk
    after the reply's head, written by one of them while the others' tasks end at once (with
    a lock, each woke in turn to find its answer sent: nine wake-ups for nothing)."""
    go = trio.Event()

    async def handler(
        link: str, action: str, body: bytes, identity: PeerIdentity, reply_now: ReplyNow
    ) -> bytes:
        await go.wait()
        return link.encode()

    async with running(tmp_path, handler) as server:
        stream = await server.tls()
        links = [f"l{i}" for i in range(10)]
        client = await send_batch(stream, _batch(*((link, "rotate", b"") for link in links)))
        await trio.testing.wait_all_tasks_blocked()
        with TaskSteps() as steps:
            go.set()
            with trio.fail_after(10):
                chunks, answers = await _read_chunks(client, stream, len(links))
        assert answers == {i: link.encode() for i, link in enumerate(links)}
        assert len(chunks) == 2  # the batch reply's head, then every answer
        # each woken by its answer, and the writer once more to let the others give theirs
        assert steps.of_tasks_named("._stream_answers.<locals>.answer") == len(links) + 1


async def test_an_item_that_answered_early_goes_on_once_its_answer_is_written_by_another(
    tmp_path: Path,
) -> None:
    """The commit's answer goes in a write another item's task makes (the big answers fill
    the socket while the client does not read): its handler goes on only once that write is
    done, not once its answer was handed over."""
    go, went_on = trio.Event(), trio.Event()
    big = b"x" * (2 << 20)

    async def handler(
        link: str, action: str, body: bytes, identity: PeerIdentity, reply_now: ReplyNow
    ) -> bytes:
        await go.wait()
        if action == "commit":
            await reply_now(b"acknowledged")
            went_on.set()
            return b"late"
        return big

    async with running(tmp_path, handler) as server:
        stream = await server.tls()
        items = [(f"big{i}", "rotate", b"") for i in range(8)] + [("c", "commit", b"")]
        client = await send_batch(stream, _batch(*items))
        await trio.testing.wait_all_tasks_blocked()
        go.set()
        await trio.testing.wait_all_tasks_blocked()
        assert not went_on.is_set()  # its answer is given, not yet written
        with trio.fail_after(20):
            _, answers = await _read_chunks(client, stream, len(items))
            await went_on.wait()
        assert answers == {**{i: big for i in range(8)}, 8: b"acknowledged"}


@pytest.mark.parametrize("how", ["timeout", "reset"])
async def test_early_items_queued_behind_a_write_that_fails_go_on(tmp_path: Path, how: str) -> None:
    """A commit answers while the big answers' write is blocked (the client does not read),
    so its answer waits for that write; the write then times out or the client resets: the
    commit's handler goes on (it holds its link's lock until then), as does a commit that
    answers after the break, and the connection is closed."""
    go, first, second = trio.Event(), trio.Event(), trio.Event()
    went_on = {"c1": trio.Event(), "c2": trio.Event()}
    big = b"x" * (2 << 20)

    async def handler(
        link: str, action: str, body: bytes, identity: PeerIdentity, reply_now: ReplyNow
    ) -> bytes:
        if action == "commit":
            await (first if link == "c1" else second).wait()
            await reply_now(b"acknowledged")
            went_on[link].set()
            return b"late"
        await go.wait()
        return big

    async with running(tmp_path, handler, request_timeout=0.5) as server:
        stream = await server.tls()
        items = [(f"big{i}", "rotate", b"") for i in range(8)]
        await send_batch(stream, _batch(*items, ("c1", "commit", b""), ("c2", "commit", b"")))
        await trio.testing.wait_all_tasks_blocked()
        go.set()
        await trio.testing.wait_all_tasks_blocked()  # the write is blocked on the socket
        first.set()
        await trio.testing.wait_all_tasks_blocked()
        assert not went_on["c1"].is_set()  # its answer waits for the blocked write
        if how == "reset":
            _reset(stream)
        with trio.fail_after(10):
            await went_on["c1"].wait()
        second.set()
        with trio.fail_after(10):
            await went_on["c2"].wait()
        if how == "timeout":
            assert await closed_by_server(stream)


@pytest.mark.parametrize("how", ["timeout", "reset"])
async def test_an_early_item_in_a_write_that_fails_goes_on(tmp_path: Path, how: str) -> None:
    """The commit's answer goes in a write with eight big answers (given while three big ones
    were being written), which then times out or is reset: its handler goes on all the
    same."""
    go, then, went_on = trio.Event(), trio.Event(), trio.Event()
    big = b"x" * (2 << 20)

    async def handler(
        link: str, action: str, body: bytes, identity: PeerIdentity, reply_now: ReplyNow
    ) -> bytes:
        await (go if link.startswith("a") else then).wait()
        if action == "commit":
            await reply_now(b"acknowledged")
            went_on.set()
        return big

    async with running(tmp_path, handler, request_timeout=5) as server:
        stream = await server.tls()
        # (a receive buffer that does not grow as the client reads: the second write blocks)
        stream.transport_stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        items = [(f"a{i}", "rotate", b"") for i in range(3)] + [("c", "commit", b"")]
        items += [(f"b{i}", "rotate", b"") for i in range(8)]
        client = await send_batch(stream, _batch(*items))
        await trio.testing.wait_all_tasks_blocked()
        go.set()
        await trio.testing.wait_all_tasks_blocked()  # the first write is blocked on the socket
        then.set()
        await trio.testing.wait_all_tasks_blocked()  # the others' answers wait for it
        # read the first write (the reply's head and the a-answers) and no more
        body, wanted = b"", len(batchwire.reply_head(len(items))) + 3 * (8 + len(big))
        with trio.fail_after(10):
            async with aclosing(_reply_data(client, stream)) as pieces:
                async for event in pieces:
                    body += bytes(event.data)
                    if len(body) >= wanted:
                        break
        await trio.testing.wait_all_tasks_blocked()  # the second write is blocked now
        assert not went_on.is_set()  # its answer is in that write
        if how == "reset":
            _reset(stream)
        with trio.fail_after(10):
            await went_on.wait()


async def test_a_batch_naming_a_link_twice_is_refused(tmp_path: Path) -> None:
    """An honest initiator has one request per link under way; the same commit twice in one
    batch could have one wait for the lock the other holds."""
    async with running(tmp_path) as server:
        stream = await server.tls()
        data = _batch(("a", "commit", b"{}"), ("b", "rotate", b"{}"), ("a", "commit", b"{}"))
        response, body = await exchange(stream, post("/v1/batch", len(data)), data)
        assert response.status_code == 400 and b"twice" in body
        assert server.calls == []


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"QKB1\x00\x00", 400),
        (b"not a batch", 400),
        (_batch(("a", "rotate", b"{}"))[:-1], 400),
        (b"QKB1\x00\x01\x00\x01a" + struct.pack(">I", 2**31) + b"x", 413),
    ],
)
async def test_a_malformed_batch_is_refused_and_reaches_no_handler(
    tmp_path: Path, data: bytes, status: int
) -> None:
    async with running(tmp_path) as server:
        stream = await server.tls()
        response, body = await exchange(stream, post("/v1/batch", len(data)), data)
        assert response.status_code == status and json.loads(body)["error"] == "batch"
        response, _ = await exchange(stream, post(ROTATE, 2), b"{}")  # kept alive
        assert response.status_code == 200
        assert len(server.calls) == 1 and server.refused(status) == 1


async def test_an_oversized_or_unposted_batch_is_refused_unread(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        stream = await server.tls()
        request = post("/v1/batch", batchwire.MAX_BATCH + 1)
        await stream.send_all(h11.Connection(h11.CLIENT).send(request))  # and no body
        data = b""
        with trio.fail_after(10):  # answered from the content-length, before any of the body
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(4096)
        assert data.startswith(b"HTTP/1.1 413 ")
        async with httpx.AsyncClient(verify=server.context(), timeout=5) as http:
            reply = await http.get(server.url + "/v1/batch")
            assert reply.status_code == 405 and reply.json()["error"] == "method"
        assert server.calls == []


async def test_batches_past_the_per_client_bound_are_answered_busy_unread(
    tmp_path: Path,
) -> None:
    release = trio.Event()

    async def handler(
        link: str, action: str, body: bytes, identity: PeerIdentity, reply_now: ReplyNow
    ) -> bytes:
        await release.wait()
        return b"{}"

    async with running(tmp_path, handler, max_batches_per_identity=1) as server:
        first, second = await server.tls(), await server.tls()
        three = _batch(*[(f"l{i}", "rotate", b"{}") for i in range(3)])
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(exchange, first, post("/v1/batch", len(three)), three)
                await trio.testing.wait_all_tasks_blocked()
                response, body = await exchange(second, post("/v1/batch", len(three)), three)
                assert response.status_code == 503 and json.loads(body)["error"] == "busy"
                release.set()
            two = _batch(("m", "rotate", b"{}"), ("n", "rotate", b"{}"))
            response, _ = await exchange(second, post("/v1/batch", len(two)), two)
            assert response.status_code == 200  # the first batch is done: room again (and
        assert server.refused(503) == 1  # the connection was kept after the 503)


async def test_a_batch_without_content_length_is_refused_and_closed(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        stream = await server.tls()
        data = _batch(("a", "rotate", b"{}"))
        response, body = await exchange(stream, post("/v1/batch", chunked=True), data)
        assert response.status_code == 411 and json.loads(body)["error"] == "length"
        assert await closed_by_server(stream)
        stream = await server.tls()  # no framing at all: a batch needs its content-length
        response, body = await exchange(stream, post("/v1/batch"))
        assert response.status_code == 411 and json.loads(body)["error"] == "batch"
        assert await closed_by_server(stream)
        assert server.calls == []


async def test_each_refused_item_of_a_batch_costs_a_refusal_token(tmp_path: Path) -> None:
    async def handler(
        link: str, action: str, body: bytes, identity: PeerIdentity, reply_now: ReplyNow
    ) -> bytes:
        raise ProtocolError("bad MAC", status=403)

    async with running(tmp_path, handler, refusal_rate=0.001, refusal_burst=4) as server:
        flood = await server.tls("mallory")
        forged = _batch(*[(f"l{i}", "rotate", b"{}") for i in range(5)])
        response, _ = await exchange(flood, post("/v1/batch", len(forged)), forged)
        assert response.status_code == 200 and server.refused(403) == 5
        with trio.move_on_after(1) as waited:  # 5 refusals against a burst of 4: it waits
            await exchange(flood, post(ROTATE, 2), b"{}")
        assert waited.cancelled_caught


def _refusing(message: str, status: int) -> Handler:
    """A handler refusing every request with `status`."""

    async def handler(
        link: str, action: str, body: bytes, identity: PeerIdentity, reply_now: ReplyNow
    ) -> bytes:
        raise ProtocolError(message, status=status)

    return handler


async def test_refusals_for_a_clients_own_links_spend_each_links_allowance_first(
    tmp_path: Path,
) -> None:
    """Review finding (M1): a responder restored from an old backup refuses each link's next
    announce and rotate (409, epoch), and on the client's budget alone 10,000 links recovered
    at 10 a second. A 409 for a link the client's certificate serves spends that link's
    allowance (two) first; past it, or for a link it does not serve, the client's budget."""

    handler = _refusing("epoch", 409)

    def serves(identity: PeerIdentity, link: str) -> bool:
        return identity.matches("alice") and link.startswith("l")

    limits = {"refusal_rate": 0.001, "refusal_burst": 1}
    async with running(tmp_path, handler, serves=serves, **limits) as server:
        peer = await server.tls()
        every_link = _batch(*[(f"l{i}", "rotate", b"{}") for i in range(30)])
        for _ in range(2):  # each link's allowance: an announce and a rotate, say
            response, _ = await exchange(peer, post("/v1/batch", len(every_link)), every_link)
            assert response.status_code == 200
        assert server.refused(409) == 60
        statuses = []
        for link in ("l30", "l0", "l1"):  # l30 on its allowance; then the client's budget
            with trio.move_on_after(1) as waited:
                response, _ = await exchange(peer, post(f"/v1/links/{link}/rotate", 2), b"{}")
                statuses.append(response.status_code)
            assert not waited.cancelled_caught  # (l0: no debt yet; l1: l0 took the burst of 1)
        assert statuses == [409, 409, 409] and server.refused(409) == 63
        with trio.move_on_after(1) as waited:  # two refusals against a burst of 1
            await exchange(peer, post("/v1/links/l2/rotate", 2), b"{}")
        assert waited.cancelled_caught

        flood = await server.tls("mallory")  # serves none of them: its own budget only
        forged = _batch(*[(f"l{i}", "rotate", b"{}") for i in range(31, 34)])
        response, _ = await exchange(flood, post("/v1/batch", len(forged)), forged)
        assert response.status_code == 200 and server.refused(409) == 66
        with trio.move_on_after(1) as waited:
            await exchange(flood, post("/v1/links/l35/rotate", 2), b"{}")
        assert waited.cancelled_caught


async def test_a_refused_commit_for_a_clients_own_link_spends_the_links_allowance_too(
    tmp_path: Path,
) -> None:
    """A commit is answered on the early-reply path (the handler may go on after it): its
    409 goes on the link's allowance as a rotate's does (review gap)."""

    handler = _refusing("no pending epoch", 409)
    limits = {"refusal_rate": 0.001, "refusal_burst": 1}
    async with running(tmp_path, handler, serves=lambda i, link: True, **limits) as server:
        peer = await server.tls()
        for link in ("l0", "l0", "l1", "l1", "l2"):  # two allowances each, then l2's first
            with trio.move_on_after(1) as waited:
                response, _ = await exchange(peer, post(f"/v1/links/{link}/commit", 2), b"{}")
            assert not waited.cancelled_caught and response.status_code == 409
        assert server.refused(409) == 5


async def test_a_forged_request_for_a_clients_own_link_spends_its_budget_not_the_links(
    tmp_path: Path,
) -> None:
    """Only a 409 (what an honest peer's stale state gets) goes on a link's allowance: a
    refused MAC (403) spends the client's budget at once."""

    handler = _refusing("bad MAC", 403)
    limits = {"refusal_rate": 0.001, "refusal_burst": 1}
    async with running(tmp_path, handler, serves=lambda i, link: True, **limits) as server:
        peer = await server.tls()
        for link in ("l0", "l1"):  # the burst of 1, then one more answer (reserved ahead)
            response, _ = await exchange(peer, post(f"/v1/links/{link}/rotate", 2), b"{}")
            assert response.status_code == 403
        with trio.move_on_after(1) as waited:
            await exchange(peer, post("/v1/links/l2/rotate", 2), b"{}")
        assert waited.cancelled_caught and server.refused(403) == 2


async def test_batched_handlers_run_to_their_end_when_the_client_goes_away(
    tmp_path: Path,
) -> None:
    """As a lone request's handler does: a client that resets the connection mid-batch loses
    the answers still to come, never a handler's work (a responder's install, say)."""
    release = {"a": trio.Event(), "b": trio.Event()}
    outcome: dict[str, str] = {}

    async def handler(
        link: str, action: str, body: bytes, identity: PeerIdentity, reply_now: ReplyNow
    ) -> bytes:
        try:
            if link in release:
                await release[link].wait()
            outcome[link] = "finished"
        except trio.Cancelled:
            outcome[link] = "cancelled"
            raise
        return b"{}"

    async with running(tmp_path, handler) as server:
        stream = await server.tls()
        data = _batch(("a", "rotate", b"{}"), ("b", "rotate", b"{}"), ("fast", "rotate", b"{}"))
        await send_batch(stream, data)
        with trio.fail_after(10):
            while "fast" not in outcome:  # noqa: ASYNC110
                await trio.sleep(0.01)
        _reset(stream)  # the server's next write fails
        release["a"].set()
        await trio.testing.wait_all_tasks_blocked()  # a's answer met the reset connection
        assert outcome == {"fast": "finished", "a": "finished"}
        release["b"].set()
        with trio.fail_after(10):
            while "b" not in outcome:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert outcome["b"] == "finished"


async def test_an_address_out_of_refusal_tokens_gets_its_batches_refused_unread(
    tmp_path: Path,
) -> None:
    """A batch could run 64 refused handlers for one token: once a client (address and
    certificate) has no token left, its batches are answered 503 before any item runs, on
    any connection (lone requests wait as before); another certificate's are run."""
    async with running(tmp_path, refusal_rate=0.001, refusal_burst=2) as server:
        flood = await server.tls("mallory")
        for _ in range(2):
            response, _ = await exchange(flood, post("/nope", 2), b"{}")
            assert response.status_code == 404
        again = await server.tls("mallory")  # a new connection: no token, no debt to wait
        data = _batch(("a", "rotate", b"{}"), ("b", "rotate", b"{}"))
        response, body = await exchange(again, post("/v1/batch", len(data)), data)
        assert response.status_code == 503 and json.loads(body)["error"] == "busy"
        assert server.calls == []
        other = await server.tls()  # alice, same address
        response, body = await exchange(other, post("/v1/batch", len(data)), data)
        assert response.status_code == 200 and len(server.calls) == 2


async def test_a_batch_item_refused_costs_its_token_even_if_the_client_then_resets(
    tmp_path: Path,
) -> None:
    """Tokens are charged as each item is refused: a client that reads its refusals, then
    resets the connection before a slow item answers, has still paid for them (before, the
    charge came after the last answer, and a broken connection never paid)."""
    release, finished = trio.Event(), trio.Event()

    async def handler(
        link: str, action: str, body: bytes, identity: PeerIdentity, reply_now: ReplyNow
    ) -> bytes:
        if link != "slow":
            raise ProtocolError("bad MAC", status=403)
        await release.wait()
        finished.set()
        return b"{}"

    async with running(tmp_path, handler, refusal_rate=0.001, refusal_burst=2) as server:
        flood = await server.tls("mallory")
        forged = _batch(("slow", "rotate", b"{}"), *[(f"l{i}", "rotate", b"{}") for i in range(4)])
        await flood.send_all(h11.Connection(h11.CLIENT).send(post("/v1/batch", len(forged))))
        await flood.send_all(forged)
        with trio.fail_after(20):
            while server.refused(403) < 4:  # noqa: ASYNC110 - the server's own counter
                await trio.sleep(0.01)
        _reset(flood)  # the slow item's answer cannot be sent
        release.set()
        await finished.wait()
        stream = await server.tls("mallory")
        with trio.move_on_after(1) as waited:  # the 4 tokens went: 2 in debt, 2,000 s
            await exchange(stream, post("/v1/batch", len(forged)), forged)
        assert waited.cancelled_caught and server.refused(403) == 4


@pytest.mark.parametrize("before", [b"", b"\r\n" * 40], ids=["head", "line-ends-then-head"])
async def test_a_head_in_too_many_reads_closes_the_connection_and_costs_a_refusal(
    tmp_path: Path, before: bytes
) -> None:
    """Review finding: a head (and the line ends a client may send before it) came in as many
    one-byte TLS records as its 32 KiB allowed, 0.27 s of CPU for one refusal token. Past
    `HEAD_READS` reads the connection is closed and its client pays a token; a head in a
    few reads is served."""
    from qkdagent.peerserver import HEAD_READS

    async with running(tmp_path, refusal_rate=0.001, refusal_burst=2) as server:
        head = h11.Connection(h11.CLIENT).send(post(ROTATE, 2))
        stream = await server.tls("mallory")
        try:
            for byte in before + head:
                await stream.send_all(bytes([byte]))  # a TLS record each
        except trio.BrokenResourceError:
            pass  # closed under us: what is tested
        assert len(before + head) > HEAD_READS
        assert await closed_by_server(stream)
        assert not server.calls and server.dropped("request-pieces") == 1
        assert server.refused(404) == 0  # charged, not answered: the client paid one token
        peer, client = await server.tls(), h11.Connection(h11.CLIENT)
        data = client.send(post(ROTATE, 2)) + client.send(h11.Data(data=b"{}"))
        for start in range(0, len(data), 16):  # a TLS record each
            await peer.send_all(data[start : start + 16])
        client.send(h11.EndOfMessage())
        while not isinstance(event := client.next_event(), h11.Response):
            assert event is h11.NEED_DATA
            client.receive_data(await peer.receive_some(65536))
        assert event.status_code == 200 and len(server.calls) == 1


async def test_a_body_in_too_many_reads_closes_the_connection_and_costs_a_refusal(
    tmp_path: Path,
) -> None:
    """Thousands of one-byte TLS records cost a parse each: past h1client.MAX_PIECES the
    connection is closed, the handler never runs, and the address pays a refusal token."""
    from qkdagent.h1client import MAX_PIECES

    async with running(tmp_path, refusal_rate=0.001, refusal_burst=1) as server:
        stream = await server.tls("mallory")
        size = MAX_PIECES + 10
        await stream.send_all(h11.Connection(h11.CLIENT).send(post(ROTATE, size)))
        try:
            for _ in range(size):
                await stream.send_all(b"x")  # a TLS record each
        except trio.BrokenResourceError:
            pass  # closed under us: what is tested
        assert await closed_by_server(stream)
        assert not server.calls and server.dropped("request-pieces") == 1
        batch = await server.tls("mallory")
        forged = _batch(("l0", "rotate", b"{}"))
        response, body = await exchange(batch, post("/v1/batch", len(forged)), forged)
        assert response.status_code == 503 and json.loads(body)["error"] == "busy"
