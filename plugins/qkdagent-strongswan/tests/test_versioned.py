"""Versioned PPK_IDs (one per epoch) between two real charons.

Gateway b's connection has no `ppk_id`, so it accepts any PPK_ID it holds a PPK for. Gateway a's
connection is re-sent from `conn_file` with each epoch's PPK_ID. Gateway a sends the PPK_ID, so it
must be the side that reauthenticates: its agent is the link's responder here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from qkdagent_strongswan import StrongswanPpkSink
from qkdagent_strongswan.testbed import CONN, ConnSpec, Testbed, ppk_log_count

from qkdagent import KeyMeta, Link, Secret

ALICE = Link("ab", "alice", "bob", False)
BOB = Link("ab", "bob", "alice", True)
BASE = "qkd-ab"


def meta(epoch: int) -> KeyMeta:
    return KeyMeta(epoch, (f"key-{epoch}",), "ppk", time.time())


@pytest.fixture
def lab_conns() -> tuple[list[ConnSpec], list[ConnSpec]]:
    return [ConnSpec(CONN, f"{BASE}-0")], [ConnSpec(CONN, None)]


def conn_ppk_id(bed: Testbed) -> str:
    session = bed.a.session()
    try:
        (entry,) = list(session.list_conns({"ike": CONN}))
        return entry[CONN]["ppk_id"].decode()
    finally:
        session.transport.close()


async def test_versioned_ppk_ids_rotate_with_reauthentication(
    bed: Testbed, make_sink: Callable[..., StrongswanPpkSink], tmp_path: Path
) -> None:
    conn_file = tmp_path / "gw.json"
    conn_file.write_text(json.dumps(bed.a.conn_message(bed.a.conns[0])))
    common = {"versioned": True, "ppk_id": BASE, "keep_versions": 2}
    alice = make_sink(bed.a, conn_file=str(conn_file), **common)
    bob = make_sink(bed.b, **common)
    await alice.prepare()
    await bob.prepare()

    secret = Secret.random()
    await bob.install(BOB, secret, meta(1))
    await alice.install(ALICE, secret, meta(1))
    assert conn_ppk_id(bed) == f"{BASE}-1"
    assert await trio.to_thread.run_sync(bed.a.initiate, CONN)
    assert ppk_log_count(bed.b, f"{BASE}-1") == 1

    for epoch in (2, 3, 4):
        secret = Secret.random()
        await bob.install(BOB, secret, meta(epoch))
        await alice.install(ALICE, secret, meta(epoch))  # reauthenticates
        assert conn_ppk_id(bed) == f"{BASE}-{epoch}"
        assert ppk_log_count(bed.a, f"{BASE}-{epoch}") == 1
        assert ppk_log_count(bed.b, f"{BASE}-{epoch}") == 1
        ours = {i for i in bed.b.shared_ids() if i.startswith("qkdagent-ab-")}
        assert ours == {f"qkdagent-ab-{epoch - 1}", f"qkdagent-ab-{epoch}"}
        assert await bob.verify(BOB, secret, meta(epoch)) is True
        assert await alice.verify(ALICE, secret, meta(epoch)) is True
    assert bed.a.ping().returncode == 0

    # an operator's `swanctl --load-conns` resets the connection's PPK_ID: the check repairs it
    await trio.to_thread.run_sync(bed.a.swanctl, "--load-conns")
    assert conn_ppk_id(bed) == f"{BASE}-0"
    repaired = await alice.check_once()
    assert [r.secret_id for r in repaired] == [f"conn:{CONN}"]
    assert conn_ppk_id(bed) == f"{BASE}-4"
    await alice.reauthenticate(ALICE)
    assert ppk_log_count(bed.b, f"{BASE}-4") == 2
    await alice.aclose()
    await bob.aclose()
