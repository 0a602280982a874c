"""Blocks per second over the two-process channel (loopback mutual TLS) against in-process.

    python3 bench/bench_network.py [blocks]

Both ends run in this one process (two worker threads, one event loop), over a real TLS socket
on 127.0.0.1, so the figure includes framing, TLS, HMAC and the thread hops of every message,
and Bob's half of the computation on top of Alice's (in-process mode runs both halves once).
Decoy-free blocks (Tomamichel et al. length) of n = 10^4 and 10^5 sifted bits. Prints figures.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import trio
from qkdagent import write_test_pki

from qkdagent_bb84.engine import Settings, fingerprint, run_block
from qkdagent_bb84.netlink import Initiator, NetConfig, Responder
from qkdagent_bb84.physics import Physics
from qkdagent_bb84.store import KeyStore
from qkdagent_bb84.tls import TlsFiles


def in_process(settings: Settings, blocks: int) -> tuple[float, int]:
    run_block(settings, (1, 0))
    start = time.perf_counter()
    bits = sum(run_block(settings, (1, i)).key_bits for i in range(blocks))
    return blocks / (time.perf_counter() - start), bits


async def network(settings: Settings, blocks: int, tmp: Path) -> tuple[float, int, int]:
    pki = write_test_pki(tmp / "pki", ["alice", "bob"])
    files = {n: TlsFiles(pki[n].cert, pki[n].key, pki.ca_cert) for n in ("alice", "bob")}
    secret = os.urandom(32)
    print_ = fingerprint(settings, 32)
    rounds = []
    bob_store, alice_store = KeyStore(tmp / "b"), KeyStore(tmp / "a")
    bob = Responder(
        NetConfig("127.0.0.1", 0, files["bob"], "alice"),
        settings, print_, 32, secret, bob_store, lambda k, d: None, lambda r: None,
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        port = await nursery.start(bob.serve)
        alice = Initiator(
            NetConfig("127.0.0.1", port, files["alice"], "bob"),
            settings, print_, 32, 1, secret, alice_store, lambda k, d: None, rounds.append,
        )  # fmt: skip
        alice.stream = await alice.connect()
        await alice.block()
        start = time.perf_counter()
        for _ in range(blocks):
            await alice.block()
        rate = blocks / (time.perf_counter() - start)
        nursery.cancel_scope.cancel()
    bits = sum(r.key_bits for r in rounds[1:])
    messages = sum(sum(r.messages.values()) for r in rounds[1:]) // blocks
    assert alice_store.bits() == bob_store.bits()
    return rate, bits, messages


def main(blocks: int) -> None:
    for n in (10_000, 100_000):
        settings = Settings(Physics(decoys=False), block_bits=n)
        count = blocks if n == 10_000 else max(2, blocks // 5)
        local, local_bits = in_process(settings, count)
        with tempfile.TemporaryDirectory() as tmp:
            remote, bits, messages = trio.run(network, settings, count, Path(tmp))
        print(
            f"n = {n:>7}: in-process {local:6.1f} blocks/s ({local * local_bits / count / 1e3:7.1f}"
            f" kbit/s of key); network {remote:6.1f} blocks/s ({remote * bits / count / 1e3:7.1f}"
            f" kbit/s), {messages} messages/block each way together"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
