"""The hub's batch extension against good, hostile and replayed batches (straight to
`Hub.handle`, as in test_hub.py): one signed request and one signed answer per batch, a result
per item, the same authorisation per item, and nothing changed by a refused batch."""

from __future__ import annotations

import json

from qkdagent_dske import batchwire, wire
from qkdagent_dske.hubapp import Hub, Response

from . import test_hub
from .test_hub import SHARE, Client, refused, register, snapshot

hub = test_hub.hub  # the same fixtures: a hub, and carol, conny and mallory registered with it
clients = test_hub.clients

POST = {"method": "POST", "path": "/api/v1/key-shares"}
FETCH = {"method": "POST", "path": "/api/v1/key-shares-fetch"}


def item(client: Client, key_id: str, share: bytes = SHARE, slave: str = "conny") -> bytes:
    """One share POST body, its pad taken from the client's pool (no signature of its own)."""
    ((pad_alloc, pad),) = client.take(len(share))
    return wire.SharePost(
        client.name, client.name, slave, key_id, 1, pad_alloc, wire.xor(share, pad)
    ).encode()


def signed(client: Client, body: bytes) -> str:
    ((sig, key),) = client.take(32)
    return wire.signature_header(sig, key, b"", body)


def verified(client: Client, reply: Response, pads: list[wire.Allocation]) -> list[bytes]:
    """The answer's signature checked with the client's copy of the hub-owned PSRD."""
    signature = wire.parse_signature(dict(reply.headers)[wire.SIGNATURE_HEADER])
    key, *rest = client.book.peek("hank", "hub", [signature.allocation, *pads])
    assert signature.verify(key, b"", reply.body)
    client.book.consume([signature.allocation, *pads])
    return rest


async def post_batch(client: Client, items: list[bytes]) -> list[batchwire.ItemResult]:
    body = batchwire.encode_post_batch(client.name, items)
    reply = await client.call(body=body, signature=signed(client, body), **POST)
    assert reply.status == 200, reply.body
    verified(client, reply, [])
    return batchwire.parse_post_results(reply.body, len(items))


async def fetch_batch(client: Client, key_ids: list[str]) -> list[tuple[int, bytes | None]]:
    body = batchwire.encode_fetch_batch(client.name, key_ids)
    reply = await client.call(body=body, signature=signed(client, body), **FETCH)
    assert reply.status == 200, reply.body
    results = batchwire.parse_fetch_results(reply.body, key_ids)
    pads = [r.share.encryption_key_allocation for r in results if r.share is not None]
    clear = iter(verified(client, reply, pads))
    return [
        (r.result.status, wire.xor(r.share.encrypted_share_value, next(clear)) if r.share else None)
        for r in results
    ]


async def test_probe_says_the_hub_takes_batches(hub: Hub, clients) -> None:  # type: ignore[no-untyped-def]
    reply = await clients[0].call("GET", "/api/v1/key-shares")
    assert reply.status == 200 and batchwire.parse_capabilities(reply.body) == batchwire.MAX_ITEMS
    assert wire.SIGNATURE_HEADER not in dict(reply.headers)


async def test_batch_relays_each_share_once_to_the_named_client(hub: Hub, clients) -> None:  # type: ignore[no-untyped-def]
    carol, conny, mallory = clients
    shares = {f"k{i}": bytes([i]) * 32 for i in range(5)}
    results = await post_batch(carol, [item(carol, k, v) for k, v in shares.items()])
    assert [r.status for r in results] == [200] * 5 and len(hub.shares) == 5
    # mallory names conny's keys: none is hers (404 each), and nothing is delivered
    assert [s for s, _ in await fetch_batch(mallory, list(shares))] == [404] * 5
    assert len(hub.shares) == 5
    got = await fetch_batch(conny, ["k3", "nope", *shares, "k1"])
    assert got[0] == (200, shares["k3"]) and got[1] == (404, None)
    assert got[2:] == [(200, v) if k != "k3" else (404, None) for k, v in shares.items()] + [
        (404, None)  # asked twice in one batch: delivered once
    ]
    assert not hub.shares  # every share deleted once delivered
    assert [s for s, _ in await fetch_batch(conny, ["k0"])] == [404]


async def test_mixed_items_each_get_their_own_result(hub: Hub, clients) -> None:  # type: ignore[no-untyped-def]
    carol, conny, mallory = clients
    good = item(carol, "good")
    replayed_pad = json.loads(good)
    replayed_pad["user_key_id"] = "same-pad"  # the pad of the item before it, inside the batch
    not_hers = item(mallory, "m1")  # names mallory as master: carol's signature cannot send it
    bad_share = json.loads(item(carol, "short"))
    bad_share["encrypted_share_value"] = "AAAA"  # shorter than its pad allocation
    items = [
        good,
        wire.dump_json(replayed_pad),
        not_hers,
        wire.dump_json(bad_share),
        item(carol, "good"),  # the same key ID again: the hub holds one already
        item(carol, "also-good"),
    ]
    results = await post_batch(carol, items)
    assert [r.status for r in results] == [200, 409, 403, 400, 409, 200]
    assert "reuses PSRD" in results[1].detail and "another master" in results[2].detail
    assert sorted(k for _, k in hub.shares) == ["also-good", "good"]
    assert dict(await fetch_batch(conny, ["good"])) == {200: SHARE}


async def test_hostile_batches_change_nothing(hub: Hub, clients) -> None:  # type: ignore[no-untyped-def]
    carol, _, mallory = clients
    body = batchwire.encode_post_batch("carol", [item(carol, "k1")])
    sig = signed(carol, body)
    await refused(carol, 401, hub, body=body.replace(b"k1", b"k2"), signature=sig, **POST)
    await refused(carol, 400, hub, body=body, signature=None, **POST)
    await refused(carol, 403, hub, body=body, signature=sig, peer="mallory", **POST)
    detail = await refused(carol, 400, hub, body=body, signature=signed(mallory, body), **POST)
    assert "does not hold" in detail["detail"]
    too_many = batchwire.encode_post_batch("carol", [b"{}"] * (batchwire.MAX_ITEMS + 1))
    await refused(carol, 400, hub, body=too_many, signature=signed(carol, too_many), **POST)
    huge = batchwire.encode_post_batch("carol", [b'"' + b"x" * wire.MAX_BODY + b'"'])
    await refused(carol, 400, hub, body=huge, signature=signed(carol, huge), **POST)
    empty = batchwire.encode_post_batch("carol", [])
    await refused(carol, 400, hub, body=empty, signature=signed(carol, empty), **POST)
    nested = b'{"client_name":"carol","shares":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    await refused(carol, 400, hub, body=nested[: wire.MAX_BODY], signature=sig, **POST)
    await refused(carol, 400, hub, query=b"x=1", body=body, signature=sig, **POST)
    assert (await carol.call(body=body, signature=sig, **POST)).status == 200
    detail = await refused(carol, 409, hub, body=body, signature=sig, **POST)  # a replay
    assert "reuses PSRD" in detail["detail"]
    fetch = batchwire.encode_fetch_batch("conny", ["k1"])
    fsig = signed(carol, fetch)
    await refused(carol, 403, hub, body=fetch, signature=fsig, peer="carol", **FETCH)
    await refused(carol, 405, hub, method="GET", path=FETCH["path"])
    assert len(hub.shares) == 1


async def test_hub_owned_psrd_exhausted_refuses_the_whole_batch(hub: Hub, clients) -> None:  # type: ignore[no-untyped-def]
    carol, conny, _ = clients
    assert [r.status for r in await post_batch(carol, [item(carol, "k1")])] == [200]
    pool = hub.book.pool("conny", "hub")
    for block in pool:  # as if conny's hub-owned PSRD had been spent
        block.next = block.size
    before = snapshot(hub)
    body = batchwire.encode_fetch_batch("conny", ["k1"])
    reply = await conny.call(body=body, signature=signed(conny, body), **FETCH)
    assert reply.status == 503 and snapshot(hub) == before and len(hub.shares) == 1


async def test_a_claimed_encryptor_name_takes_no_share_through_a_batch(hub: Hub, clients) -> None:  # type: ignore[no-untyped-def]
    """The review's attack: mallory registers conny as one of her encryptors, then fetches
    conny's share in a batch (in clear to her, deleted for conny). Her claim is refused."""
    carol, conny, mallory = clients
    assert [r.status for r in await post_batch(carol, [item(carol, "k1")])] == [200]
    assert (await register(mallory, "conny")).status == 409
    assert await fetch_batch(mallory, ["k1"]) == [(404, None)] and len(hub.shares) == 1
    assert await fetch_batch(conny, ["k1"]) == [(200, SHARE)]
