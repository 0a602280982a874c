"""Mutual TLS and caller identity: the SAE ID comes from the client certificate only."""

from __future__ import annotations

import base64
import shutil
import ssl
from pathlib import Path

import httpx
import pytest
from qkdagent_etsi014.identity import IdentityRule, fingerprint, mismatch
from qkdagent_etsi014.sim import SimSettings, Simulator, make_pki, open_simulator
from qkdagent_etsi014.source import Etsi014Source

from qkdagent import ConfigError, Link, Misconfigured, SourceError
from qkdagent.testing import build_component, encrypted_key_copy, write_test_pki

from .conftest import KMES, Clients, make_source, tls_context


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


# -- the SAE confirms its KME's ID from the KME's certificate (REFERENCE §1.1) ------------------


@pytest.fixture(scope="module")
def impostor_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """kme-sim --make-pki certificates where KME_A serves with the certificate of KME_IMPOSTOR
    (same CA, valid for the host): only its CN tells that it is not KME_A."""
    directory = make_pki(tmp_path_factory.mktemp("impostor"), {**KMES, "KME_IMPOSTOR": []})
    for ext in ("pem", "key"):
        shutil.copyfile(directory / f"KME_IMPOSTOR.{ext}", directory / f"KME_A.{ext}")
    return directory


def _source(sim: Simulator, tmp_path: Path, **options: object) -> Etsi014Source:
    return make_source(sim, "alice", tmp_path, peer_sae_ids={"bob": "bob"}, **options)


async def test_kme_certificate_not_naming_kme_id_fails_prepare_and_keys(
    impostor_pki: Path, tmp_path: Path
) -> None:
    async with open_simulator(impostor_pki, SimSettings(kmes=KMES, rate_bps=0.0)) as sim:
        source = _source(sim, tmp_path)  # kme_id = "KME_A", which the JSON Status also says
        try:
            with pytest.raises(Misconfigured) as info:
                await source.prepare()
            assert (
                "TLS certificate does not confirm kme_id 'KME_A' (cn rule): its subject CN is "
                "'KME_IMPOSTOR'; answer discarded" in str(info.value)
            )
            with pytest.raises(SourceError, match="does not confirm kme_id 'KME_A'") as refused:
                await source.new_key(Link("l", "alice", "bob", True))
        finally:
            await source.aclose()
        assert sim.apps["KME_A"].stats["keys"] == 1  # the KME did hand out a key: refused
        (parked,) = sim.network.kmes["KME_B"].parked.values()
        value = parked[1]  # the key bytes, held for bob: never in the message
        assert value.hex() not in str(refused.value)
        assert base64.b64encode(value).decode() not in str(refused.value)


async def test_kme_certificate_and_status_must_both_name_kme_id(
    impostor_pki: Path, tmp_path: Path
) -> None:
    async with open_simulator(impostor_pki, SimSettings(kmes=KMES, rate_bps=0.0)) as sim:
        source = _source(sim, tmp_path, kme_id="KME_IMPOSTOR")  # the certificate agrees ...
        try:
            with pytest.raises(Misconfigured, match="the KME says it is KME 'KME_A'"):
                await source.prepare()  # ... the Status does not
        finally:
            await source.aclose()


@pytest.mark.parametrize(
    ("mode", "entry", "error"),
    [
        ("cn", None, None),
        ("san-dns", None, None),  # write_test_pki: the first DNS SAN is the name
        ("san-uri", None, "it has no usable first URI SAN"),
        ("fingerprint", ("KME_A", "KME_A"), None),
        ("fingerprint", ("KME_A", "KME_B"), "its fingerprint maps to 'KME_B'"),
        ("fingerprint", ("bob", "KME_A"), "not in the fingerprint table"),
    ],
)
async def test_kme_identity_rules(
    sim: Simulator,
    tmp_path: Path,
    mode: str,
    entry: tuple[str, str] | None,
    error: str | None,
) -> None:
    """`entry`: (whose certificate's fingerprint is listed, the KME ID it maps to)."""
    options: dict[str, object] = {"kme_identity": mode}
    if entry is not None:
        options["kme_fingerprints"] = {fingerprint(_der(sim.pki / f"{entry[0]}.pem")): entry[1]}
    source = _source(sim, tmp_path, **options)
    try:
        if error is None:
            await source.prepare()
            key = await source.new_key(Link("l", "alice", "bob", True))
            assert len(key.value) == 32
        else:
            with pytest.raises(Misconfigured, match=error):
                await source.prepare()
    finally:
        await source.aclose()


def test_kme_identity_config_errors(pki: Path, tmp_path: Path) -> None:
    base = {"kme_url": "https://kme:443", "cert": "c", "key": "k", "ca": "ca"}
    for options, message in [
        ({"kme_identity": "fingerprint"}, "kme_fingerprints: .*needs a fingerprint table"),
        ({"kme_identity": "fingerprint", "kme_fingerprints": {"ab": "K"}}, "not a SHA-256"),
        ({"kme_identity": "header"}, "kme_identity: must be one of"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build_component(Etsi014Source, {**base, **options}, state_dir=tmp_path)


def test_mismatch_explains_itself(pki: Path) -> None:
    der = _der(pki / "KME_A.pem")
    assert mismatch(IdentityRule(), der, "KME_A") is None
    assert mismatch(IdentityRule(), der, "KME_B") == "its subject CN is 'KME_A'"
    assert mismatch(IdentityRule(), None, "KME_A") == "no certificate is available"
    assert mismatch(IdentityRule(), b"junk", "KME_A") == "it has no usable subject CN"


async def test_encrypted_client_key_is_refused_without_a_prompt(
    sim: Simulator, pki: Path, tmp_path: Path
) -> None:
    """A passphrase-protected key fails prepare() with a clear Misconfigured: OpenSSL must not
    ask for the passphrase on the terminal (a hung agent)."""
    encrypted = encrypted_key_copy(pki / "alice.key", tmp_path / "alice-encrypted.key")
    source = _source(sim, tmp_path, key=str(encrypted))
    try:
        with pytest.raises(Misconfigured, match="is encrypted"):
            await source.prepare()
    finally:
        await source.aclose()
