"""Two agents over real loopback HTTPS with mutual TLS, and hostile input against the peer API."""

from __future__ import annotations

import base64
import json
import logging
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from qkdagent import protocol
from qkdagent.peering import PeerClient, TransportError
from qkdagent.pki import write_test_pki
from qkdagent.state import StateStore
from qkdagent.testing import MemoryPool, assert_not_leaked, open_agent_pair
from qkdagent.testing.agents import LINK

REC = {"sinks": {"rec": {"type": "recording"}}}


async def test_hundred_rotations_identical_and_nothing_leaks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    chain_keys: list = []  # every chain and auth key either side commits, to search logs for
    real_commit = StateStore.commit

    def spy(self: StateStore, name: str, **kw: Any) -> Any:
        chain_keys.extend([kw["chain_key"], kw["auth_key"]])
        return real_commit(self, name, **kw)

    monkeypatch.setattr(StateStore, "commit", spy)
    link = {"interval": 0.02, "jitter": 0, "reject_after": 30}
    async with open_agent_pair(tmp_path, alice=REC, bob=REC, link=link, start=False) as pair:
        pool = MemoryPool.named(pair.configs["alice"]["sources"]["sim"]["pool"])
        pool.keep_history = True
        await pair.start("bob")
        await pair.start("alice")
        await pair.wait_for_epoch(100, timeout=60)
        await pair.stop("alice")
        await pair.stop("bob")
    alice, bob = pair.sink("alice", "rec"), pair.sink("bob", "rec")
    by_epoch_a = {r.epoch: r.fingerprint for r in alice.installs}
    by_epoch_b = {r.epoch: r.fingerprint for r in bob.installs}
    assert set(range(1, 101)) <= set(by_epoch_a) & set(by_epoch_b)
    assert all(by_epoch_a[e] == by_epoch_b[e] for e in range(1, 101))
    assert len(set(by_epoch_a.values())) == len(by_epoch_a)  # a new secret every epoch
    assert alice.history[-1] == bob.history[-1] or pair.epoch("alice") != pair.epoch("bob")
    secrets = alice.history + bob.history + [k.value for k in pool.history] + chain_keys
    assert len(pool.history) >= 100 and len(chain_keys) >= 2 * 200
    assert_not_leaked(caplog.text, secrets)
    assert "epoch 100 committed" in caplog.text


@pytest.fixture
async def quiet_pair(tmp_path: Path):
    """A pair that rotated once and then waits an hour: the tests drive it by hand."""
    link = {"interval": 3600, "jitter": 0, "reject_after": 7200}
    async with open_agent_pair(tmp_path, alice=REC, bob=REC, link=link) as pair:
        await pair.wait_for_epoch(1)
        yield pair


def _bob_state(pair) -> tuple:
    store = pair.bob.store
    record = store.load(LINK)
    used = store._db.execute("SELECT COUNT(*) FROM used_key_ids").fetchone()[0]
    pending = record.pending.epoch if record.pending else None
    return (record.epoch, record.chain_key.reveal(), record.auth_key.reveal(), pending, used)


def _client(pair, name: str = "alice") -> httpx.AsyncClient:
    tls = pair.agents[name].settings.tls
    ctx = ssl.create_default_context(cafile=str(tls.ca))
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    return httpx.AsyncClient(verify=ctx, timeout=5)


def _bob_url(pair, action: str, link: str = LINK) -> str:
    return f"{pair.configs['alice']['links'][LINK]['peer_url']}/v1/links/{link}/{action}"


def _rotate(pair, epoch: int | None = None, **change) -> bytes:
    """A correctly authenticated rotate from alice for the next epoch (or `epoch`)."""
    record = pair.alice.link(LINK).record
    fields = {
        "link": LINK,
        "sender": "alice",
        "receiver": "bob",
        "epoch": record.epoch + 1 if epoch is None else epoch,
        "auth_key": record.auth_key,
        "keys": [["sim", "00000000-0000-4000-8000-0000000000aa"]],
        "labels": ["recording"],
        "nonce": protocol.new_nonce(),
    }
    fields.update(change)
    return protocol.build("rotate", **fields)


async def test_replayed_tampered_wrong_epoch_oversized_malformed_are_refused(quiet_pair) -> None:
    pair = quiet_pair
    sent: list[tuple[str, bytes]] = []
    client = pair.alice.client
    original = client.post

    async def recording_post(url: str, link: str, action: str, body: bytes):
        sent.append((action, body))
        return await original(url, link, action, body)

    client.post = recording_post  # type: ignore[method-assign]
    assert await pair.alice.link(LINK).rotate_once()
    assert pair.epoch("bob") == 2
    rotate_2 = next(b for a, b in sent if a == "rotate")
    commit_2 = next(b for a, b in sent if a == "commit")
    assert await pair.alice.link(LINK).rotate_once()  # epoch 3: commit_2 is now old
    before = _bob_state(pair)

    good = _rotate(pair)
    tampered = bytearray(good)
    tampered[good.index(b"0000000000aa")] = ord("1")
    unauthenticated = _rotate(pair, auth_key=pair.bob.link(LINK).start.auth_key)
    data = json.loads(good)
    data["extra"] = 1
    cases = [
        ("rotate", rotate_2, 409, "replayed rotate"),
        ("commit", commit_2, 409, "replayed old commit"),
        ("rotate", bytes(tampered), 403, "tampered rotate"),
        ("rotate", unauthenticated, 403, "rotate under the wrong key"),
        ("rotate", _rotate(pair, epoch=pair.epoch("bob") + 5), 409, "wrong epoch"),
        ("rotate", _rotate(pair, epoch=pair.epoch("bob")), 409, "current epoch again"),
        ("rotate", b"x" * (70 * 1024), 413, "oversized"),
        ("rotate", b"{not json", 400, "malformed JSON"),
        ("rotate", b"[1, 2]", 400, "not an object"),
        ("rotate", json.dumps(data).encode(), 400, "unknown field"),
        ("rotate", good.replace(b'"epoch":', b'"epoch":"1","x":'), 400, "wrong type"),
        ("commit", good, 400, "rotate body on the commit path"),
        ("resync", _rotate(pair), 400, "rotate body on the resync path"),
    ]
    async with _client(pair) as http:
        for action, body, status, what in cases:
            response = await http.post(_bob_url(pair, action), content=body)
            assert response.status_code == status, what
            assert "error" in response.json(), what
            assert _bob_state(pair) == before, what
        response = await http.post(_bob_url(pair, "rotate", link="no-such-link"), content=good)
        assert response.status_code == 404
        response = await http.get(_bob_url(pair, "rotate"))
        assert response.status_code == 405
    assert _bob_state(pair) == before
    assert await pair.alice.link(LINK).rotate_once()  # the link still works
    assert pair.secret("alice", "rec") == pair.secret("bob", "rec")


async def test_retransmitted_rotate_gets_the_same_answer(quiet_pair) -> None:
    pair = quiet_pair
    pool = MemoryPool.named(pair.configs["alice"]["sources"]["sim"]["pool"])
    key = pool.issue()
    body = _rotate(pair, keys=[["sim", key.key_id]])
    async with _client(pair) as http:
        first = await http.post(_bob_url(pair, "rotate"), content=body)
        state = _bob_state(pair)
        second = await http.post(_bob_url(pair, "rotate"), content=body)
    assert first.status_code == second.status_code == 200
    assert first.content == second.content
    assert _bob_state(pair) == state and state[3] == pair.epoch("alice") + 1


async def test_peer_without_valid_client_certificate_is_refused(quiet_pair, tmp_path: Path) -> None:
    pair = quiet_pair
    before = _bob_state(pair)
    tls = pair.alice.settings.tls
    no_cert = ssl.create_default_context(cafile=str(tls.ca))
    other = write_test_pki(tmp_path / "other", ["alice"])
    foreign = ssl.create_default_context(cafile=str(tls.ca))
    foreign.load_cert_chain(str(other["alice"].cert), str(other["alice"].key))
    for ctx in (no_cert, foreign):
        async with httpx.AsyncClient(verify=ctx, timeout=5) as http:
            with pytest.raises(httpx.TransportError):
                response = await http.post(_bob_url(pair, "rotate"), content=_rotate(pair))
                response.raise_for_status()
    assert _bob_state(pair) == before


async def test_agent_refuses_a_server_outside_its_ca(quiet_pair, tmp_path: Path) -> None:
    pair = quiet_pair
    other = write_test_pki(tmp_path / "other", ["alice"])
    from qkdagent.config import TlsFiles

    stranger = PeerClient(TlsFiles(other["alice"].cert, other["alice"].key, other.ca_cert))
    with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
        await stranger.post(pair.configs["alice"]["links"][LINK]["peer_url"], LINK, "rotate", b"{}")
    await stranger.aclose()


async def test_status_and_metrics_endpoints(quiet_pair) -> None:
    from qkdagent.cli import main

    pair = quiet_pair
    url = f"http://{pair.configs['alice']['agent']['status_listen']}"
    async with httpx.AsyncClient() as http:
        status = (await http.get(url + "/status")).json()
        metrics = (await http.get(url + "/metrics")).text
    (link,) = status["links"]
    assert link["link"] == LINK and link["role"] == "initiator" and link["epoch"] == 1
    assert link["key_age"] is not None and link["next_rotation"] > status["time"] + 3000
    assert 'qkdagent_rotations_total{link="alice-bob"} 1.0' in metrics
    assert "qkdagent_link_epoch" in metrics
    code = await trio.to_thread.run_sync(main, ["status", "--url", url, "--json"])
    assert code == 0
    secret = pair.secret("alice", "rec").reveal()
    assert base64.b64encode(secret).decode() not in json.dumps(status) + metrics
    assert secret.hex() not in json.dumps(status) + metrics


async def test_responder_sees_the_client_certificate_and_refuses_another_agent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Mallory holds a certificate of the deployment CA: TLS admits her, but a correctly
    MAC'd rotate sent under her certificate is refused, and the same body under alice's is
    taken (the server hands the client certificate's names to the link)."""
    caplog.set_level(logging.INFO, logger="qkdagent.peerserver")
    pki = write_test_pki(tmp_path / "ca", ["alice", "bob", "mallory"])
    sides = {
        name: {**REC, "agent": {"tls": {"cert": str(pki[name].cert), "key": str(pki[name].key),
                                        "ca": str(pki.ca_cert)}}}
        for name in ("alice", "bob")
    }  # fmt: skip
    link = {"interval": 3600, "jitter": 0, "reject_after": 7200}
    async with open_agent_pair(tmp_path, alice=sides["alice"], bob=sides["bob"], link=link) as pair:
        await pair.wait_for_epoch(1)
        pool = MemoryPool.named(pair.configs["alice"]["sources"]["sim"]["pool"])
        body = _rotate(pair, keys=[["sim", pool.issue().key_id]])
        before = _bob_state(pair)
        mallory = ssl.create_default_context(cafile=str(pki.ca_cert))
        mallory.load_cert_chain(str(pki["mallory"].cert), str(pki["mallory"].key))
        async with httpx.AsyncClient(verify=mallory, timeout=5) as http:
            # mallory's certificate names no peer of bob's: the connection is reset right
            # after the handshake, so she holds no slot and learns nothing, not even a status
            with pytest.raises(httpx.TransportError):
                await http.post(_bob_url(pair, "rotate"), content=body)
        refused = pair.bob.metrics.peer_connections_refused.labels("not-a-peer")._value.get()
        assert refused >= 1
        assert _bob_state(pair) == before
        async with _client(pair) as http:
            response = await http.post(_bob_url(pair, "rotate"), content=body)
        assert response.status_code == 200
        assert _bob_state(pair)[3] == before[0] + 1  # bob now holds the pending epoch
