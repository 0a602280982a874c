"""The `mlkem` source on its own: the exchange chain, its checks and its options."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from qkdagent_pqc import kem
from qkdagent_pqc.source import MlkemSource

from qkdagent import ConfigError, KeyNotFound, Link, Misconfigured, Secret, SourceError
from qkdagent.testing import SourceContract, assert_not_leaked, build_component

from .conftest import StaticKeys

ALICE = Link("l", "alice", "bob", True)
BOB = Link("l", "bob", "alice", False)


def _pair(keys: StaticKeys, tmp_path: Path, **extra: Any) -> tuple[MlkemSource, MlkemSource]:
    return (
        build_component(MlkemSource, keys.table("alice", **extra), links=(ALICE,), agent="alice"),
        build_component(MlkemSource, keys.table("bob", **extra), links=(BOB,), agent="bob"),
    )


@pytest.mark.parametrize("parameter_set", ["ML-KEM-768", "ML-KEM-1024"])
async def test_the_ephemeral_chain_gives_both_sides_each_secret(
    make_keys: Any, tmp_path: Path, parameter_set: str
) -> None:
    alice, bob = _pair(make_keys(parameter_set), tmp_path)
    params = kem.PARAMETER_SETS[parameter_set]
    sent: bytes | None = None  # alice's state: bob's latest public key
    kept: bytes | None = None  # bob's state: his latest private key seed
    seen = set()
    for _ in range(5):
        key = await alice.offer(ALICE, sent)
        answered = await bob.answer(BOB, key.key_id, kept)
        assert answered.key.value == key.value and answered.key.key_id == key.key_id
        assert len(answered.answer) == params.public_size and len(answered.state) == 64
        sent = await alice.accept_answer(ALICE, answered.answer, sent)
        kept = answered.state
        assert sent == answered.answer
        seen.add(key.value.reveal())
    assert len(seen) == 5
    assert len(key.key_id) <= MlkemSource.max_key_id <= 4096


async def test_the_first_exchange_uses_the_static_key_and_later_ones_do_not(
    static_keys: StaticKeys, tmp_path: Path
) -> None:
    alice, bob = _pair(static_keys, tmp_path)
    first = await alice.offer(ALICE, None)
    fp, _ = kem.parse_key_id(alice.params, first.key_id)
    assert kem.b64url(fp) == bob.static_fingerprint
    answered = await bob.answer(BOB, first.key_id, None)
    second = await alice.offer(ALICE, answered.answer)
    fp2, _ = kem.parse_key_id(alice.params, second.key_id)
    assert fp2 == kem.fingerprint(alice.params, answered.answer) != fp
    # the static key cannot open the ephemeral ciphertext, the ephemeral key can
    with pytest.raises(KeyNotFound):
        await bob.answer(BOB, second.key_id, None)
    assert (await bob.answer(BOB, second.key_id, answered.state)).key.value == second.value


async def test_a_wrong_static_public_key_is_named_with_the_link(
    static_keys: StaticKeys, make_keys: Any, tmp_path: Path
) -> None:
    other = make_keys(name="other")  # alice holds a public key that is not bob's
    table = static_keys.table("alice")
    table["peer_public_keys"] = {"bob": base64.b64encode(other.public["bob"]).decode()}
    alice = build_component(MlkemSource, table, links=(ALICE,), agent="alice")
    _, bob = _pair(static_keys, tmp_path)
    key = await alice.offer(ALICE, None)
    with pytest.raises(KeyNotFound) as error:
        await bob.answer(BOB, key.key_id, None)
    text = str(error.value)
    assert "link 'l'" in text and "wrong public key" in text and str(bob.static_fingerprint) in text


async def test_a_ciphertext_is_good_for_one_state_only(
    static_keys: StaticKeys, tmp_path: Path
) -> None:
    """Replaying a ciphertext after the state moved on finds no key (the core also refuses a
    used key ID; this is the source's own line)."""
    alice, bob = _pair(static_keys, tmp_path)
    answered = await bob.answer(BOB, (await alice.offer(ALICE, None)).key_id, None)
    key = await alice.offer(ALICE, answered.answer)
    following = await bob.answer(BOB, key.key_id, answered.state)
    with pytest.raises(KeyNotFound, match="not the ephemeral key"):
        await bob.answer(BOB, key.key_id, following.state)


async def test_a_tampered_ciphertext_gives_another_secret(
    static_keys: StaticKeys, tmp_path: Path
) -> None:
    """ML-KEM's implicit rejection: the rotation then fails key confirmation, and the core
    changes nothing (the agent test shows it)."""
    alice, bob = _pair(static_keys, tmp_path)
    key = await alice.offer(ALICE, None)
    fp, ct = kem.parse_key_id(alice.params, key.key_id)
    flipped = kem.key_id(fp, bytes([ct[0] ^ 1]) + ct[1:])
    assert (await bob.answer(BOB, flipped, None)).key.value != key.value


@pytest.mark.parametrize("answer", [b"", b"\x00" * 1183, b"\x00" * 1568])
async def test_an_answer_that_is_not_a_public_key_is_refused(
    static_keys: StaticKeys, tmp_path: Path, answer: bytes
) -> None:
    alice, _ = _pair(static_keys, tmp_path)
    with pytest.raises(SourceError, match="link 'l': the peer's answer is not an ML-KEM-768"):
        await alice.accept_answer(ALICE, answer, None)


async def test_an_unusable_stored_state_is_a_source_error(
    static_keys: StaticKeys, tmp_path: Path
) -> None:
    alice, bob = _pair(static_keys, tmp_path)
    key = await alice.offer(ALICE, None)
    with pytest.raises(SourceError, match="stored ephemeral key is unusable"):
        await bob.answer(BOB, key.key_id, b"short")


async def test_prepare_names_the_link_that_lacks_a_key(
    static_keys: StaticKeys, tmp_path: Path
) -> None:
    table = static_keys.table("alice")
    del table["peer_public_keys"]
    alice = build_component(MlkemSource, table, links=(ALICE,), agent="alice")
    with pytest.raises(Misconfigured, match="link 'l': no static public key for peer 'bob'"):
        await alice.prepare()
    table = static_keys.table("bob")
    del table["private_key"]
    bob = build_component(MlkemSource, table, links=(BOB,), agent="bob")
    with pytest.raises(Misconfigured, match="link 'l': this side answers and needs its static"):
        await bob.prepare()


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"parameter_set": "ML-KEM-512"}, "sources.x.parameter_set: must be one of"),
        ({"peer_public_keys": {"bob": "not base64!"}}, "peer_public_keys.bob: is not an ML-KEM"),
        ({"peer_public_keys": {"bob": "AAAA"}}, "is 1184 bytes, not 3"),
        ({"peer_public_keys": {"bob": 7}}, "peer_public_keys.bob: must be a string"),
        ({"private_key": "inline"}, "private_key: is not accepted inline"),
        ({"surprise": 1}, "surprise: is not a known option"),
    ],
)
def test_bad_options_name_the_key(
    static_keys: StaticKeys, change: dict[str, Any], problem: str
) -> None:
    table = {**static_keys.table("alice"), **change}
    with pytest.raises(ConfigError, match=problem):
        build_component(MlkemSource, table, links=(ALICE,))


def test_a_private_key_file_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(base64.b64encode(b"\0" * 32))
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="private_key: must hold 64 bytes"):
        build_component(MlkemSource, {"private_key": {"file": str(path)}})


async def test_no_key_bytes_in_errors_or_reprs(static_keys: StaticKeys, tmp_path: Path) -> None:
    alice, bob = _pair(static_keys, tmp_path)
    key = await alice.offer(ALICE, None)
    answered = await bob.answer(BOB, key.key_id, None)
    # (not repr(answered): the core's Answered dataclass shows its state; see the README)
    texts = [repr(alice), repr(bob), repr(key), repr(answered.key)]
    for bad in (b"short", answered.state[:63]):
        with pytest.raises(SourceError) as error:
            await bob.answer(BOB, key.key_id, bad)
        texts.append(str(error.value))
    seed = base64.b64decode(static_keys.files["bob"].read_bytes())
    assert_not_leaked("\n".join(texts), [key.value, Secret(seed), Secret(answered.state)])


class TestContract(SourceContract):
    source_class = MlkemSource

    @pytest.fixture
    def source_options(self, static_keys: StaticKeys) -> dict[str, Any]:
        return static_keys.table("alice")

    @pytest.fixture
    def responder_options(self, static_keys: StaticKeys) -> dict[str, Any]:
        return static_keys.table("bob")

    async def test_key_is_single_use(self, source_pair: Any, links: Any) -> None:
        """Single use lives in the exchange: once the responder answered, its state moved on
        and the ciphertext finds no key; the core refuses a used key ID on the link (and a
        ciphertext to the static key is single-use through that check alone)."""
        initiator, responder = source_pair
        key = await initiator.offer(links[0], None)
        answered = await responder.answer(links[1], key.key_id, None)
        with pytest.raises(SourceError):
            await responder.answer(links[1], key.key_id, answered.state)


async def test_a_retried_rotation_decapsulates_with_the_committed_state(
    static_keys: StaticKeys, tmp_path: Path
) -> None:
    """A rotation whose reply was lost is retried against the committed state, though the
    responder already answered (and remembers) a newer key pair; a fresh source instance (a
    restarted agent) does the same from the state alone."""
    alice, bob = _pair(static_keys, tmp_path)
    committed = await bob.answer(BOB, (await alice.offer(ALICE, None)).key_id, None)
    lost = await bob.answer(
        BOB, (await alice.offer(ALICE, committed.answer)).key_id, committed.state
    )
    assert lost.state != committed.state
    retry = await alice.offer(ALICE, committed.answer)
    assert (await bob.answer(BOB, retry.key_id, committed.state)).key.value == retry.value
    restarted = build_component(MlkemSource, static_keys.table("bob"), links=(BOB,), agent="bob")
    again = await alice.offer(ALICE, committed.answer)
    assert (await restarted.answer(BOB, again.key_id, committed.state)).key.value == again.value
