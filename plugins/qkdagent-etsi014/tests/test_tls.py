"""Mutual TLS and caller identity: the SAE ID comes from the client certificate only."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest
from qkdagent_etsi014.identity import IdentityRule, fingerprint
from qkdagent_etsi014.sim import SimSettings, Simulator, open_simulator

from qkdagent.pki import write_test_pki

from .conftest import KMES, Clients, tls_context


async def test_no_client_certificate_is_refused_at_tls(sim: Simulator) -> None:
    async with httpx.AsyncClient(verify=tls_context(sim.pki, None), trust_env=False) as client:
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            await client.get(sim.urls["KME_A"] + "/api/v1/keys/bob/status")
    assert sum(app.stats.total() for app in sim.apps.values()) == 0


async def test_certificate_from_another_ca_is_refused_at_tls(
    sim: Simulator, tmp_path: Path
) -> None:
    rogue = write_test_pki(tmp_path / "rogue", ["alice"])  # same CN, other CA
    context = ssl.create_default_context(cafile=str(sim.pki / "ca.pem"))
    context.load_cert_chain(str(rogue["alice"].cert), str(rogue["alice"].key))
    async with httpx.AsyncClient(verify=context, trust_env=False) as client:
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            await client.get(sim.urls["KME_A"] + "/api/v1/keys/bob/enc_keys")
    assert sim.network.link("KME_A", "KME_B").available_bits() == 100_000 * 256


async def test_client_refuses_a_kme_from_another_ca(sim: Simulator, tmp_path: Path) -> None:
    rogue = write_test_pki(tmp_path / "rogue", ["alice"])
    context = tls_context(sim.pki, "alice", ca=rogue.ca_cert)
    async with httpx.AsyncClient(verify=context, trust_env=False) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(sim.urls["KME_A"] + "/api/v1/keys/bob/status")


async def test_identity_is_never_taken_from_headers_or_query(clients: Clients) -> None:
    response = await clients["mallory", "KME_A"].get(
        "/api/v1/keys/bob/status?master_SAE_ID=alice",
        headers={"X-SAE-ID": "alice", "X-SSL-Client-S-DN": "CN=alice"},
    )
    assert response.status_code in (400, 401)
    response = await clients["mallory", "KME_A"].get(
        "/api/v1/keys/bob/status", headers={"X-SAE-ID": "alice"}
    )
    assert response.status_code == 401


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
async def test_tls_below_1_2_is_refused(sim: Simulator) -> None:
    context = tls_context(sim.pki, "alice")
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.minimum_version = ssl.TLSVersion.TLSv1
    async with httpx.AsyncClient(verify=context, trust_env=False) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(sim.urls["KME_A"] + "/api/v1/keys/bob/status")


def _der(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


def test_identity_rules(pki: Path) -> None:
    der = _der(pki / "alice.pem")
    assert IdentityRule("cn").identify(der) == "alice"
    assert IdentityRule("san-dns").identify(der) == "alice"  # write_test_pki: first SAN = name
    assert IdentityRule("san-uri").identify(der) is None
    by_fp = IdentityRule("fingerprint", {fingerprint(der).upper(): "sae-7"})
    assert by_fp.identify(der) == "sae-7"
    assert by_fp.identify(_der(pki / "bob.pem")) is None
    assert IdentityRule("cn").identify(None) is None
    with pytest.raises(ValueError):
        IdentityRule("header")
    with pytest.raises(ValueError):
        IdentityRule("fingerprint", {"zz": "x"})


async def test_fingerprint_identity_over_tls(pki: Path) -> None:
    table = {
        fingerprint(_der(pki / "mallory.pem")): "alice",  # mallory's certificate acts as alice
        fingerprint(_der(pki / "bob.pem")): "bob",
    }
    settings = SimSettings(kmes=KMES, rate_bps=0.0, identity=IdentityRule("fingerprint", table))
    async with open_simulator(pki, settings) as sim:
        clients = Clients(sim)
        try:
            status = await clients["mallory", "KME_A"].get("/api/v1/keys/bob/status")
            assert status.json()["master_SAE_ID"] == "alice"
            refused = await clients["alice", "KME_A"].get("/api/v1/keys/bob/status")
            assert refused.status_code == 401  # alice's own cert is not in the table
        finally:
            await clients.aclose()
