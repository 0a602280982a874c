"""The classical channel: every message kind authenticated; one flipped bit aborts the block."""

from __future__ import annotations

import pytest

from qkdagent_bb84.channel import ALICE, BOB, AuthError, Channel
from qkdagent_bb84.engine import ABORT_AUTH, Settings, run_block
from qkdagent_bb84.physics import Physics

SMALL = Settings(physics=Physics(decoys=False), block_bits=4_000, chunk_pulses=1 << 16)
KEY = b"a configured secret, 32 bytes.."
KINDS = [
    "sift.bases",
    "sift.match",
    "sample.alice",
    "sample.bob",
    "cascade.parities",
    "cascade.bisect",
    "cascade.answer",
    "cascade.direction",
    "verify.tag",
    "verify.result",
    "pa.seed",
]


def test_an_honest_block_sends_every_kind_of_message() -> None:
    result = run_block(SMALL, 3, KEY)
    assert result.ok and result.alice_key == result.bob_key
    assert sorted(result.messages) == sorted(KINDS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", ["payload", "tag"])
def test_one_flipped_bit_in_any_message_aborts_with_no_key(kind: str, where: str) -> None:
    hits: list[str] = []

    def flip(sender: str, k: str, payload: bytes, tag: bytes) -> tuple[bytes, bytes]:
        if k != kind or hits:
            return payload, tag
        hits.append(k)
        if where == "tag" or not payload:
            return payload, bytes([tag[0] ^ 1]) + tag[1:]
        middle = len(payload) // 2
        return payload[:middle] + bytes([payload[middle] ^ 0x10]) + payload[middle + 1 :], tag

    result = run_block(SMALL, 3, KEY, tamper=flip)
    assert hits == [kind]
    assert result.status == ABORT_AUTH
    assert kind in result.detail
    assert result.alice_key == result.bob_key == b"" and result.key_bits == 0


def test_different_keys_at_the_two_ends_abort_at_the_first_message() -> None:
    channel = Channel(KEY, b"another secret of 32 bytes......")
    with pytest.raises(AuthError, match=r"sift\.bases"):
        channel.send(BOB, "sift.bases", b"\x01")


def test_replayed_or_reordered_messages_fail() -> None:
    recorded: list[tuple[bytes, bytes]] = []

    def replay(sender: str, kind: str, payload: bytes, tag: bytes) -> tuple[bytes, bytes]:
        recorded.append((payload, tag))
        return recorded[0]  # always deliver the first message again

    channel = Channel.shared(KEY, replay)
    assert channel.send(ALICE, "x", b"one") == b"one"
    with pytest.raises(AuthError):
        channel.send(ALICE, "x", b"two")


def test_short_keys_are_refused_and_reprs_hide_keys() -> None:
    with pytest.raises(ValueError, match="shorter"):
        Channel.shared(b"short")
    assert KEY.decode() not in repr(Channel.shared(KEY))
