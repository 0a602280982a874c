"""The simulator against ETSI GS QKD 014 V1.1.1, one test per row of the spec's tables.

Every request goes over real HTTPS with mutual TLS; the caller is whoever owns the client
certificate. Topology (conftest): KME_A {alice, eve}, KME_B {bob, dave}, KME_C {carol}.
"""

from __future__ import annotations

import base64
import uuid

import pytest
from qkdagent_etsi014.wire import (
    MSG_EXT_MANDATORY_UNSUPPORTED,
    MSG_KEY_ACCESS_ERROR,
    MSG_KEYS_NOT_FOUND,
    MSG_SIZE_MULTIPLE_OF_8,
    UUID_RE,
)

from .conftest import Clients

STATUS = "/api/v1/keys/{}/status"
ENC = "/api/v1/keys/{}/enc_keys"
DEC = "/api/v1/keys/{}/dec_keys"


def keys_of(response) -> list[tuple[str, bytes]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    return [(k["key_ID"], base64.b64decode(k["key"])) for k in response.json()["keys"]]


def stored(clients: Clients, a: str = "KME_A", b: str = "KME_B") -> int:
    return clients.sim.network.link(a, b).available_bits()


# -- Get status (Table 4 / Status, Table 12) ----------------------------------------------


async def test_status_has_every_field(clients: Clients) -> None:
    response = await clients.home("alice").get(STATUS.format("bob"))
    assert response.status_code == 200
    status = response.json()
    assert status == {
        "source_KME_ID": "KME_A",
        "target_KME_ID": "KME_B",
        "master_SAE_ID": "alice",
        "slave_SAE_ID": "bob",
        "key_size": 256,
        "stored_key_count": 100_000,
        "max_key_count": 100_000,
        "max_key_per_request": 1024,
        "max_key_size": 8192,
        "min_key_size": 64,
        "max_SAE_ID_count": 4,
    }


async def test_status_stored_key_count_follows_deliveries(clients: Clients) -> None:
    alice = clients.home("alice")
    await alice.get(ENC.format("bob"), params={"number": 10})
    status = (await alice.get(STATUS.format("bob"))).json()
    assert status["stored_key_count"] == 100_000 - 10


async def test_status_of_unknown_slave_is_400_error_object(clients: Clients) -> None:
    response = await clients.home("alice").get(STATUS.format("nobody"))
    assert response.status_code == 400
    assert "slave_SAE_ID" in response.json()["message"]


async def test_status_path_id_is_url_decoded(clients: Clients) -> None:
    response = await clients.home("alice").get("/api/v1/keys/%62ob/status")
    assert response.json()["slave_SAE_ID"] == "bob"


# -- Get key (Table 5/6, Key request Table 13, Key container Table 11) --------------------


async def test_enc_get_without_parameters_gives_one_default_key(clients: Clients) -> None:
    keys = keys_of(await clients.home("alice").get(ENC.format("bob")))
    assert len(keys) == 1
    assert UUID_RE.match(keys[0][0]) and len(keys[0][1]) == 32


async def test_enc_get_number_and_size(clients: Clients) -> None:
    response = await clients.home("alice").get(
        ENC.format("bob"), params={"number": 3, "size": 1024}
    )
    keys = keys_of(response)
    assert [len(v) for _, v in keys] == [128, 128, 128]
    assert len({k for k, _ in keys}) == 3
    assert len({v for _, v in keys}) == 3


async def test_enc_post_empty_object(clients: Clients) -> None:
    keys = keys_of(await clients.home("alice").post(ENC.format("bob"), json={}))
    assert len(keys) == 1 and len(keys[0][1]) == 32


async def test_enc_post_number_and_size(clients: Clients) -> None:
    response = await clients.home("alice").post(ENC.format("bob"), json={"number": 2, "size": 64})
    assert [len(v) for _, v in keys_of(response)] == [8, 8]


async def test_enc_post_extension_optional_is_ignored(clients: Clients) -> None:
    body = {"number": 1, "extension_optional": [{"abc_route_type": "direct"}]}
    assert len(keys_of(await clients.home("alice").post(ENC.format("bob"), json=body))) == 1


async def test_enc_post_extension_mandatory_is_refused(clients: Clients) -> None:
    before = stored(clients)
    body = {"extension_mandatory": [{"abc_route_type": "direct"}, {"abc_transfer": "x"}]}
    response = await clients.home("alice").post(ENC.format("bob"), json=body)
    assert response.status_code == 400
    assert response.json() == {
        "message": MSG_EXT_MANDATORY_UNSUPPORTED,
        "details": [
            {"extension_mandatory_unsupported": "abc_route_type"},
            {"extension_mandatory_unsupported": "abc_transfer"},
        ],
    }
    assert stored(clients) == before


async def test_size_not_multiple_of_8(clients: Clients) -> None:
    before = stored(clients)
    for response in (
        await clients.home("alice").get(ENC.format("bob"), params={"size": 100}),
        await clients.home("alice").post(ENC.format("bob"), json={"size": 100}),
    ):
        assert response.status_code == 400
        assert response.json() == {"message": MSG_SIZE_MULTIPLE_OF_8}
    assert stored(clients) == before


async def test_number_above_max_key_per_request(clients: Clients) -> None:
    before = stored(clients)
    response = await clients.home("alice").post(ENC.format("bob"), json={"number": 1025})
    assert response.status_code == 400
    assert "max_key_per_request" in response.json()["message"]
    assert stored(clients) == before


@pytest.mark.parametrize("size", [56, 8200])
async def test_size_outside_min_max(clients: Clients, size: int) -> None:
    response = await clients.home("alice").get(ENC.format("bob"), params={"size": size})
    assert response.status_code == 400
    assert "between 64 and 8192" in response.json()["message"]


async def test_enc_get_refuses_post_only_parameters(clients: Clients) -> None:
    response = await clients.home("alice").get(
        ENC.format("bob"), params={"additional_slave_SAE_IDs": "carol"}
    )
    assert response.status_code == 400
    assert "additional_slave_SAE_IDs" in response.json()["message"]


async def test_largest_batch(clients: Clients) -> None:
    response = await clients.home("alice").get(ENC.format("bob"), params={"number": 1024})
    assert len(keys_of(response)) == 1024


# -- multicast (additional_slave_SAE_IDs, max_SAE_ID_count) --------------------------------


async def test_multicast_delivers_to_every_named_slave(clients: Clients) -> None:
    ab, ac = stored(clients), stored(clients, "KME_A", "KME_C")
    body = {"number": 2, "additional_slave_SAE_IDs": ["carol", "dave"]}
    keys = keys_of(await clients.home("alice").post(ENC.format("bob"), json=body))
    ids = {"key_IDs": [{"key_ID": k} for k, _ in keys]}
    for sae in ("bob", "dave", "carol"):
        assert keys_of(await clients.home(sae).post(DEC.format("alice"), json=ids)) == keys
    # relaying to KME_C consumes key on the A-C link as well (Annex B)
    assert ab - stored(clients) == 2 * 256
    assert ac - stored(clients, "KME_A", "KME_C") == 2 * 256
    # delivered to every named SAE: gone from every KME
    again = await clients.home("bob").post(DEC.format("alice"), json=ids)
    assert again.status_code == 400
    assert clients.sim.network.parked_count("KME_B") == 0
    assert clients.sim.network.parked_count("KME_C") == 0


async def test_multicast_key_stays_until_each_named_sae_at_that_kme_fetched(
    clients: Clients,
) -> None:
    body = {"additional_slave_SAE_IDs": ["dave"]}
    [(key_id, value)] = keys_of(await clients.home("alice").post(ENC.format("bob"), json=body))
    query = {"key_ID": key_id}
    assert keys_of(await clients.home("bob").get(DEC.format("alice"), params=query)) == [
        (key_id, value)
    ]
    second = await clients.home("bob").get(DEC.format("alice"), params=query)
    assert second.json() == {"message": MSG_KEYS_NOT_FOUND}
    assert keys_of(await clients.home("dave").get(DEC.format("alice"), params=query)) == [
        (key_id, value)
    ]


async def test_multicast_above_max_sae_id_count(clients: Clients) -> None:
    body = {"additional_slave_SAE_IDs": ["carol", "dave", "eve", "x", "y"]}
    response = await clients.home("alice").post(ENC.format("bob"), json=body)
    assert response.status_code == 400
    assert "max_SAE_ID_count is 4" in response.json()["message"]


async def test_multicast_to_unknown_or_duplicate_sae(clients: Clients) -> None:
    for extra in (["nobody"], ["bob"], ["alice"]):
        body = {"additional_slave_SAE_IDs": extra}
        response = await clients.home("alice").post(ENC.format("bob"), json=body)
        assert response.status_code == 400, extra


# -- Get key with key IDs (Table 7/8, Key IDs Table 14) ------------------------------------


async def test_dec_post_returns_the_same_keys_then_deletes_them(clients: Clients) -> None:
    keys = keys_of(await clients.home("alice").get(ENC.format("bob"), params={"number": 3}))
    ids = {"key_IDs": [{"key_ID": k} for k, _ in keys]}
    assert keys_of(await clients.home("bob").post(DEC.format("alice"), json=ids)) == keys
    again = await clients.home("bob").post(DEC.format("alice"), json=ids)
    assert again.status_code == 400
    assert again.json() == {"message": MSG_KEYS_NOT_FOUND}


async def test_dec_get_single_key_id(clients: Clients) -> None:
    [(key_id, value)] = keys_of(await clients.home("alice").get(ENC.format("bob")))
    response = await clients.home("bob").get(DEC.format("alice"), params={"key_ID": key_id})
    assert keys_of(response) == [(key_id, value)]
    again = await clients.home("bob").get(DEC.format("alice"), params={"key_ID": key_id})
    assert again.status_code == 400


async def test_dec_get_refuses_two_key_ids(clients: Clients) -> None:
    response = await clients.home("bob").get(
        DEC.format("alice") + f"?key_ID={uuid.uuid4()}&key_ID={uuid.uuid4()}"
    )
    assert response.status_code == 400
    assert "twice" in response.json()["message"]


async def test_dec_unknown_key_is_400_not_found(clients: Clients) -> None:
    response = await clients.home("bob").post(
        DEC.format("alice"), json={"key_IDs": [{"key_ID": str(uuid.uuid4())}]}
    )
    assert response.status_code == 400
    assert response.json() == {"message": MSG_KEYS_NOT_FOUND}


async def test_dec_partly_unknown_consumes_nothing(clients: Clients) -> None:
    [(key_id, value)] = keys_of(await clients.home("alice").get(ENC.format("bob")))
    mixed = {"key_IDs": [{"key_ID": key_id}, {"key_ID": str(uuid.uuid4())}]}
    assert (await clients.home("bob").post(DEC.format("alice"), json=mixed)).status_code == 400
    response = await clients.home("bob").get(DEC.format("alice"), params={"key_ID": key_id})
    assert keys_of(response) == [(key_id, value)]


async def test_dec_duplicate_key_ids(clients: Clients) -> None:
    [(key_id, _)] = keys_of(await clients.home("alice").get(ENC.format("bob")))
    body = {"key_IDs": [{"key_ID": key_id}, {"key_ID": key_id}]}
    response = await clients.home("bob").post(DEC.format("alice"), json=body)
    assert response.status_code == 400
    assert "twice" in response.json()["message"]
    assert clients.sim.network.parked_count("KME_B") == 1


async def test_dec_with_wrong_master_is_not_found(clients: Clients) -> None:
    [(key_id, _)] = keys_of(await clients.home("alice").get(ENC.format("bob")))
    response = await clients.home("bob").get(DEC.format("eve"), params={"key_ID": key_id})
    assert response.json() == {"message": MSG_KEYS_NOT_FOUND}


async def test_keys_are_removed_from_the_masters_kme_on_delivery(clients: Clients) -> None:
    [(key_id, _)] = keys_of(await clients.home("alice").get(ENC.format("bob")))
    assert clients.sim.network.parked_count("KME_A") == 0
    response = await clients.home("eve").get(DEC.format("alice"), params={"key_ID": key_id})
    assert response.status_code == 400


# -- 401 rules -----------------------------------------------------------------------------


async def test_dec_by_sae_not_named_in_get_key_is_401(clients: Clients) -> None:
    [(key_id, value)] = keys_of(await clients.home("alice").get(ENC.format("bob")))
    response = await clients.home("dave").get(DEC.format("alice"), params={"key_ID": key_id})
    assert response.status_code == 401
    # the refused request consumed nothing: bob still gets the key
    response = await clients.home("bob").get(DEC.format("alice"), params={"key_ID": key_id})
    assert keys_of(response) == [(key_id, value)]


async def test_sae_of_another_kme_is_401(clients: Clients) -> None:
    for path in (STATUS.format("bob"), ENC.format("bob"), DEC.format("bob") + "?key_ID=x"):
        assert (await clients["alice", "KME_B"].get(path)).status_code == 401


async def test_certificate_of_unattached_sae_is_401(clients: Clients) -> None:
    response = await clients["mallory", "KME_A"].get(ENC.format("bob"))
    assert response.status_code == 401
    assert stored(clients) == 100_000 * 256


# -- 503 and the key supply ------------------------------------------------------------------


async def test_503_when_the_store_is_empty_and_no_key_invented(clients: Clients) -> None:
    clients.sim.network.link("KME_A", "KME_B").drain()
    response = await clients.home("alice").get(ENC.format("bob"))
    assert response.status_code == 503
    assert response.json()["message"] == MSG_KEY_ACCESS_ERROR
    assert clients.sim.network.parked_count("KME_B") == 0
    status = (await clients.home("alice").get(STATUS.format("bob"))).json()
    assert status["stored_key_count"] == 0


async def test_request_beyond_stored_keys_is_503_not_partial(clients: Clients) -> None:
    clients.sim.network.link("KME_A", "KME_B").drain(keep_bits=3 * 256)  # three keys left
    response = await clients.home("alice").get(ENC.format("bob"), params={"number": 4})
    assert response.status_code == 503
    assert len(keys_of(await clients.home("alice").get(ENC.format("bob"), params={"number": 3})))


# -- HTTP level ------------------------------------------------------------------------------


async def test_unknown_path_and_method(clients: Clients) -> None:
    alice = clients.home("alice")
    assert (await alice.get("/api/v1/keys/bob/other")).status_code == 404
    assert (await alice.get("/api/v2/keys/bob/status")).status_code == 404
    response = await alice.delete(ENC.format("bob"))
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"
    assert "message" in response.json()
