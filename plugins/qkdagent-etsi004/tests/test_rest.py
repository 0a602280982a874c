"""qkd-module's REST form end to end: the simulator serves it, the source speaks it, each checked
against the module's own bytes (REFERENCE §2.6) and against a scripted stand-in for the module."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
from qkdagent_etsi004 import codec, rest
from qkdagent_etsi004.restclient import post
from qkdagent_etsi004.sim import SimSettings, Simulator, open_simulator
from qkdagent_etsi004.source import Etsi004Source

from qkdagent import (
    ComponentEvent,
    ConfigError,
    KeyNotFound,
    Link,
    Misconfigured,
    PluginContext,
    SourceError,
    SourceUnavailable,
)
from qkdagent.testing import build_component

from .conftest import ALICE, BOB, MODULES

KEY = bytes(range(1, 33))


@pytest.fixture
async def rsim(pki: Path) -> AsyncIterator[Simulator]:
    async with open_simulator(pki, SimSettings(modules=MODULES, rest=True)) as running:
        yield running


async def call(sim: Simulator, module: str, path: str, body: bytes) -> tuple[int, Any]:
    host, _, port = sim.rest_addresses[module].rpartition(":")
    code, answer = await post(host, int(port), path, body, limit=rest.MAX_BODY)
    # ast.literal_eval cannot read the module's bytearray(b'...'): the plugin's parser can
    return code, rest.parse_literal(answer) if code < 404 else answer


# -- the simulator answers what the module answers ---------------------------------------------


async def test_simulator_speaks_the_module_form(rsim: Simulator) -> None:
    a, b = rsim.rest_addresses["QKDM_A"], rsim.rest_addresses["QKDM_B"]
    qos = {"timeout": 5000, "length": 256}
    code, (ksid, status) = await call(
        rsim, "QKDM_A", "/open_connect", repr(["s", b, qos, None]).encode()
    )
    assert (code, status) == (200, 0) and rest._ksid(ksid, "test") == ksid
    code, joined = await call(rsim, "QKDM_B", "/open_connect", repr(["s", a, qos, ksid]).encode())
    assert (code, joined) == (200, [ksid, 0])
    # index -1: the first available key; the answer is the module's [bytearray(...), index, 0]
    host, _, port = a.rpartition(":")
    code, raw = await post(host, int(port), "/get_key", repr([ksid, -1, None]).encode(), limit=4096)
    assert code == 200 and raw.startswith(b"[bytearray(b") and raw.endswith(b"), 0, 0]")
    key = rest.read_get_key(raw, max_key=64).key
    assert key is not None and len(key) == 32 and any(key)
    code, again = await call(rsim, "QKDM_A", "/get_key", repr([ksid, -1, None]).encode())
    assert code == 200 and again[1] == 1 and again[0] != key  # the next index, a new key
    # the peer module reads index 0 by number and gets the same bytes
    code, peer = await call(rsim, "QKDM_B", "/get_key", repr([ksid, 0, None]).encode())
    assert code == 200 and peer == [key, 0, 0]
    # an index not generated (beyond the lookahead) is status 1, never zeros
    far = repr([ksid, 10_000_000, None]).encode()
    assert await call(rsim, "QKDM_B", "/get_key", far) == (400, [None, 10_000_000, 1])
    assert await call(rsim, "QKDM_A", "/available_keys", b"") == (200, [0])
    assert await call(rsim, "QKDM_A", "/close", repr([ksid]).encode()) == (200, 0)
    assert await call(rsim, "QKDM_A", "/close", repr([ksid]).encode()) == (400, 2)
    # unknown stream: the module's exception answer
    unknown = repr(["3f2b8c1e-9a4d-4e6f-8b1a-2c3d4e5f6a7b", -1, None]).encode()
    assert await call(rsim, "QKDM_A", "/get_key", unknown) == (400, [None, -1, 1])


async def test_simulator_open_connect_failures_are_status_2(rsim: Simulator) -> None:
    qos = {"timeout": 5000, "length": 256}
    wrong = repr(["s", "127.0.0.1:1", qos, None]).encode()
    assert await call(rsim, "QKDM_A", "/open_connect", wrong) == (400, ["None", 2])
    bits = repr(["s", rsim.rest_addresses["QKDM_B"], {"timeout": 5000, "length": 7}, None])
    assert await call(rsim, "QKDM_A", "/open_connect", bits.encode()) == (400, ["None", 2])


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("/open_connect", b"__import__('os').system('true')", 400),
        ("/get_key", b"[", 400),
        ("/close", b"['not a uuid']", 400),
        ("/get_key", b"x" * (rest.MAX_BODY + 1), 413),
        ("/shutdown", b"[]", 404),
    ],
)
async def test_simulator_refuses_hostile_requests_and_keeps_serving(
    rsim: Simulator, path: str, body: bytes, code: int
) -> None:
    host, _, port = rsim.rest_addresses["QKDM_A"].rpartition(":")
    got, _ = await post(host, int(port), path, body, limit=4096)
    assert got == code
    assert rsim.rest_servers["QKDM_A"].refused >= 1
    assert await call(rsim, "QKDM_A", "/available_keys", b"") == (200, [0])


async def test_simulator_refuses_other_methods_and_slow_senders(rsim: Simulator) -> None:
    server = rsim.rest_servers["QKDM_A"]
    server.frame_timeout = 0.5
    host, _, port = rsim.rest_addresses["QKDM_A"].rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(b"GET /get_key HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await stream.receive_some(100)).startswith(b"HTTP/1.1 405")
    await stream.aclose()
    slow = await trio.open_tcp_stream(host, int(port))
    await slow.send_all(b"POST /get_key HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n[")
    with trio.fail_after(5):
        assert await slow.receive_some(100) == b""  # cut off, not waited on forever
    await slow.aclose()
    assert await call(rsim, "QKDM_A", "/available_keys", b"") == (200, [0])


async def test_bodies_in_too_many_pieces_are_refused_both_ways(rsim: Simulator) -> None:
    """A body of one-byte chunks costs about 5 us a piece to parse: the simulator refuses such
    a request (413), and the client such an answer, past `rest.MAX_BODY_PIECES`."""
    from qkdagent_etsi004.restclient import HttpError

    chunks = b"1\r\n0\r\n" * (rest.MAX_BODY_PIECES + 1) + b"0\r\n\r\n"
    host, _, port = rsim.rest_addresses["QKDM_A"].rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(
        b"POST /available_keys HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
    )
    with trio.fail_after(5):
        assert (await stream.receive_some(100)).startswith(b"HTTP/1.1 413")
    await stream.aclose()

    async def tiny_pieces(tcp: trio.SocketStream) -> None:
        while b"\r\n\r\n" not in await tcp.receive_some(65536):
            pass
        await tcp.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
        await tcp.aclose()

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, tiny_pieces, 0, host="127.0.0.1"))
        with pytest.raises(HttpError, match="pieces"):
            await post("127.0.0.1", listener.socket.getsockname()[1], "/get_key", b"[]",
                       limit=rest.MAX_BODY)  # fmt: skip
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("count", "refused"), [(8, False), (9, True), (100_000, True)])
async def test_informational_answers_are_skipped_up_to_a_bound(count: int, refused: bool) -> None:
    """Review finding: a module sending `100 Continue` heads without end held the agent's CPU
    until the call's deadline. Up to `MAX_INFORMATIONAL` are skipped; past that, an error."""
    from qkdagent_etsi004.restclient import MAX_INFORMATIONAL, HttpError

    assert MAX_INFORMATIONAL == 8

    async def continues(tcp: trio.SocketStream) -> None:
        while b"\r\n\r\n" not in await tcp.receive_some(65536):
            pass
        try:
            await tcp.send_all(b"HTTP/1.1 100 Continue\r\n\r\n" * count)
            await tcp.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]")
        except trio.BrokenResourceError:
            pass  # the client gave up: what is tested
        await tcp.aclose()

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, continues, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        if refused:
            with pytest.raises(HttpError, match="more than 8 informational"):
                await post("127.0.0.1", port, "/get_key", b"[]", limit=rest.MAX_BODY)
        else:
            assert await post("127.0.0.1", port, "/get_key", b"[]", limit=rest.MAX_BODY) == (
                200,
                b"[]",
            )
        nursery.cancel_scope.cancel()


# -- the source against the simulator ----------------------------------------------------------


def rest_source(table: dict[str, Any], app: str, tmp_path: Path, **kw: Any) -> Etsi004Source:
    link = ALICE if app == "alice" else BOB
    return build_component(
        Etsi004Source, table, name="qkd", links=(link,), agent=app, state_dir=tmp_path, **kw
    )


async def test_source_pair_over_the_rest_form(
    rsim: Simulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[ComponentEvent] = []
    context = PluginContext("alice", tmp_path, reporter=events.append)
    alice = rest_source(
        rsim.source_table("alice", transport="qkd-module"), "alice", tmp_path, context=context
    )
    bob = rest_source(rsim.source_table("bob", transport="qkd-module"), "bob", tmp_path)
    assert "INSECURE" in repr(alice)
    with caplog.at_level(logging.WARNING):
        await alice.prepare()
    await bob.prepare()
    assert [e.kind for e in events] == ["insecure_transport"]
    assert "plain HTTP" in caplog.text and "in clear" in events[0].detail
    try:
        ids = []
        for _ in range(5):
            key = await alice.new_key(ALICE)
            same = await bob.key_by_id(BOB, key.key_id)
            assert same.value == key.value
            ids.append(key.key_id)
        parsed = [codec.parse_key_id(i) for i in ids]
        assert len({p[0] for p in parsed if p}) == 1
        assert [p[1] for p in parsed if p] == [0, 1, 2, 3, 4]
        with pytest.raises(KeyNotFound, match="read before"):
            await bob.key_by_id(BOB, ids[0])
    finally:
        await alice.aclose()
        await bob.aclose()
    assert rsim.network.stats["close"] == 2


async def test_source_reopens_after_a_module_restart(rsim: Simulator, tmp_path: Path) -> None:
    alice = rest_source(rsim.source_table("alice", transport="qkd-module"), "alice", tmp_path)
    await alice.prepare()
    first = await alice.new_key(ALICE)
    rsim.network.restart("QKDM_A")
    for _ in range(3):  # 'stream unknown' three times, then a new stream
        with pytest.raises(SourceUnavailable):
            await alice.new_key(ALICE)
    second = await alice.new_key(ALICE)
    assert second.key_id.split(":")[0] != first.key_id.split(":")[0]
    await alice.aclose()


# -- configuration ------------------------------------------------------------------------------


def base(**extra: Any) -> dict[str, Any]:
    table = {"module": "127.0.0.1:5000", "transport": "qkd-module", "insecure": True}
    table["peer_uris"] = {"bob": "127.0.0.1:5001"}
    table.update(extra)
    return table


@pytest.mark.parametrize(
    ("table", "text"),
    [
        (base(insecure=False), "insecure"),
        ({k: v for k, v in base().items() if k != "insecure"}, "insecure"),
        (base(cert="/x.pem"), "cert"),
        (base(module_id="QKDM_A"), "module_id"),
        (base(peer_uris={"bob": "qkd://bob"}), "peer_uris"),
        (base(transport="binary-v2", cert="a", key="b", ca="c"), "insecure"),
    ],
)
def test_rest_options_are_explicit(table: dict[str, Any], text: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=text):
        rest_source(table, "alice", tmp_path)


async def test_prepare_needs_a_module_address_per_peer(tmp_path: Path) -> None:
    source = rest_source(base(peer_uris={}), "alice", tmp_path)
    with pytest.raises(Misconfigured, match="peer_uris"):
        await source.prepare()


# -- the source against a scripted module (its exact answers, and hostile ones) ----------------


@dataclass
class FakeModule:
    """Answers POSTs from a script of (HTTP status, body); records what it was sent."""

    script: list[tuple[int, bytes]] = field(default_factory=list)
    seen: list[tuple[bytes, dict[bytes, bytes], bytes]] = field(default_factory=list)
    port: int = 0

    async def handle(self, tcp: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        target, headers, body = b"", {}, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await tcp.receive_some(65536))
            elif isinstance(event, h11.Request):
                target, headers = event.target, dict(event.headers)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        self.seen.append((target, headers, bytes(body)))
        code, answer = self.script.pop(0) if self.script else (200, b"[0]")
        headers_out = [("Content-Length", str(len(answer))), ("Connection", "close")]
        data = conn.send(h11.Response(status_code=code, headers=headers_out)) or b""
        await tcp.send_all(data + (conn.send(h11.Data(answer)) or b""))
        await tcp.aclose()


@pytest.fixture
async def fake() -> AsyncIterator[FakeModule]:
    module = FakeModule()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, module.handle, 0, host="127.0.0.1"))
        module.port = listeners[0].socket.getsockname()[1]
        yield module
        nursery.cancel_scope.cancel()


KSID = "3f2b8c1e-9a4d-4e6f-8b1a-2c3d4e5f6a7b"


async def test_a_rest_module_giving_a_key_stream_id_twice_is_refused(
    fake: FakeModule, tmp_path: Path
) -> None:
    """Review finding: the qkd-module form skipped the check the binary transports make."""
    to_carol = Link("m", "alice", "carol", True)
    table = base(module=f"127.0.0.1:{fake.port}", peer_uris={"bob": "b:1", "carol": "c:1"})
    source = build_component(
        Etsi004Source, table, name="qkd", links=(ALICE, to_carol), agent="alice",
        state_dir=tmp_path,
    )  # fmt: skip
    fake.script = [
        (200, repr([KSID, 0]).encode()),
        (200, repr([bytearray(KEY), 0, 0]).encode()),
        (200, repr([KSID, 0]).encode()),  # the same stream, for carol
    ]
    key = await source.new_key(ALICE)
    assert key.key_id == f"{KSID}:0"
    with pytest.raises(SourceError, match="had before: its keys would be read twice"):
        await source.new_key(to_carol)
    assert [seen[0] for seen in fake.seen] == [b"/open_connect", b"/get_key", b"/open_connect"]


async def test_source_sends_what_the_module_evals(fake: FakeModule, tmp_path: Path) -> None:
    fake.script = [
        (200, b"[3]"),
        (200, repr([KSID, 0]).encode()),
        (200, repr([bytearray(KEY), 41, 0]).encode()),
    ]
    source = rest_source(base(module=f"127.0.0.1:{fake.port}"), "alice", tmp_path)
    await source.prepare()
    key = await source.new_key(ALICE)
    assert key.key_id == f"{KSID}:41" and key.value.reveal() == KEY  # type: ignore[attr-defined]
    paths = [seen[0] for seen in fake.seen]
    assert paths == [b"/available_keys", b"/open_connect", b"/get_key"]
    open_body, get_body = fake.seen[1][2], fake.seen[2][2]
    assert open_body == b"['qkd://alice', '127.0.0.1:5001', {'timeout': 5000, 'length': 256}, None]"
    assert get_body == f"['{KSID}', -1, None]".encode()
    # Flask would parse a form body into request.form, leaving request.data empty
    assert all(b"content-type" not in seen[1] for seen in fake.seen)
    fake.script = [(200, b"0")]
    await source.aclose()
    assert fake.seen[-1][2] == f"['{KSID}']".encode()


@pytest.mark.parametrize(
    ("answer", "error", "text"),
    [
        ((200, repr([bytes(32), 41, 0]).encode()), SourceError, "all zero"),
        ((200, repr([bytearray(KEY[:16]), 41, 0]).encode()), SourceError, "16 bytes"),
        ((400, b"[None, 41, 1]"), SourceUnavailable, "insufficient"),
        ((500, b"Server error"), SourceUnavailable, "HTTP 500"),
        ((200, b"[__import__('os').getpid(), 41, 0]"), SourceError, "malformed"),
        ((200, b"[" + b"0" * (rest.MAX_BODY + 10) + b"]"), SourceError, "longer than"),
        ((200, repr([bytearray(KEY), 41, 7]).encode()), SourceError, "status 7"),
    ],
)
async def test_hostile_module_answers_are_refused(
    fake: FakeModule, tmp_path: Path, answer: tuple[int, bytes], error: type, text: str
) -> None:
    fake.script = [(200, b"[3]"), (200, repr([KSID, 0]).encode()), answer]
    source = rest_source(base(module=f"127.0.0.1:{fake.port}"), "alice", tmp_path)
    await source.prepare()
    with pytest.raises(error, match=text):
        await source.new_key(ALICE)
    await source.aclose()


async def test_open_connect_status_2_is_retry_later(fake: FakeModule, tmp_path: Path) -> None:
    fake.script = [(200, b"[0]"), (400, b"['None', 2]")]
    source = rest_source(base(module=f"127.0.0.1:{fake.port}"), "alice", tmp_path)
    await source.prepare()
    with pytest.raises(SourceUnavailable, match="no QKD connection"):
        await source.new_key(ALICE)


async def test_responder_refuses_an_answer_for_another_index(
    fake: FakeModule, tmp_path: Path
) -> None:
    fake.script = [
        (200, b"[0]"),
        (200, repr([KSID, 0]).encode()),
        (200, repr([bytearray(KEY), 9, 0]).encode()),
    ]
    source = build_component(
        Etsi004Source,
        base(module=f"127.0.0.1:{fake.port}", peer_uris={"alice": "127.0.0.1:5000"}),
        name="qkd",
        links=(BOB,),
        agent="bob",
        state_dir=tmp_path,
    )
    await source.prepare()
    with pytest.raises(SourceError, match="index 9"):
        await source.key_by_id(BOB, f"{KSID}:8")
    assert (
        fake.seen[1][2]
        == f"['qkd://bob', '127.0.0.1:5000', {{'timeout': 5000, 'length': 256}}, '{KSID}']".encode()
    )
    assert fake.seen[2][2] == f"['{KSID}', 8, None]".encode()
