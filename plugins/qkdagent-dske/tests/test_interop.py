"""Interop with a client and a hub written independently from the protocol guide (guide.py):
each role of ours against the other implementation's, both directions, over real HTTP."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import trio
from qkdagent_dske.source import DskeSource

from qkdagent import Link
from qkdagent.testing import build_component, running

from .guide import GuideClient, GuideHub, recover, split
from .hubs import hub_table, open_hubs

ALICE = Link("l", "alice", "bob", True)
BOB = Link("l", "bob", "alice", False)
NAMES = ["hank", "helen", "hilary"]


async def test_guide_clients_through_our_hubs(tmp_path: Path) -> None:
    """A guide initiator posts shares to our hubs (mutual TLS); a guide responder (bert) and
    our `dske` responder (bob) each get their key back."""
    async with open_hubs(tmp_path, NAMES, agents=("alice", "bob", "bert")) as (pki, hubs):

        def tls(name: str) -> ssl.SSLContext:
            context = ssl.create_default_context(cafile=str(pki.ca_cert))
            context.load_cert_chain(str(pki[name].cert), str(pki[name].key))
            return context

        urls = {h.name: h.url for h in hubs}
        alice = GuideClient("alice", urls, tls("alice"))
        bert = GuideClient("bert", urls, tls("bert"))
        ours = build_component(
            DskeSource,
            {"hubs": hub_table(pki, hubs, "bob"), "k": 2, "refill_every": 3600},
            name="dske",
            agent="bob",
            state_dir=tmp_path / "bob",
        )
        try:
            await alice.setup()
            await bert.setup()
            async with running(ours):
                # our responder fetches in batches what the guide client posted one by one
                assert set(ours.batching) == set(NAMES)
                for responder in ("bert", "bob"):
                    secret, key_id = os.urandom(32), f"guide-{responder}"
                    for (x, share), hub in zip(split(secret, 2, 3), NAMES, strict=True):
                        await alice.post_share(hub, responder, key_id, x, share)
                    if responder == "bert":
                        got = [await bert.get_share(hub, key_id) for hub in NAMES]
                        assert sorted(x for x, _ in got) == [0, 1, 2]
                        assert recover(got[:2]) == recover(got[1:]) == secret
                    else:
                        assert (await ours.key_by_id(BOB, key_id)).value.reveal() == secret
        finally:
            await alice.aclose()
            await bert.aclose()


async def test_our_clients_through_guide_hubs(tmp_path: Path, nursery: trio.Nursery) -> None:
    """Our `dske` initiator posts through guide hubs (plain HTTP); a guide responder (bert)
    rebuilds its key with the table-free field and checks the digest share; our responder
    (bob) gets the next one."""
    hubs = [GuideHub(name) for name in NAMES]
    for hub in hubs:
        await nursery.start(hub.serve)
    urls = {h.name: h.url() for h in hubs}

    def source(agent: str) -> DskeSource:
        table = {
            "hubs": {name: {"url": url} for name, url in urls.items()},
            "k": 2,
            "refill_every": 3600,
            "allow_plain_http": True,
            "psrd_block_size": 8192,
        }
        return build_component(
            DskeSource, table, name="dske", agent=agent, state_dir=tmp_path / agent
        )

    alice, bob = source("alice"), source("bob")
    bert = GuideClient("bert", urls, None)
    try:
        await bert.setup()
        async with running(alice, bob):
            # the guide hubs answer the batch probe 404, as dske-python's do: one request
            # per share from then on
            assert alice.unbatched == bob.unbatched == set(NAMES) and not alice.batching
            alice.peer_client = "bert"
            key = await alice.new_key(ALICE)
            got = [await bert.get_share(name, key.key_id) for name in NAMES]
            assert sorted(x for x, _ in got) == [0, 1, 2]
            assert recover(got[:2]) == recover([got[0], got[2]]) == key.value.reveal()
            alice.peer_client = "bob"
            key = await alice.new_key(ALICE)
            assert (await bob.key_by_id(BOB, key.key_id)).value == key.value
    finally:
        await bert.aclose()
