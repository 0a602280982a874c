"""The `etsi014` source against the simulator in every KME variant, and against hostile KMEs."""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from qkdagent_etsi014.app import Quirks
from qkdagent_etsi014.sim import SimSettings, Simulator
from qkdagent_etsi014.source import Etsi014Source

from qkdagent import (
    ConfigError,
    KeyNotFound,
    Link,
    Misconfigured,
    Options,
    PluginContext,
    SourceError,
    SourceUnavailable,
)
from qkdagent.testing import assert_not_leaked, build_component

from .conftest import KMES
from .httpx_kme import HttpxKme

ALICE = Link("l", "alice", "bob", True)
BOB = Link("l", "bob", "alice", False)
FAST = {"retry_backoff": 0.01, "max_backoff": 0.05}


def quirky(**quirks: Any) -> SimSettings:
    return SimSettings(kmes=KMES, rate_bps=0.0, quirks=Quirks(**quirks))


async def roundtrip(alice: Etsi014Source, bob: Etsi014Source) -> None:
    key = await alice.new_key(ALICE)
    same = await bob.key_by_id(BOB, key.key_id)
    assert same.key_id == key.key_id and same.value == key.value and len(key.value) == 32


def stats(sim: Simulator, kme: str) -> dict[str, int]:
    return dict(sim.apps[kme].stats)


# -- prepare() ---------------------------------------------------------------------------------


async def test_prepare_reports_the_kme_limits(sources, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    source = await sources("alice", peer_sae_ids={"bob": "bob"})
    limits = source.limits["bob"]
    assert (limits.max_key_per_request, limits.max_key_size, limits.min_key_size) == (
        1024,
        8192,
        64,
    )
    assert (limits.source_kme_id, limits.target_kme_id, limits.master_sae_id) == (
        "KME_A",
        "KME_B",
        "alice",
    )
    assert "up to 1024 keys per request" in caplog.text


async def test_prepare_without_links_or_peers_only_probes(sim: Simulator, sources) -> None:
    source = await sources("alice")
    assert source.limits == {}
    assert stats(sim, "KME_A") == {"200": 1}  # the probe (status of itself): TLS, routing
    await roundtrip(source, await sources("bob"))


async def test_prepare_gets_status_for_the_peer_of_every_link(
    sim: Simulator, sources, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    to_carol = Link("l2", "alice", "carol-agent", True)
    links = (ALICE, to_carol, Link("l3", "alice", "bob", False))  # bob twice: asked once
    source = await sources("alice", links=links, peer_sae_ids={"carol-agent": "carol"})
    assert sorted(source.limits) == ["bob", "carol"]
    assert source.limits["carol"].target_kme_id == "KME_C"
    assert source.limits["bob"].max_key_per_request == 1024
    assert stats(sim, "KME_A") == {"200": 2}
    assert "link 'l', link 'l3'" in caplog.text and "up to 1024 keys per request" in caplog.text


@pytest.mark.parametrize(
    ("link", "options", "message"),
    [
        (Link("lz", "alice", "zed", True), {}, r"slave_SAE_ID is not known.*link 'lz'"),
        (ALICE, {"key_size": 16384}, r"peer SAE 'bob' of link 'l': key_size 16384 is outside"),
        (ALICE, {"sae_id": "eve"}, "identifies this certificate as SAE 'alice'"),
    ],
)
async def test_prepare_refuses_a_link_the_kme_cannot_serve(
    sources, link: Link, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(Misconfigured, match=message):
        await sources("alice", links=(link,), **options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kme_id": "KME_Z"}, "TLS certificate does not confirm kme_id 'KME_Z'"),
        ({"sae_id": "eve"}, "identifies this certificate as SAE 'alice'"),
        ({"key_size": 16384}, "outside the KME's range"),
        ({"cert": "/nonexistent.pem"}, "does not exist"),
        ({"peer_sae_ids": {"bob": "nobody"}}, "slave_SAE_ID is not known"),
    ],
)
async def test_prepare_misconfigured(sources, options: dict[str, Any], message: str) -> None:
    options.setdefault("peer_sae_ids", {"bob": "bob"})
    with pytest.raises(Misconfigured, match=message):
        await sources("alice", **options)


async def test_prepare_with_certificate_of_unattached_sae(sim: Simulator, sources) -> None:
    cert, key = sim.pki / "mallory.pem", sim.pki / "mallory.key"
    with pytest.raises(Misconfigured, match="401"):
        await sources("alice", cert=str(cert), key=str(key), peer_sae_ids={"bob": "bob"})


async def test_kme_down_is_unavailable(sources) -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens on this port now
    url = f"https://127.0.0.1:{port}"
    with pytest.raises(SourceUnavailable, match="cannot connect"):
        await sources("alice", kme_url=url, peer_sae_ids={"bob": "bob"})
    source = await sources("alice", kme_url=url, prepare=False, retries=2, **FAST)
    with pytest.raises(SourceUnavailable, match="cannot connect"):
        await source.new_key(ALICE)


# -- KME variants ------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [quirky(only_method="POST")])
async def test_kme_offering_only_post(sim: Simulator, sources, caplog) -> None:
    alice, bob = await sources("alice"), await sources("bob")
    await roundtrip(alice, bob)
    await roundtrip(alice, bob)
    assert stats(sim, "KME_A") == {"405": 1, "200": 3, "keys": 2}  # probe + 2 keys; one 405
    assert stats(sim, "KME_B").get("405", 0) == 0
    assert alice.enc_method == "post"
    assert "using POST from now on" in caplog.text


@pytest.mark.parametrize("settings", [quirky(only_method="GET")])
async def test_kme_offering_only_get(sim: Simulator, sources) -> None:
    alice, bob = await sources("alice"), await sources("bob")
    for _ in range(3):
        await roundtrip(alice, bob)
    assert stats(sim, "KME_B")["405"] == 1
    assert bob.dec_method == "get"


@pytest.mark.parametrize("settings", [quirky(only_method="GET", method_refusal_status=404)])
async def test_get_only_kme_answering_404_to_post_gets_get_after_one_try(
    sim: Simulator, sources, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    alice, bob = await sources("alice"), await sources("bob")
    for _ in range(3):
        await roundtrip(alice, bob)
    assert stats(sim, "KME_B")["404"] == 1  # POST dec_keys once, then GET for good
    assert (bob.dec_method, alice.enc_method) == ("get", "auto")
    warnings = [r.getMessage() for r in caplog.records if "from now on" in r.getMessage()]
    assert len(warnings) == 1 and "answers 404 to POST for dec_keys; using GET" in warnings[0]


@pytest.mark.parametrize("settings", [quirky(only_method="POST", method_refusal_status=404)])
async def test_post_only_kme_answering_404_to_get_gets_post_after_one_try(
    sim: Simulator, sources
) -> None:
    alice, bob = await sources("alice"), await sources("bob")
    for _ in range(3):
        await roundtrip(alice, bob)
    assert stats(sim, "KME_A")["404"] == 1
    assert stats(sim, "KME_A")["keys"] == 3  # the refused GET consumed nothing
    assert alice.enc_method == "post"


@pytest.mark.parametrize("method", ["get", "post"])
async def test_forced_methods(sim: Simulator, sources, method: str) -> None:
    alice = await sources("alice", enc_method=method)
    bob = await sources("bob", dec_method=method)
    await roundtrip(alice, bob)
    assert "405" not in stats(sim, "KME_A") and "405" not in stats(sim, "KME_B")


@pytest.mark.parametrize("settings", [quirky(not_found_status=404)])
async def test_kme_answering_404_for_unknown_keys(sim: Simulator, sources) -> None:
    bob = await sources("bob", not_found_retries=1, **FAST)
    with pytest.raises(KeyNotFound, match="holds no key"):
        await bob.key_by_id(BOB, str(uuid.uuid4()))
    assert stats(sim, "KME_B")["404"] == 2  # one retry
    await roundtrip(await sources("alice"), bob)


@pytest.mark.parametrize(
    "settings",
    [
        quirky(container_name="Keys"),
        quirky(key_id_name="key_id", single_object=True),
        quirky(container_name="KEYS", key_id_name="keyId"),
    ],
    ids=["Keys", "key_id-object", "KEYS-keyId"],
)
async def test_kme_with_nonstandard_containers(sources, caplog, settings: SimSettings) -> None:
    caplog.set_level(logging.WARNING)
    alice, bob = await sources("alice"), await sources("bob")
    for _ in range(3):
        await roundtrip(alice, bob)
    warnings = [r for r in caplog.records if "non-standard key container" in r.getMessage()]
    if settings.quirks.container_name == "Keys" and not settings.quirks.single_object:
        assert warnings == []  # Table 11 spelling: standard
    else:
        # warned once per source and variant, not once per key
        assert 1 <= len(warnings) <= 4
        assert len({(r.getMessage()) for r in warnings}) == len(warnings)


async def test_a_kme_sending_ever_new_variants_is_reported_a_bounded_number_of_times(
    sources, caplog: pytest.LogCaptureFixture
) -> None:
    """Review finding: every new spelling was remembered and logged, without bound."""
    from qkdagent_etsi014.source import MAX_WARNED

    caplog.set_level(logging.WARNING)
    alice = await sources("alice")
    for i in range(5 * MAX_WARNED):
        alice._warn_variant(f"'kEy{i}' for 'key'")
        alice._warn_variant(f"'kEy{i}' for 'key'")  # a repeat is not reported again
    reports = [r.getMessage() for r in caplog.records if "non-standard" in r.getMessage()]
    assert len(reports) == MAX_WARNED + 1 and "no more are reported" in reports[-1]
    assert len(alice._warned) == MAX_WARNED + 1


@pytest.mark.parametrize("settings", [SimSettings(kmes=KMES, rate_bps=0.0, sync_delay=1.0)])
async def test_dec_keys_not_found_right_after_enc_keys_is_retried(sim: Simulator, sources) -> None:
    alice, bob = await sources("alice"), await sources("bob", retry_backoff=0.05)
    await roundtrip(alice, bob)
    assert stats(sim, "KME_B")["400"] >= 2


async def test_empty_store_is_unavailable_after_bounded_retries(sim: Simulator, sources) -> None:
    sim.network.link("KME_A", "KME_B").drain()
    alice = await sources("alice", retries=2, **FAST)
    with pytest.raises(SourceUnavailable, match="503: key data access error"):
        await alice.new_key(ALICE)
    assert stats(sim, "KME_A")["503"] == 3


async def test_unnamed_sae_gets_a_clear_401_error(sim: Simulator, sources) -> None:
    alice, dave = await sources("alice"), await sources("dave")
    key = await alice.new_key(ALICE)
    with pytest.raises(SourceError, match="401 unauthorized") as info:
        await dave.key_by_id(Link("l", "dave", "alice", False), key.key_id)
    assert not isinstance(info.value, KeyNotFound)


@pytest.mark.parametrize("settings", [quirky(delay=0.3)])
async def test_slow_kme_times_out(sources) -> None:
    alice = await sources("alice", prepare=False, request_timeout=0.1, connect_timeout=0.1)
    with pytest.raises(SourceUnavailable, match="no answer within the timeout"):
        await alice.new_key(ALICE)


async def test_keys_travel_over_one_kept_alive_connection_per_kme(sim: Simulator, sources) -> None:
    alice = await sources("alice", links=(ALICE,))
    bob = await sources("bob", links=(BOB,))
    for _ in range(5):
        await roundtrip(alice, bob)
    assert stats(sim, "KME_A")["keys"] == 5 and stats(sim, "KME_B")["keys"] == 5
    assert (sim.servers["KME_A"].accepted, sim.servers["KME_B"].accepted) == (1, 1)
    await sources("eve")  # another client: the counter does count connections
    assert sim.servers["KME_A"].accepted == 2


class CountingSupply:
    """A stand-in for a BB84 engine: hands out 0x00, 0x01, ... and records what was taken."""

    def __init__(self, kmes: tuple[str, str]) -> None:
        self.kmes = kmes
        self.taken: list[int] = []
        self.stored = 10 * 256

    def available_bits(self) -> int:
        return self.stored

    def take(self, bits: int) -> bytes:
        self.stored -= bits
        self.taken.append(bits)
        return bytes(i % 256 for i in range(bits // 8))


SUPPLIES: dict[tuple[str, str], CountingSupply] = {}


def counting_supply(a: str, b: str) -> CountingSupply:
    return SUPPLIES.setdefault((a, b), CountingSupply((a, b)))


@pytest.mark.parametrize(
    "settings", [SimSettings(kmes=KMES, rate_bps=0.0, supply_factory=counting_supply)]
)
async def test_simulator_uses_a_custom_key_supply(sim: Simulator, sources) -> None:
    SUPPLIES.clear()
    alice = await sources("alice", links=(ALICE,))
    assert alice.limits["bob"].stored_key_count == 10
    key = await alice.new_key(ALICE)
    assert key.value.reveal() == bytes(range(32))
    assert SUPPLIES[("KME_A", "KME_B")].taken == [256]
    same = await (await sources("bob")).key_by_id(BOB, key.key_id)
    assert same.value == key.value
    assert alice.limits["bob"].stored_key_count == 10  # the report of prepare() ...
    assert (await alice.status("bob")).stored_key_count == 9  # ... and the supply's level now


# -- cancellation never loses a received key ---------------------------------------------------


async def cancel_in_flight(sim: Simulator, kme: str, call: Any) -> trio.CancelScope:
    """Run `call` and cancel it once the KME has received its request (while the KME's
    `delay` quirk holds the answer back), so the cancel never lands before the send."""
    app = sim.apps[kme]
    received = app.received
    scope = trio.CancelScope()

    async def run() -> None:
        with scope:
            await call

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        with trio.fail_after(10):
            while app.received == received:  # noqa: ASYNC110 - polls the simulator
                await trio.sleep(0.005)
        scope.cancel()
    return scope


@pytest.mark.parametrize("settings", [quirky(delay=0.2)])
async def test_cancelled_new_key_keeps_the_key_for_the_next_call(sim: Simulator, sources) -> None:
    alice, bob = await sources("alice"), await sources("bob")
    before = sim.apps["KME_A"].stats["keys"]
    scope = await cancel_in_flight(sim, "KME_A", alice.new_key(ALICE))
    assert scope.cancelled_caught
    # the caller left at once, without waiting for the answer the KME still holds back ...
    assert sim.apps["KME_A"].stats["keys"] == before
    key = await alice.new_key(ALICE)
    # ... and the next call got the key of that request: the KME handed out only one
    assert sim.apps["KME_A"].stats["keys"] == before + 1
    assert (await bob.key_by_id(BOB, key.key_id)).value == key.value


@pytest.mark.parametrize("settings", [quirky(delay=0.2)])
async def test_key_arriving_after_its_caller_left_is_spare(sim: Simulator, sources) -> None:
    alice = await sources("alice")
    before = sim.apps["KME_A"].stats["keys"]
    await cancel_in_flight(sim, "KME_A", alice.new_key(ALICE))
    with trio.fail_after(10):
        while sim.apps["KME_A"].stats["keys"] == before:  # noqa: ASYNC110 - polls the simulator
            await trio.sleep(0.01)
        while alice._fetches:  # noqa: ASYNC110 - the answer is being read and parked
            await trio.sleep(0.01)
    await alice.new_key(ALICE)
    assert sim.apps["KME_A"].stats["keys"] == before + 1  # the parked key, no new request


@pytest.mark.parametrize("settings", [quirky(delay=0.2)])
async def test_a_fetch_nobody_waits_for_starts_no_retry(sim: Simulator, sources) -> None:
    sim.network.link("KME_A", "KME_B").drain()  # every Get key is a 503, normally retried
    alice = await sources("alice", retries=5, **FAST)
    before = sim.apps["KME_A"].received
    await cancel_in_flight(sim, "KME_A", alice.new_key(ALICE))
    with trio.fail_after(10):
        while alice._fetches:  # noqa: ASYNC110 - the 503 on the wire is read, then it stops
            await trio.sleep(0.01)
    assert sim.apps["KME_A"].received == before + 1  # the one Get key, no retry of its 503


@pytest.mark.parametrize("settings", [quirky(delay=0.2)])
async def test_cancelled_key_by_id_can_be_repeated(sim: Simulator, sources) -> None:
    alice, bob = await sources("alice"), await sources("bob", not_found_retries=0)
    key = await alice.new_key(ALICE)
    scope = await cancel_in_flight(sim, "KME_B", bob.key_by_id(BOB, key.key_id))
    assert scope.cancelled_caught
    assert (await bob.key_by_id(BOB, key.key_id)).value == key.value
    assert sim.network.parked_count("KME_B") == 0  # gone from the KME: fetched once
    with pytest.raises(KeyNotFound):  # single use: the held copy is handed out once
        await bob.key_by_id(BOB, key.key_id)


@pytest.mark.parametrize("settings", [quirky(delay=0.2)])
async def test_closing_cancels_a_fetch_in_flight_and_keeps_no_key(sim: Simulator, sources) -> None:
    alice = await sources("alice")
    await cancel_in_flight(sim, "KME_A", alice.new_key(ALICE))
    assert len(alice._fetches) == 1
    await alice.aclose()
    assert len(alice._fetches) == 0 and not any(alice._spare.values())
    with pytest.raises(SourceUnavailable, match="closed"):
        await alice.new_key(ALICE)


# -- hostile KME answers (unit level, mock transport) ------------------------------------------

KEY = bytes(range(32))
KID = str(uuid.uuid4())


def good(key_id: str = KID, key: bytes = KEY) -> dict[str, Any]:
    return {"keys": [{"key_ID": key_id, "key": base64.b64encode(key).decode()}]}


def mock_source(
    tmp_path: Path,
    answer: httpx.Response | Callable[[httpx.Request], httpx.Response],
    **options: Any,
) -> Etsi014Source:
    table = {
        "kme_url": "https://kme.example:8443",
        "cert": "c.pem",
        "key": "k.pem",
        "ca": "ca.pem",
        "retries": 0,
        "not_found_retries": 0,
        **options,
    }
    source = build_component(Etsi014Source, table, name="qkd", agent="alice", state_dir=tmp_path)
    handler = answer if callable(answer) else lambda request: answer

    def streamed(request: httpx.Request) -> httpx.Response:
        # a fresh, unread stream per request, as a real transport gives (the source reads raw)
        given = handler(request)
        return httpx.Response(
            given.status_code, headers=given.headers, stream=httpx.ByteStream(given.content)
        )

    source._client = HttpxKme(httpx.AsyncClient(transport=httpx.MockTransport(streamed)))
    return source


def response(status: int, body: Any = None, raw: bytes | None = None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.Response(status, content=content)


HOSTILE = [
    (response(200, {"keys": []}), "holds 0 keys, 1 were requested"),
    (response(200, {"keys": [good()["keys"][0]] * 2}), "holds 2 keys"),
    (response(200, {"nokeys": 1}), "no 'keys' array"),
    (response(200, {**good(), "Keys": []}), "both 'keys' and 'Keys'"),
    (response(200, good(key=KEY[:16])), "holds 128 bits, 256 were requested"),
    (response(200, good(key=KEY + b"x")), "holds 264 bits"),
    (response(200, good(key_id="not-a-uuid")), "is not a UUID"),
    (response(200, good(key_id="x" * 300)), "longer than 256 bytes"),
    (response(200, {"keys": [{"key_ID": KID, "key": "@@@@"}]}), "not strict standard base64"),
    (
        response(200, {"keys": [{"key_ID": KID, "key": base64.b64encode(KEY).decode()[:-1]}]}),
        "base64",
    ),
    (response(200, {"keys": [{"key_ID": KID, "key": 5}]}), "key is not a string"),
    (response(200, {"keys": [{"key": base64.b64encode(KEY).decode()}]}), "key_ID is not a string"),
    (response(200, raw=b"<html>proxy error</html>"), "body is not JSON"),
    (response(200, raw=b'{"keys": [], "keys": []}'), "appears twice"),
    (response(401, raw=b""), "401 unauthorized"),
    (response(400, {"message": "size shall be a multiple of 8"}), "size shall be a multiple of 8"),
    (response(400, raw=b"\x00garbage"), "KME answered 400"),
    (response(500, {"message": "boom\x1b[31m"}), "KME answered 500: boom?[31m"),
    (response(302, raw=b""), "KME answered 302"),
    (response(200, raw=b" " * (5 * 1024 * 1024)), "larger than"),
]


@pytest.mark.parametrize(("answer", "message"), HOSTILE)
async def test_hostile_enc_keys_answer_is_a_clear_error(
    tmp_path: Path, answer: httpx.Response, message: str
) -> None:
    source = mock_source(tmp_path, answer)
    try:
        with pytest.raises(SourceError) as info:
            await source.new_key(ALICE)
    finally:
        await source.aclose()
    text = str(info.value)
    assert message in text
    assert "https://kme.example:8443" in text
    assert base64.b64encode(KEY).decode() not in text and KEY.hex() not in text


def by_method(**answers: httpx.Response) -> Callable[[httpx.Request], httpx.Response]:
    """A mock KME answering per HTTP method, counting the requests in `.seen`."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        return answers[request.method]

    handler.seen = seen  # type: ignore[attr-defined]
    return handler


NOT_FOUND_TEXT = response(404, raw=b"Not Found")


async def test_bare_404_to_both_methods_is_a_clear_error_not_a_switch(tmp_path: Path) -> None:
    kme = by_method(GET=NOT_FOUND_TEXT, POST=NOT_FOUND_TEXT)
    source = mock_source(tmp_path, kme)
    with pytest.raises(SourceError, match="KME answered 404"):
        await source.new_key(ALICE)
    assert kme.seen == ["GET", "POST"]  # one try of the other method, nothing remembered
    assert source.enc_method == "auto"
    await source.aclose()


async def test_bare_404_for_an_unknown_key_on_a_post_only_kme_is_key_not_found(
    tmp_path: Path,
) -> None:
    kme = by_method(POST=NOT_FOUND_TEXT, GET=response(405, {"message": "use POST"}))
    source = mock_source(tmp_path, kme)
    with pytest.raises(KeyNotFound, match="holds no key"):
        await source.key_by_id(BOB, KID)
    assert kme.seen == ["POST", "GET", "POST"]  # GET refused: the 404 was about the key
    assert source.dec_method == "auto"
    await source.aclose()


async def test_bare_404_then_success_with_the_other_method_is_remembered(tmp_path: Path) -> None:
    kme = by_method(POST=NOT_FOUND_TEXT, GET=response(200, good()))
    source = mock_source(tmp_path, kme)
    assert (await source.key_by_id(BOB, KID)).key_id == KID
    assert source.dec_method == "get"
    await source.aclose()


async def test_dec_keys_answer_with_another_key_id_is_refused(tmp_path: Path) -> None:
    source = mock_source(tmp_path, response(200, good()))
    with pytest.raises(SourceError, match="other key_IDs than the ones requested"):
        await source.key_by_id(BOB, str(uuid.uuid4()))
    await source.aclose()


async def test_non_uuid_key_ids_accepted_when_not_strict(tmp_path: Path) -> None:
    source = mock_source(tmp_path, response(200, good(key_id="kme-7:00042")), strict_key_ids=False)
    key = await source.new_key(ALICE)
    assert key.key_id == "kme-7:00042" and key.value.reveal() == KEY
    assert_not_leaked(repr(key) + repr(source), [key.value])
    await source.aclose()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kme_url": "http://kme:80"}, "must be an https:// URL"),
        ({"key_size": 250}, "multiple of 8"),
        ({"dec_method": "put"}, "must be one of"),
        ({"peer_sae_ids": {"bob": 5}}, "non-empty SAE ID"),
        ({"colour": "blue"}, "is not a known option"),
    ],
)
def test_config_errors_name_the_option(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    table = {"kme_url": "https://kme:443", "cert": "c", "key": "k", "ca": "ca", **options}
    opts = Options(table, where="sources.qkd", file="agent.toml")
    with pytest.raises(ConfigError, match=message) as info:
        Etsi014Source("qkd", opts, PluginContext("alice", tmp_path))
        opts.finish()
    assert "agent.toml: sources.qkd." in str(info.value)


async def test_concurrent_calls_never_share_or_lose_a_key(sim: Simulator, sources) -> None:
    alice, bob = await sources("alice"), await sources("bob", not_found_retries=0)
    got: list = []
    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(lambda: _append(got, alice.new_key(ALICE)))
    assert len({k.key_id for k in got}) == 8
    assert sim.apps["KME_A"].stats["keys"] == 8  # no key fetched and then dropped
    results: list = []

    async def fetch() -> None:
        try:
            results.append(await bob.key_by_id(BOB, got[0].key_id))
        except KeyNotFound:
            results.append(None)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fetch)
        nursery.start_soon(fetch)
    assert sorted(r is None for r in results) == [False, True]  # handed out exactly once


async def _append(into: list, call: Any) -> None:
    into.append(await call)
