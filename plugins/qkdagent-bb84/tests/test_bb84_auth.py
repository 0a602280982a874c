"""The classical channel: every message kind authenticated; one flipped bit aborts the block."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest
from qkdagent import (
    ComponentEvent,
    ConfigError,
    Link,
    Misconfigured,
    PluginContext,
    SourceUnavailable,
)
from qkdagent.testing import build_component, running

from qkdagent_bb84 import Bb84Source
from qkdagent_bb84.channel import ALICE, BOB, AuthError, Channel, block_key
from qkdagent_bb84.engine import ABORT_AUTH, Settings, run_block
from qkdagent_bb84.physics import Physics
from qkdagent_bb84.pool import Bb84Link

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


# -- a configured secret (the bb84 source's `auth_key`) ---------------------------------------


def _secret_file(path: Path, value: bytes) -> dict[str, str]:
    path.write_bytes(base64.b64encode(value))
    path.chmod(0o600)
    return {"file": str(path)}


def _ends(
    tmp_path: Path, link: str, a_key: Any, b_key: Any, **kw: Any
) -> tuple[Bb84Source, Bb84Source]:
    table = {"decoys": False, "block_bits": 4_000, "low_water": 0, "seed": 5, "link": link}
    alice_link, bob_link = Link("ab", "alice", "bob", True), Link("ab", "bob", "alice", False)
    a_table = {**table, **({"auth_key": a_key} if a_key else {})}
    b_table = {**table, **({"auth_key": b_key} if b_key else {})}
    alice_context = PluginContext("alice", tmp_path / "a", **kw)
    return (
        build_component(Bb84Source, a_table, links=(alice_link,), context=alice_context),
        build_component(Bb84Source, b_table, links=(bob_link,), state_dir=tmp_path / "b"),
    )


async def test_a_configured_secret_keys_the_channel_at_both_ends(tmp_path: Path) -> None:
    shared = _secret_file(tmp_path / "auth.b64", os.urandom(32))
    alice, bob = _ends(tmp_path, "auth-same", shared, shared)
    try:
        async with running(alice, bob):
            key = await alice.new_key(Link("ab", "alice", "bob", True))
            same = await bob.key_by_id(Link("ab", "bob", "alice", False), key.key_id)
        assert same.value == key.value
        assert "auth" not in repr(alice) and shared["file"] not in repr(alice)
    finally:
        Bb84Link.forget("auth-same")


async def test_ends_with_different_secrets_abort_every_block(tmp_path: Path) -> None:
    events: list[ComponentEvent] = []
    a_key = _secret_file(tmp_path / "a.b64", os.urandom(32))
    b_key = _secret_file(tmp_path / "b.b64", os.urandom(32))
    alice, bob = _ends(tmp_path, "auth-differ", a_key, b_key, reporter=events.append)
    try:
        async with running(alice, bob):
            with pytest.raises(SourceUnavailable, match="failed authentication"):
                await alice.new_key(Link("ab", "alice", "bob", True))
        assert events and all("failed authentication" in e.detail for e in events)
        assert Bb84Link._registry["auth-differ"].stats.key_bits == 0
        assert alice.store is not None and alice.store.level() == 0
    finally:
        Bb84Link.forget("auth-differ")


async def test_a_secret_at_one_end_only_is_misconfigured(tmp_path: Path) -> None:
    alice, bob = _ends(tmp_path, "auth-one", _secret_file(tmp_path / "a.b64", os.urandom(32)), None)
    try:
        with pytest.raises(Misconfigured, match="auth_key is set at one end only"):
            async with running(alice, bob):
                pass
    finally:
        Bb84Link.forget("auth-one")


@pytest.mark.parametrize(
    ("value", "text"),
    [("inline-secret", "not accepted inline"), (b"short", "at least 16 bytes")],
)
def test_a_bad_auth_key_is_refused_at_construction(tmp_path: Path, value: Any, text: str) -> None:
    if isinstance(value, bytes):
        value = _secret_file(tmp_path / "k.b64", value)
    with pytest.raises(ConfigError, match=text):
        build_component(Bb84Source, {"auth_key": value}, state_dir=tmp_path)


def test_each_block_has_its_own_channel_key() -> None:
    """Sequence numbers restart every block: a message recorded in one block must not verify
    in another, so the configured secret is never the HMAC key itself."""
    secret = os.urandom(32)
    keys = {block_key(secret, f"0123abcd-{n}") for n in range(100)}
    assert len(keys) == 100 and secret not in keys
    assert block_key(secret, "0123abcd-1") != block_key(os.urandom(32), "0123abcd-1")
