"""The hub against hostile and replayed requests: refused with a clear 4xx, nothing changed.

Requests go straight to `Hub.handle` (the transport is tested in test_source.py and below), with
a test client that keeps its own copy of the PSRD the hub hands out.
"""

from __future__ import annotations

import json
import ssl
import stat
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import trio
import trio.testing
from qkdagent_dske import wire
from qkdagent_dske.hubapp import DISPUTED, Hub, HubSettings, Request, Response
from qkdagent_dske.hubclient import HubReply
from qkdagent_dske.pool import Change, PoolBook
from qkdagent_dske.store import PsrdStore

from .hubs import open_hubs

P = "/hub/hank/dske"


class Client:
    def __init__(self, hub: Hub, name: str) -> None:
        self.hub, self.name, self.book = hub, name, PoolBook()
        self.last_pad = b""

    async def call(
        self,
        method: str,
        path: str,
        query: bytes = b"",
        body: bytes = b"",
        signature: str | None = None,
        peer: str | None = "",
    ) -> Response:
        return await self.hub.handle(
            Request(method, P + path, query, body, signature, self.name if peer == "" else peer)
        )

    async def setup(self) -> None:
        reg = wire.Registration(self.name, (self.name,)).encode()
        assert (await self.call("PUT", "/oob/v1/registration", body=reg)).status == 200
        for owner in ("client", "hub"):
            q = f"client_name={self.name}&pool_owner={owner}&size=4096".encode()
            reply = await self.call("GET", "/oob/v1/psrd", q)
            block = wire.parse_psrd_block(reply.body, limit=4096)
            self.book.add("hank", owner, block.block_uuid, block.data)

    def take(self, *sizes: int) -> list[tuple[wire.Allocation, bytes]]:
        allocated, _ = self.book.allocate("hank", "client", sizes)
        return allocated

    def post_body(self, key_id: str, share: bytes, slave: str = "conny") -> tuple[bytes, str]:
        (sig, key), (pad_alloc, pad) = self.take(32, len(share))
        self.last_pad = pad
        body = wire.SharePost(
            self.name, self.name, slave, key_id, 1, pad_alloc, wire.xor(share, pad)
        ).encode()
        return body, wire.signature_header(sig, key, b"", body)

    def get_query(self, key_id: str) -> tuple[bytes, str]:
        ((sig, key),) = self.take(32)
        query = f"client_name={self.name}&key_id={key_id}".encode()
        return query, wire.signature_header(sig, key, query, b"")


def snapshot(hub: Hub) -> list[object]:
    tables = ("psrd_blocks", "psrd_used", "shares")
    return [hub.db.query(f"SELECT * FROM {t} ORDER BY 1, 2") for t in tables]  # noqa: S608


@pytest.fixture
async def hub(tmp_path: Path):  # type: ignore[no-untyped-def]
    hub = Hub(HubSettings("hank"), tmp_path / "hank.sqlite")
    yield hub
    hub.close()


@pytest.fixture
async def clients(hub: Hub) -> tuple[Client, Client, Client]:
    out = (Client(hub, "carol"), Client(hub, "conny"), Client(hub, "mallory"))
    for c in out:
        await c.setup()
    return out


SHARE = bytes(range(32))


async def test_share_relayed_once_to_the_named_client(hub: Hub, clients) -> None:  # type: ignore[no-untyped-def]
    carol, conny, _ = clients
    body, sig = carol.post_body("k1", SHARE)
    reply = await carol.call("POST", "/api/v1/key-share", body=body, signature=sig)
    assert (reply.status, reply.body) == (200, b"null")
    query, sig = conny.get_query("k1")
    reply = await conny.call("GET", "/api/v1/key-share", query, signature=sig)
    assert reply.status == 200
    share = wire.parse_share_reply(reply.body)
    signature = wire.parse_signature(dict(reply.headers)[wire.SIGNATURE_HEADER])
    key, pad = conny.book.peek(
        "hank", "hub", [signature.allocation, share.encryption_key_allocation]
    )
    assert signature.verify(key, b"", reply.body)
    assert wire.xor(share.encrypted_share_value, pad) == SHARE and share.share_index == 1
    query, sig = conny.get_query("k1")
    assert (await conny.call("GET", "/api/v1/key-share", query, signature=sig)).status == 404


async def refused(client: Client, status: int, hub: Hub, **request: object) -> dict:
    before = snapshot(hub)
    reply = await client.call(**request)  # type: ignore[arg-type]
    assert reply.status == status, reply.body
    assert wire.SIGNATURE_HEADER not in dict(reply.headers)  # errors are unsigned
    assert snapshot(hub) == before
    return json.loads(reply.body)


async def test_hostile_posts_change_nothing(hub: Hub, clients) -> None:  # type: ignore[no-untyped-def]
    carol, _, mallory = clients
    body, sig = carol.post_body("k1", SHARE)
    tampered = body.replace(b'"share_index":1', b'"share_index":2')
    post = {"method": "POST", "path": "/api/v1/key-share"}
    await refused(carol, 401, hub, body=tampered, signature=sig, **post)
    await refused(carol, 400, hub, body=body, signature=None, **post)
    await refused(carol, 400, hub, body=b"{" * 70_000, signature=sig, **post)
    # mallory's certificate cannot act for carol, and her own PSRD cannot sign for carol
    await refused(carol, 403, hub, body=body, signature=sig, peer="mallory", **post)
    _, m_sig = mallory.post_body("k1", SHARE)
    detail = await refused(carol, 400, hub, body=body, signature=m_sig, **post)
    assert "does not hold" in detail["detail"]
    assert (await carol.call(body=body, signature=sig, **post)).status == 200
    detail = await refused(carol, 409, hub, body=body, signature=sig, **post)  # a replay
    assert "reuses PSRD" in detail["detail"]


async def test_hostile_gets_change_nothing(hub: Hub, clients) -> None:  # type: ignore[no-untyped-def]
    carol, conny, mallory = clients
    body, sig = carol.post_body("k1", SHARE)
    await carol.call("POST", "/api/v1/key-share", body=body, signature=sig)
    get = {"method": "GET", "path": "/api/v1/key-share"}
    query, m_sig = mallory.get_query("k1")
    # mallory asks for conny's share with her own (valid) signature: not hers to get
    reply = await mallory.call(query=query, signature=m_sig, **get)
    assert reply.status == 404 and len(hub.shares) == 1
    query, sig = conny.get_query("k1")
    await refused(conny, 401, hub, query=query.replace(b"k1", b"k2"), signature=sig, **get)
    await refused(conny, 403, hub, query=query, signature=sig, peer="mallory", **get)
    await refused(conny, 400, hub, query=query + b"&x=1", signature=sig, **get)
    await refused(conny, 400, hub, query=b"client_name=conny&key_id=../x", signature=sig, **get)
    assert (await conny.call(query=query, signature=sig, **get)).status == 200


async def test_unregistered_or_unknown_is_refused(hub: Hub, clients) -> None:  # type: ignore[no-untyped-def]
    carol, _, _ = clients
    stranger = Client(hub, "stranger")
    q = b"client_name=stranger&pool_owner=client&size=4096"
    await refused(stranger, 403, hub, method="GET", path="/oob/v1/psrd", query=q)
    for size in (b"999999999", b"%C2%B2", b"4096%20"):  # too big; "\u00b2" passes isdigit()
        q = b"client_name=carol&pool_owner=client&size=" + size
        await refused(carol, 400, hub, method="GET", path="/oob/v1/psrd", query=q)
    await refused(carol, 404, hub, method="GET", path="/../helen/dske/api/v1/key-share")
    reply = await hub.handle(Request("GET", "/hub/helen/dske/oob/v1/psrd", b"", b""))
    assert reply.status == 404


async def test_plain_http_needs_no_certificate_but_tls_mode_does(tmp_path: Path) -> None:
    hub = Hub(HubSettings("hank", require_tls_identity=True), tmp_path / "a.sqlite")
    reg = wire.Registration("carol", ()).encode()
    path = f"{P}/oob/v1/registration"
    assert (await hub.handle(Request("PUT", path, b"", reg))).status == 403
    hub.close()
    hub = Hub(HubSettings("hank", require_tls_identity=False), tmp_path / "b.sqlite")
    assert (await hub.handle(Request("PUT", path, b"", reg))).status == 200
    hub.close()


async def test_server_bounds_bodies_and_requires_client_certificates(tmp_path: Path) -> None:
    async with open_hubs(tmp_path, ["hank"]) as (pki, (hank,)):
        leaf = pki["carol"] if "carol" in pki.leaves else pki["alice"]
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        context.load_cert_chain(str(leaf.cert), str(leaf.key))
        url = hank.url + "/dske/api/v1/key-share"
        async with httpx.AsyncClient(verify=context) as http:
            reply = await http.post(url, content=b"x" * (wire.MAX_BODY + 1))
            assert reply.status_code == 413

            async def chunked() -> AsyncIterator[bytes]:  # no content-length up front
                for _ in range(wire.MAX_BODY // 1024 + 1):
                    yield b"x" * 1024

            reply = await http.post(url, content=chunked())
            assert reply.status_code == 413

            # small, in too many pieces to parse (sent whole: the hub reads all before it closes)
            host, _, port = urlsplit(url).netloc.rpartition(":")
            tls = await trio.open_ssl_over_tcp_stream(
                host, int(port), ssl_context=context, https_compatible=True
            )
            head = f"POST {urlsplit(url).path} HTTP/1.1\r\nhost: {host}\r\n"
            head += "transfer-encoding: chunked\r\n\r\n"
            pieces = b"1\r\nx\r\n" * (wire.MAX_BODY_PIECES + 1) + b"0\r\n\r\n"
            await tls.send_all(head.encode() + pieces)
            answer = b""
            while data := await tls.receive_some(65536):
                answer += data
            assert answer.startswith(b"HTTP/1.1 413 ") and b"pieces" in answer
            reply = await http.post(url, content=b"{}")
            assert reply.status_code == 400 and "lacks" in reply.json()["detail"]
        bare = ssl.create_default_context(cafile=str(pki.ca_cert))
        async with httpx.AsyncClient(verify=bare) as http:
            with pytest.raises(httpx.HTTPError):
                await http.post(url, content=b"{}")
        assert hank.hub is not None and not hank.hub.shares


def test_psrd_database_is_owner_only_and_zeroes_freed_content(tmp_path: Path) -> None:
    """PSRD is pad material: 0700 directory, 0600 file (even if they were created looser) and
    secure_delete, so purged shares and rewritten pages do not linger in the file."""
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    db_path = state / "pool.sqlite"
    db_path.touch()
    db_path.chmod(0o644)
    db = PsrdStore(db_path, "client")
    try:
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
        assert db.query("PRAGMA secure_delete") == [(1,)]
    finally:
        db.close()


def test_reprs_never_show_bodies() -> None:
    """A refill answer's body is a PSRD block: no repr (log line, traceback) may show it."""
    pad = b"PSRD-PAD-BYTES-0123456789"
    block = wire.PsrdBlock("b1", pad).encode()
    for shown in (
        Response(200, block),
        Request("GET", "/oob/v1/psrd", b"", block),
        HubReply(200, block, None),
    ):
        assert block not in repr(shown).encode() and b"UFNSRC1QQUQ" not in repr(shown).encode()
        assert "body" not in repr(shown)


def registrations(hub: Hub) -> list[object]:
    return [hub.db.query("SELECT * FROM clients ORDER BY 1"), dict(hub.clients), dict(hub.owners)]


async def register(client: Client, *encryptors: str, name: str | None = None) -> Response:
    reg = wire.Registration(name or client.name, (name or client.name, *encryptors)).encode()
    return await client.call("PUT", "/oob/v1/registration", body=reg, peer=name or client.name)


async def test_no_client_can_claim_another_clients_name(hub: Hub, clients) -> None:  # type: ignore[no-untyped-def]
    """A client that registered another client's name as one of its encryptors would be
    handed (and the hub would delete) that client's shares: refused, nothing changed; an
    encryptor name is one client's only, and no client registers under a name claimed so."""
    carol, conny, mallory = clients
    body, sig = carol.post_body("k1", SHARE, slave="conny")
    assert (await carol.call("POST", "/api/v1/key-share", body=body, signature=sig)).status == 200
    before = registrations(hub)
    reply = await register(mallory, "conny")
    assert reply.status == 409 and b"belongs to another client" in reply.body
    assert registrations(hub) == before
    query, m_sig = mallory.get_query("k1")
    reply = await mallory.call("GET", "/api/v1/key-share", query, signature=m_sig)
    assert reply.status == 404 and len(hub.shares) == 1  # conny's share stays conny's
    assert (await register(mallory, "sae-m")).status == 200  # a name nobody has: hers
    before = registrations(hub)
    assert (await register(carol, "sae-m")).status == 409
    reply = await register(Client(hub, "sae-m"))  # a client under a claimed name
    assert reply.status == 409 and b"claimed as an encryptor" in reply.body
    assert registrations(hub) == before
    assert (await register(mallory)).status == 200  # re-registered without it: free again
    assert (await register(carol, "sae-m")).status == 200
    body, sig = conny.post_body("k2", SHARE, slave="sae-m")
    assert (await conny.call("POST", "/api/v1/key-share", body=body, signature=sig)).status == 200
    query, m_sig = mallory.get_query("k2")
    reply = await mallory.call("GET", "/api/v1/key-share", query, signature=m_sig)
    assert reply.status == 404
    query, c_sig = carol.get_query("k2")
    reply = await carol.call("GET", "/api/v1/key-share", query, signature=c_sig)
    assert reply.status == 200


async def test_claims_a_store_kept_from_before_are_not_honoured(tmp_path: Path) -> None:
    """A store written before claims were exclusive: a claim of another client's name is
    ignored, and a name two clients claimed goes to neither."""
    hub = Hub(HubSettings("hank", require_tls_identity=False), tmp_path / "hank.sqlite")
    rows = {"carol": ["carol", "sae"], "conny": ["conny"], "mallory": ["mallory", "conny", "sae"]}
    sql = [("INSERT INTO clients VALUES (?, ?)", (n, json.dumps(e))) for n, e in rows.items()]
    hub.db.record([Change(sql=sql)])
    hub.close()
    hub = Hub(HubSettings("hank", require_tls_identity=False), tmp_path / "hank.sqlite")
    try:
        assert hub.owners["conny"] == "conny" and hub.owners["sae"] == DISPUTED
        hub.shares[("conny", "k1")] = hub.shares[("sae", "k1")] = object()  # type: ignore[assignment]
        assert hub._find("mallory", "k1") is None and hub._find("carol", "k1") is None
        assert hub._find("conny", "k1") == ("conny", "k1")
        assert (await register(Client(hub, "sae"))).status == 409
    finally:
        hub.shares.clear()
        hub.close()


async def test_stalled_handshakes_never_hold_the_places_of_authenticated_clients(
    tmp_path: Path,
) -> None:
    """Connections that open and send nothing need no certificate: they wait in the handshake,
    capped on its own with the oldest dropped, not in one of `max_connections` (before, two of
    them held both places here for the whole handshake bound)."""
    from qkdagent_dske.hubserver import ServerLimits, serve_hub, server_ssl_context

    from qkdagent.testing import write_test_pki

    pki = write_test_pki(tmp_path / "pki", ["hank", "alice"])
    hub = Hub(HubSettings("hank"), tmp_path / "hub.sqlite")
    server = server_ssl_context(pki["hank"].cert, pki["hank"].key, pki.ca_cert)
    client = ssl.create_default_context(cafile=str(pki.ca_cert))
    client.load_cert_chain(str(pki["alice"].cert), str(pki["alice"].key))
    limits = ServerLimits(handshake=60, max_connections=2, max_handshaking=2)
    async with trio.open_nursery() as nursery:
        serve = partial(serve_hub, hub, ssl_context=server, limits=limits)
        port = await nursery.start(serve)
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(10):  # well within the 60 s handshake bound
            tls = await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", port, ssl_context=client, https_compatible=True
            )
            await tls.send_all(b"GET /hub/hank/nothing HTTP/1.1\r\nhost: hank\r\n\r\n")
            assert (await tls.receive_some(100)).startswith(b"HTTP/1.1 ")
        assert await idle[0].receive_some(10) == b""  # the oldest was dropped for it
        for stream in [*idle, tls]:
            await trio.aclose_forcefully(stream)
        nursery.cancel_scope.cancel()
    hub.close()
