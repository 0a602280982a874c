"""Fuzz targets for what the peer sends this source: the key ID (a ciphertext, in `rotate`)
and the answer (a public key, in `rotate-reply`). Any input is a typed source error or a key,
never another exception. Derandomized here; raise `max_examples` to run it long."""

from __future__ import annotations

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qkdagent_pqc import kem
from qkdagent_pqc.source import MlkemSource

from qkdagent import KeyNotFound, Link, SourceError
from qkdagent.testing import build_component

from .conftest import StaticKeys

FUZZ = settings(
    max_examples=300, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck)
)
BOB = Link("l", "bob", "alice", False)
ALICE = Link("l", "alice", "bob", True)
PARAMS = kem.PARAMETER_SETS["ML-KEM-768"]


def _key_ids(static_fp: bytes) -> st.SearchStrategy[str]:
    """Text, and key IDs that are nearly right: random fingerprints and lengths, and the real
    static fingerprint with random ciphertexts (which reach the decapsulation)."""
    shaped = st.tuples(
        st.one_of(st.just(static_fp), st.binary(max_size=12)),
        st.one_of(st.binary(min_size=1088, max_size=1088), st.binary(max_size=1100)),
    ).map(lambda p: kem.key_id(p[0], p[1]))
    return st.one_of(st.text(max_size=200), shaped, st.text(alphabet="A-_.", max_size=3000))


@given(
    data=st.data(),
    state=st.one_of(st.none(), st.binary(min_size=64, max_size=64), st.binary(max_size=80)),
)
@FUZZ
def test_any_key_id_is_a_key_or_a_typed_error(
    static_keys: StaticKeys, data: st.DataObject, state: bytes | None
) -> None:
    bob = build_component(MlkemSource, static_keys.table("bob"), links=(BOB,), agent="bob")
    static_fp = kem.fingerprint(PARAMS, static_keys.public["bob"])
    key_id = data.draw(_key_ids(static_fp))

    async def one() -> None:
        try:
            answered = await bob.answer(BOB, key_id, state)
        except (KeyNotFound, SourceError):
            return
        assert answered.key.key_id == key_id and len(answered.key.value) == 32

    trio.run(one)


@given(answer=st.one_of(st.binary(max_size=2000), st.binary(min_size=1184, max_size=1184)))
@FUZZ
def test_any_answer_is_a_public_key_or_a_typed_error(
    static_keys: StaticKeys, answer: bytes
) -> None:
    alice = build_component(MlkemSource, static_keys.table("alice"), links=(ALICE,))

    async def one() -> None:
        try:
            state = await alice.accept_answer(ALICE, answer, None)
        except SourceError:
            return
        assert state == answer
        key = await alice.offer(ALICE, state)  # usable: it encapsulates
        assert kem.parse_key_id(PARAMS, key.key_id)

    trio.run(one)


async def test_a_random_ciphertext_under_the_right_fingerprint_reaches_ml_kem(
    static_keys: StaticKeys,
) -> None:
    """What the shaped strategy feeds the target gets past parsing: implicit rejection gives
    a key (that the peer does not have), not an error."""
    bob = build_component(MlkemSource, static_keys.table("bob"), links=(BOB,), agent="bob")
    static_fp = kem.fingerprint(PARAMS, static_keys.public["bob"])
    answered = await bob.answer(BOB, kem.key_id(static_fp, b"\x5a" * 1088), None)
    assert len(answered.key.value) == 32
