"""`qkdagent kme-sim --supply bb84:...` and `qkdagent qkdm-sim --supply bb84:...` as their own
processes: both SAEs / applications get the same keys, through the ETSI 014 and 004 sources the
agent uses, and those keys are BB84 blocks' keys (recomputed here from the same seed); an
eavesdropped link yields none (014: 503, 004: insufficient key)."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from qkdagent import Link, SourceUnavailable
from qkdagent.testing import build_component, running
from qkdagent_etsi004.source import Etsi004Source
from qkdagent_etsi014.source import Etsi014Source

from qkdagent_bb84.supply import make_supply_factory

ALICE = Link("l", "alice", "bob", True)
BOB = Link("l", "bob", "alice", False)
OPTIONS = {"decoys": "false", "block_bits": "4000", "seed": "7", "capacity_bits": "20000"}
"""Small blocks without decoys: milliseconds each; a seed, so the test can recompute them."""


def spec(options: dict[str, str]) -> str:
    return "bb84:" + ",".join(f"{k}={v}" for k, v in options.items())


def expected_stream(ends: tuple[str, str], blocks: int = 4) -> bytes:
    """The key bits the link between `ends` produces first: its verified blocks in order."""
    link = make_supply_factory(OPTIONS)(*ends)
    link._background = False  # type: ignore[attr-defined]
    stream = b""
    for _ in range(blocks):
        result = link.produce_once()  # type: ignore[attr-defined]
        if result.ok:
            stream += result.alice_key
    assert stream
    return stream


@asynccontextmanager
async def simulator(tmp_path: Path, command: str, supply: str) -> AsyncIterator[list[Any]]:
    """`qkdagent COMMAND --supply SUPPLY` as a process; yields its ready file's contents."""
    ready, log, pki = tmp_path / "ready.json", tmp_path / "out.txt", tmp_path / "pki"
    argv = [sys.executable, "-m", "qkdagent", command, "--pki", str(pki),
            "--ready-file", str(ready), "--supply", supply]  # fmt: skip
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        with trio.fail_after(60):
            while not ready.exists():
                assert process.poll() is None, log.read_text()
                await trio.sleep(0.05)
        yield json.loads(ready.read_text())
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            await process.wait()
    assert process.returncode == 0, log.read_text()


def kme_sources(ready: list[Any], pki: Path) -> tuple[Etsi014Source, Etsi014Source]:
    home = {sae: k for k in ready for sae in k["saes"]}

    def table(sae: str) -> dict[str, Any]:
        kme = home[sae]
        return {"kme_url": kme["url"], "cert": str(pki / f"{sae}.pem"),
                "key": str(pki / f"{sae}.key"), "ca": str(pki / "ca.pem"),
                "sae_id": sae, "kme_id": kme["kme_id"]}  # fmt: skip

    return (
        build_component(Etsi014Source, table("alice"), links=(ALICE,), agent="alice"),
        build_component(Etsi014Source, table("bob"), links=(BOB,), agent="bob"),
    )


def module_sources(ready: list[Any]) -> tuple[Etsi004Source, Etsi004Source]:
    tables = {
        app: {"module": m["address"], "module_id": m["module_id"], "ca": m["ca"]}
        | m["credentials"][app]
        for m in ready
        for app in m["applications"]
    }
    return (
        build_component(Etsi004Source, tables["alice"], links=(ALICE,), agent="alice"),
        build_component(Etsi004Source, tables["bob"], links=(BOB,), agent="bob"),
    )


async def first_key(alice: Any) -> Any:
    """The first key once the supply's first block is in (the simulator starts empty)."""
    with trio.fail_after(60):
        while True:
            try:
                return await alice.new_key(ALICE)
            except SourceUnavailable:
                await trio.sleep(0.05)


async def test_kme_sim_serves_bb84_keys_to_both_saes(tmp_path: Path) -> None:
    stream = expected_stream(("KME_A", "KME_B"))
    async with simulator(tmp_path, "kme-sim", spec(OPTIONS)) as ready:
        alice, bob = kme_sources(ready, tmp_path / "pki")
        async with running(alice, bob):
            keys = [await first_key(alice)] + [await alice.new_key(ALICE) for _ in range(3)]
            same = [await bob.key_by_id(BOB, k.key_id) for k in keys]
    assert [k.value for k in keys] == [s.value for s in same]
    served = b"".join(k.value.reveal() for k in keys)
    assert served == stream[: len(served)]  # the BB84 link's blocks, in order


async def test_kme_sim_on_an_eavesdropped_link_answers_503(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    async with simulator(tmp_path, "kme-sim", spec({**OPTIONS, "eve_intercept": "1"})) as ready:
        alice, _ = kme_sources(ready, pki)
        url = next(k["url"] for k in ready if "alice" in k["saes"])
        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        context.load_cert_chain(str(pki / "alice.pem"), str(pki / "alice.key"))
        async with httpx.AsyncClient(base_url=url, verify=context, trust_env=False) as client:
            for _ in range(5):  # every block aborts (QBER ~25 %): the store stays empty
                answer = await client.get("/api/v1/keys/bob/enc_keys")
                assert answer.status_code == 503, answer.text
                await trio.sleep(0.2)
            status = (await client.get("/api/v1/keys/bob/status")).json()
        assert status["stored_key_count"] == 0
        async with running(alice):
            with pytest.raises(SourceUnavailable):
                await alice.new_key(ALICE)


async def test_qkdm_sim_serves_bb84_keys_to_both_applications(tmp_path: Path) -> None:
    stream = expected_stream(("QKDM_A", "QKDM_B"))
    async with simulator(tmp_path, "qkdm-sim", spec(OPTIONS)) as ready:
        alice, bob = module_sources(ready)
        async with running(alice, bob):
            keys = [await first_key(alice)] + [await alice.new_key(ALICE) for _ in range(3)]
            same = [await bob.key_by_id(BOB, k.key_id) for k in keys]
    assert [k.value for k in keys] == [s.value for s in same]
    for key in keys:  # each a piece of the BB84 link's first blocks
        assert key.value.reveal() in stream
    assert len({k.value.reveal() for k in keys}) == len(keys)


async def test_qkdm_sim_on_an_eavesdropped_link_has_no_key(tmp_path: Path) -> None:
    async with simulator(tmp_path, "qkdm-sim", spec({**OPTIONS, "eve_intercept": "1"})) as ready:
        alice, _ = module_sources(ready)
        async with running(alice):
            for _ in range(3):
                with pytest.raises(SourceUnavailable) as refused:
                    await alice.new_key(ALICE)
                await trio.sleep(0.2)
    assert "status 2" in str(refused.value)  # 004's INSUFFICIENT_KEY: none established
