"""The example files in contrib/strongswan work: real charons load them, the sinks accept them."""

from __future__ import annotations

import secrets
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from qkdagent_strongswan import StrongswanPpkSink

from qkdagent import KeyMeta, Link, Secret
from qkdagent.testing import build_component

from .testbed import Testbed, established, wait_until

CONTRIB = Path(__file__).resolve().parents[3] / "contrib" / "strongswan"
CORE_KEYS = ("type", "label", "timeout")  # consumed by the core before the sink sees the table


def sink_table(site: str) -> dict[str, object]:
    config = tomllib.loads((CONTRIB / f"site-{site}.toml").read_text())
    (table,) = [t for t in config["sinks"].values() if t["type"] == "strongswan-ppk"]
    return {k: v for k, v in table.items() if k not in CORE_KEYS}


@pytest.mark.parametrize("site", ["a", "b"])
def test_example_agent_configs_are_valid_sink_options(site: str, tmp_path: Path) -> None:
    sink = build_component(StrongswanPpkSink, sink_table(site), name="ppk", state_dir=tmp_path)
    assert sink.config.ppk_id == "qkd-site-ab"
    assert sink.config.ike == {"a": "site-b", "b": "site-a"}[site]


def lab_conf(gateway: str, psk: str) -> str:
    text = (CONTRIB / f"gateway-{gateway}.swanctl.conf").read_text()
    assert "# encap = yes" in text and "0xREPLACE_WITH_64_HEX_DIGITS" in text
    # the test kernel has no ESP: kernel-libipsec needs UDP encapsulation
    return text.replace("# encap = yes", "encap = yes").replace("0xREPLACE_WITH_64_HEX_DIGITS", psk)


@pytest.fixture
def contrib_bed(lab_ready: None) -> Iterator[Testbed]:
    """The lab's two charons, loaded with the contrib swanctl.conf files instead of its own."""
    with Testbed.open([], [], start=False) as bed:
        psk = "0x" + secrets.token_hex(32)
        for side, gateway in ((bed.a, "a"), (bed.b, "b")):
            side.swanctl_conf.write_text(lab_conf(gateway, psk))
            side.start()
            side.swanctl("--load-all", "--noprompt")
        yield bed


async def test_example_gateways_rotate_ppk_and_reauthenticate(
    contrib_bed: Testbed, tmp_path: Path
) -> None:
    bed = contrib_bed
    sinks = {}
    for site, charon in (("a", bed.a), ("b", bed.b)):
        table = sink_table(site) | {
            "socket": str(charon.vici_path),
            "strongswan_conf": str(charon.strongswan_conf),
        }
        sinks[site] = build_component(
            StrongswanPpkSink, table, name="ppk", agent=site, state_dir=tmp_path
        )
        await sinks[site].prepare()  # connection exists, its ppk_id matches, make-before-break
        assert sinks[site].make_before_break is True
    alice, bob = Link("site-ab", "alice", "bob", True), Link("site-ab", "bob", "alice", False)

    secret = Secret.random()
    await sinks["a"].install(alice, secret, KeyMeta(1, ("k1",), "ppk", 0.0))
    await sinks["b"].install(bob, secret, KeyMeta(1, ("k1",), "ppk", 0.0))
    # (start_action = trap does not fire under kernel-libipsec: bring the tunnel up by hand)
    assert await trio.to_thread.run_sync(bed.a.initiate, "site-b")
    assert bed.a.ping().returncode == 0
    (first,) = established(bed.b, "site-a")
    assert first["ppk"] == "yes"

    secret = Secret.random()
    await sinks["a"].install(alice, secret, KeyMeta(2, ("k2",), "ppk", 0.0))
    await sinks["b"].install(bob, secret, KeyMeta(2, ("k2",), "ppk", 0.0))  # reauthenticates
    wait_until(lambda: len(established(bed.b, "site-a")) == 1, 10, "old IKE SA not deleted")
    (second,) = established(bed.b, "site-a")
    assert second["uniqueid"] != first["uniqueid"] and second["ppk"] == "yes"
    assert bed.b.ping().returncode == 0
    for sink in sinks.values():
        await sink.aclose()
