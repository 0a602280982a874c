"""Hostile clients never stop the simulator; hostile module answers are typed errors and one failed
attempt for the source; every GET_KEY / OPEN_CONNECT status is mapped."""

from __future__ import annotations

import ssl
import struct
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from qkdagent_etsi004 import codec
from qkdagent_etsi004.codec import Dialect, QoS
from qkdagent_etsi004.server import server_ssl_context
from qkdagent_etsi004.sim import Simulator
from qkdagent_etsi004.source import Etsi004Source
from qkdagent_etsi004.transport import read_frame

from qkdagent import (
    CsprngSupply,
    KeyNotFound,
    Link,
    Misconfigured,
    SourceError,
    SourceUnavailable,
)
from qkdagent.testing import build_component, encrypted_key_copy

from .conftest import ALICE, BOB


def client_context(pki: Path, app: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    context.load_cert_chain(str(pki / f"{app}.pem"), str(pki / f"{app}.key"))
    return context


async def raw(sim: Simulator, module: str = "QKDM_A", app: str = "alice") -> trio.SSLStream:
    host, _, port = sim.addresses[module].rpartition(":")
    tcp = await trio.open_tcp_stream(host, int(port))
    stream = trio.SSLStream(tcp, client_context(sim.pki, app), server_hostname=host)
    await stream.do_handshake()
    return stream


async def answer(stream: trio.SSLStream) -> tuple[codec.Header, bytes] | None:
    try:
        return await read_frame(stream, max_length=codec.MAX_RESPONSE_PAYLOAD)
    except (EOFError, trio.BrokenResourceError):  # closed (without TLS close_notify)
        return None


async def still_serves(sim: Simulator, dialect: Dialect) -> None:
    stream = await raw(sim)
    req = codec.OpenConnectRequest("qkd://alice", "qkd://bob", QoS(32))
    await stream.send_all(codec.encode(dialect, req))
    got = await answer(stream)
    assert got is not None and got[0].service == codec.Service.OPEN_CONNECT_RESPONSE
    await stream.aclose()


HOSTILE = {
    "wrong version": b"\x07\x00\x00\x02\x00\x00\x00\x00",
    "huge length": b"\x02\x01\x01\x04\xff\xff\xff\xff",
    "unknown service": b"\x02\x01\x01\x42\x00\x00\x00\x00",
    "close server": b"\x01\x00\x01\xff\x00\x00\x00\x00",
    "bad payload": b"\x02\x01\x01\x02\x00\x00\x00\x03abc",
    "truncated": b"\x02\x01\x01\x08\x00\x00\x00\x10abc",
}


@pytest.mark.parametrize("name", list(HOSTILE))
async def test_hostile_frames_get_an_error_and_the_server_keeps_serving(
    sim: Simulator, name: str
) -> None:
    server = sim.servers["QKDM_A"]
    server.frame_timeout = 0.5  # the truncated frame waits for bytes that never come
    stream = await raw(sim)
    await stream.send_all(HOSTILE[name])
    got = await answer(stream)
    if got is not None:  # an error frame, never silence followed by a hang
        assert got[0].service == codec.Service.ERROR
    await stream.aclose()
    assert server.refused_frames == 1
    for dialect in Dialect:
        await still_serves(sim, dialect)


async def test_garbage_after_a_valid_frame(sim: Simulator) -> None:
    stream = await raw(sim)
    frame = codec.encode(Dialect.V2, codec.CloseRequest(bytes(range(16))))
    await stream.send_all(frame + b"\x99garbage")
    first = await answer(stream)
    assert first is not None and first[0].service == codec.Service.CLOSE_RESPONSE
    second = await answer(stream)
    assert second is None or second[0].service == codec.Service.ERROR
    await still_serves(sim, Dialect.V1)


async def test_frames_sent_together_are_each_answered_in_order(sim: Simulator) -> None:
    """The server reads ahead: what follows a frame in the same record is the next frame."""
    stream = await raw(sim)
    opens = [codec.OpenConnectRequest("qkd://alice", "qkd://bob", QoS(32)) for _ in range(2)]
    close = codec.CloseRequest(bytes(range(16)))
    await stream.send_all(b"".join(codec.encode(Dialect.V2, m) for m in [*opens, close]))
    services = []
    for _ in range(3):
        got = await answer(stream)
        assert got is not None
        services.append(got[0].service)
    assert services == [codec.Service.OPEN_CONNECT_RESPONSE] * 2 + [codec.Service.CLOSE_RESPONSE]
    await stream.aclose()


async def test_failed_handshake_does_not_stop_the_server(sim: Simulator) -> None:
    host, _, port = sim.addresses["QKDM_A"].rpartition(":")
    tcp = await trio.open_tcp_stream(host, int(port))
    await tcp.send_all(b"GET / HTTP/1.0\r\n\r\n")
    await tcp.aclose()
    await still_serves(sim, Dialect.V2)


# -- statuses the source sees from the simulator ------------------------------------------


async def test_open_statuses(sim: Simulator, sources: Callable[..., Any]) -> None:
    alice = await sources("alice")
    await alice.new_key(ALICE)
    # a URI without a scheme: status 4 -> Misconfigured
    bad = await sources("alice", source_uri="alice")
    with pytest.raises(Misconfigured, match="status 4"):
        await bad.new_key(ALICE)
    # a chunk size the module cannot grant, counter-proposal below the configured size
    big = await sources("alice", key_chunk_size=4096)
    with pytest.raises(Misconfigured, match="counter-proposal refused: key_chunk_size 1024"):
        await big.new_key(ALICE)


async def test_acceptable_counter_proposal_is_taken(
    sim: Simulator, sources: Callable[..., Any]
) -> None:
    fast = await sources("alice", max_bps=4_000_000_000, min_bps=1000)
    key = await fast.new_key(ALICE)
    bob = await sources("bob")
    assert (await bob.key_by_id(BOB, key.key_id)).value == key.value


async def test_counter_proposal_below_min_bps_is_misconfigured(
    sim: Simulator, sources: Callable[..., Any]
) -> None:
    greedy = await sources("alice", max_bps=4_000_000_000, min_bps=4_000_000_000)
    with pytest.raises(Misconfigured, match="min_bps"):
        await greedy.new_key(ALICE)


async def test_metadata_resize(sim: Simulator, sources: Callable[..., Any]) -> None:
    small = await sources("alice", metadata_size=2)
    key = await small.new_key(ALICE)  # status 8, then again with the required size
    assert len(key.value) == 32
    assert sim.network.stats["get_key"] == 2


async def test_insufficient_key_is_unavailable(sim: Simulator, sources: Callable[..., Any]) -> None:
    alice = await sources("alice")
    link = sim.network.link_of("QKDM_A")
    assert link is not None
    sim.network.supplies[link] = CsprngSupply(rate_bps=0, capacity_bits=8)
    with pytest.raises(SourceUnavailable, match="status 2"):
        await alice.new_key(ALICE)


async def test_another_application_cannot_join_or_read(
    sim: Simulator, sources: Callable[..., Any]
) -> None:
    alice = await sources("alice")
    key = await alice.new_key(ALICE)
    bob = await sources("bob")
    await bob.key_by_id(BOB, key.key_id)
    eve = await sources("eve")  # on alice's module, opening alice's KSID: in use
    with pytest.raises(Misconfigured, match="status 5"):
        await eve.key_by_id(BOB, key.key_id)


async def test_reused_index_and_unknown_stream(sim: Simulator, sources: Callable[..., Any]) -> None:
    alice, bob = await sources("alice"), await sources("bob")
    key = await alice.new_key(ALICE)
    await bob.key_by_id(BOB, key.key_id)
    with pytest.raises(KeyNotFound, match="read before"):
        await bob.key_by_id(BOB, key.key_id)
    ksid, index = codec.parse_key_id(key.key_id)  # type: ignore[misc]
    # an index alice never drew: the module has no such chunk for a stream of one side... status 2
    with pytest.raises(SourceUnavailable, match="status 2"):
        await bob.key_by_id(BOB, codec.key_id(ksid, index + 100_000))


# -- a scripted, lying module -------------------------------------------------------------


@pytest.fixture
async def liar(pki: Path) -> AsyncIterator[tuple[list[bytes], str]]:
    """A TLS module at the returned address answering each request with the next scripted
    bytes (an OPEN_CONNECT is answered properly first)."""
    script: list[bytes] = []
    context = server_ssl_context(pki / "QKDM_A.pem", pki / "QKDM_A.key", pki / "ca.pem")

    async def handle(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, context, server_side=True)
        try:
            await stream.do_handshake()
            while True:
                header, payload = await read_frame(stream, max_length=1 << 20)
                dialect = header.dialect
                if header.service == codec.Service.OPEN_CONNECT_REQUEST:
                    req = codec.decode_request(dialect, header.service, payload)
                    assert isinstance(req, codec.OpenConnectRequest)
                    ok = codec.OpenConnectResponse(1, req.qos, bytes(range(1, 17)))
                    await stream.send_all(codec.encode(dialect, ok))
                elif header.service == codec.Service.CLOSE_REQUEST:
                    await stream.send_all(codec.encode(dialect, codec.CloseResponse(0)))
                elif script:
                    await stream.send_all(script.pop(0))
                    await stream.aclose()
                    return
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError, Exception):
            return

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield script, f"127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


def get_key_frame(
    dialect: Dialect, status: int, index: int, key: bytes, meta: bytes = b""
) -> bytes:
    payload = struct.pack("!III", status, index, len(key)) + key + struct.pack("!I", len(meta))
    payload += meta
    return codec.encode_header(dialect, 5, len(payload)) + payload


LIES: dict[str, Callable[[Dialect], bytes]] = {
    "truncated": lambda d: get_key_frame(d, 0, 0, bytes(range(1, 33)))[:-3],
    "huge length": lambda d: codec.encode_header(d, 5, 0xFFFFFFF0),
    "all zero key": lambda d: get_key_frame(d, 0, 0, bytes(32)),
    "short key": lambda d: get_key_frame(d, 0, 0, bytes(range(1, 17))),
    "wrong index": lambda d: get_key_frame(d, 0, 7, bytes(range(1, 33))),
    "unknown status": lambda d: get_key_frame(d, 9, 0, b""),
    "wrong service": lambda d: codec.encode(d, codec.CloseResponse(0)),
    "wrong version": lambda d: b"\x05" + get_key_frame(d, 0, 0, bytes(range(1, 33)))[1:],
    "error frame": lambda d: codec.encode_header(d, 0, 0),
    "bytes after the answer": lambda d: get_key_frame(d, 0, 0, bytes(range(1, 33))) + b"\0junk",
}


def _liars_source(
    address: str, pki: Path, tmp_path: Path, transport: str, links: tuple[Link, ...]
) -> Etsi004Source:
    """alice's source for `links`, on the scripted module, one connection per request."""
    table = {
        "module": address,
        "cert": str(pki / "alice.pem"),
        "key": str(pki / "alice.key"),
        "ca": str(pki / "ca.pem"),
        "transport": transport,
        "persistent": False,
    }
    return build_component(Etsi004Source, table, links=links, agent="alice", state_dir=tmp_path)


@pytest.mark.parametrize("lie", list(LIES))
async def test_lying_module_answers_are_one_failed_attempt(
    liar: tuple[list[bytes], str], pki: Path, tmp_path: Path, transport: str, lie: str
) -> None:
    script, address = liar
    dialect = Dialect(transport)
    source = _liars_source(address, pki, tmp_path, transport, (ALICE,))
    try:
        script.append(LIES[lie](dialect))
        with pytest.raises(SourceError) as caught:
            await source.new_key(ALICE)
        assert not isinstance(caught.value, KeyNotFound)
        # the next attempt works (a good answer), and the index of the failed one is not reused
        script.append(get_key_frame(dialect, 0, 1, bytes(range(1, 33))))
        key = await source.new_key(ALICE)
        assert key.key_id.endswith(":1")
    finally:
        await source.aclose()


async def test_a_module_giving_a_key_stream_id_twice_is_refused(
    liar: tuple[list[bytes], str], pki: Path, tmp_path: Path, transport: str
) -> None:
    """Review finding: a module answering every OPEN_CONNECT with the same KSID (as this
    one does) had the initiator read index 0 of it for two destinations, the same key for
    two links. A KSID this source was given before is refused, for any destination."""
    script, address = liar
    to_carol = Link("m", "alice", "carol", True)
    source = _liars_source(address, pki, tmp_path, transport, (ALICE, to_carol))
    try:
        script.append(get_key_frame(Dialect(transport), 0, 0, bytes(range(1, 33))))
        key = await source.new_key(ALICE)
        assert key.key_id.endswith(":0")
        carol_key = get_key_frame(Dialect(transport), 0, 0, bytes(range(1, 33)))
        script.append(carol_key)
        with pytest.raises(SourceError, match="had before: its keys would be read twice"):
            await source.new_key(to_carol)
        assert script == [carol_key]  # no GET_KEY was sent for carol
    finally:
        await source.aclose()


def _unreadable_certificate(pki: Path, out: Path) -> tuple[Path, Path]:
    """A certificate for QKDM_A from the test CA that OpenSSL verifies and `cryptography`
    cannot read: its authorityInfoAccess (not critical) holds an INTEGER, not a sequence of
    access descriptions."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtensionOID, NameOID

    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "QKDM_A")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("QKDM_A"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.UnrecognizedExtension(ExtensionOID.AUTHORITY_INFORMATION_ACCESS, b"\x02\x01\x01"),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path, key_path = out / "odd.pem", out / "odd.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ValueError):  # what the source meets
        _ = x509.load_der_x509_certificate(cert.public_bytes(serialization.Encoding.DER)).extensions
    return cert_path, key_path


async def test_a_module_certificate_the_source_cannot_read_is_a_source_error(
    pki: Path, tmp_path: Path
) -> None:
    """Review finding: with `module_id` set, a module certificate that verifies but that
    `cryptography` cannot read raised a bare ValueError (a plugin bug, to the agent) from
    prepare() and new_key(). They are the source's typed errors saying why, and nothing is
    read."""
    cert, key = _unreadable_certificate(pki, tmp_path)
    context = server_ssl_context(cert, key, pki / "ca.pem")
    served: list[int] = []

    async def handle(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, context, server_side=True)
        try:
            await stream.do_handshake()
            served.append(len(await stream.receive_some(65536)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        table = {
            "module": f"127.0.0.1:{port}",
            "cert": str(pki / "alice.pem"),
            "key": str(pki / "alice.key"),
            "ca": str(pki / "ca.pem"),
            "module_id": "QKDM_A",
        }
        source = build_component(
            Etsi004Source, table, links=(ALICE,), agent="alice", state_dir=tmp_path
        )
        try:
            with pytest.raises(Misconfigured, match="certificate cannot be read to check"):
                await source.prepare()  # (at start-up: the config names that module_id)
            with pytest.raises(SourceError, match="certificate cannot be read to check"):
                await source.new_key(ALICE)
        finally:
            await source.aclose()
        assert served in ([], [0], [0, 0])  # no request reached the module
        nursery.cancel_scope.cancel()


async def test_silent_module_is_a_timeout_under_the_virtual_clock(
    liar: tuple[list[bytes], str], pki: Path, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """No scripted answer: the module reads GET_KEY and says nothing. The call ends at the QoS
    timeout plus connect_timeout (virtual seconds), as SourceUnavailable."""
    _, address = liar
    table = {
        "module": address,
        "cert": str(pki / "alice.pem"),
        "key": str(pki / "alice.key"),
        "ca": str(pki / "ca.pem"),
        "qos_timeout": 30_000,
    }
    source = build_component(
        Etsi004Source, table, links=(ALICE,), agent="alice", state_dir=tmp_path
    )
    try:
        start = trio.current_time()
        with pytest.raises(SourceUnavailable, match="timeout"):
            await source.new_key(ALICE)
        assert trio.current_time() - start == pytest.approx(source.request_timeout, abs=0.5)
    finally:
        await source.aclose()


async def test_concurrent_reads_of_one_id_send_one_get_key(
    sim: Simulator, sources: Callable[..., Any]
) -> None:
    """Two key_by_id for the same ID at once: the module sees one GET_KEY for it, one call gets
    the key and the other KeyNotFound."""
    alice, bob = await sources("alice"), await sources("bob")
    key = await alice.new_key(ALICE)
    before = sim.network.stats["get_key"]
    got: list[Any] = []

    async def read() -> None:
        try:
            got.append(await bob.key_by_id(BOB, key.key_id))
        except KeyNotFound as exc:
            got.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        nursery.start_soon(read)
    assert sim.network.stats["get_key"] - before == 1
    assert sorted(type(g).__name__ for g in got) == ["Key", "KeyNotFound"]
    assert [g.value for g in got if not isinstance(g, KeyNotFound)] == [key.value]


async def test_encrypted_application_key_is_refused_without_a_prompt(
    sim: Simulator, sources: Callable[..., Any], tmp_path: Path
) -> None:
    """A passphrase-protected key fails prepare() with a clear Misconfigured: OpenSSL must not
    ask for the passphrase on the terminal (a hung agent)."""
    encrypted = encrypted_key_copy(sim.pki / "alice.key", tmp_path / "alice-encrypted.key")
    with pytest.raises(Misconfigured, match="is encrypted"):
        await sources("alice", key=str(encrypted))
