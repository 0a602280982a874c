"""The pkcs11 sink against real SoftHSM2 tokens on tmpfs (one token per simulated agent)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import trio
from qkdagent_hsm import Pkcs11Sink, naming, token

from qkdagent import (
    ConfigError,
    KeyMeta,
    Link,
    Misconfigured,
    NotInstalled,
    Secret,
    SinkError,
)
from qkdagent.testing import assert_not_leaked, build_component

ALICE = Link("site", "alice", "bob", True)
BOB = Link("site", "bob", "alice", False)


def meta(epoch: int) -> KeyMeta:
    return KeyMeta(epoch, (f"k{epoch}",), "hsm", time.time())


@pytest.mark.parametrize(
    "mode",
    [
        {"sensitive": True, "extractable": False},
        {"sensitive": False, "extractable": True},
    ],
    ids=["non-extractable", "extractable"],
)
async def test_thousand_rotations_leave_same_newest_key_on_both_tokens(
    make_token: Callable[[], Any],
    sink_factory: Callable[..., Pkcs11Sink],
    caplog: pytest.LogCaptureFixture,
    mode: dict[str, bool],
) -> None:
    caplog.set_level(logging.DEBUG)
    alice = sink_factory(make_token(), agent="alice", **mode)
    bob = sink_factory(make_token(), agent="bob", **mode)
    await alice.prepare()
    await bob.prepare()
    secrets: list[Secret] = []
    for epoch in range(1, 1001):
        secret = Secret.random(32)
        secrets.append(secret)
        await alice.install(ALICE, secret, meta(epoch))
        await bob.install(BOB, secret, meta(epoch))

    challenge = os.urandom(32)
    on_alice = await alice.token_mac(ALICE, challenge)
    on_bob = await bob.token_mac(BOB, challenge)
    assert on_alice is not None and on_bob is not None
    assert on_alice == on_bob
    expected = hmac.new(secrets[-1].reveal(), challenge, hashlib.sha256).digest()
    assert on_alice == (naming.epoch_id(1000, 8), expected)
    assert await alice.verify(ALICE, secrets[-1], meta(1000)) is True
    assert await bob.verify(BOB, secrets[-1], meta(1000)) is True
    assert await alice.verify(ALICE, secrets[-2], meta(1000)) is False

    # Exactly N = 2 objects per link remain, found by an authoritative search of each token;
    # only the newest carries the plain label.
    newest, previous = [naming.epoch_id(1000, 8)], [naming.epoch_id(999, 8)]
    assert await alice.object_ids(ALICE) == {"bob": newest, "bob.old": previous}
    assert await bob.object_ids(BOB) == {"alice": newest, "alice.old": previous}

    sample = secrets[-20:] + random.sample(secrets[:-20], 80)
    assert_not_leaked(caplog.text, sample)
    assert "stored as pkcs:object=bob;id=00000000000003e8" in caplog.text


async def test_short_ids_wrap_around(
    make_token: Callable[[], Any], sink_factory: Callable[..., Pkcs11Sink]
) -> None:
    """1-byte IDs (254 usable values) wrap twice in 600 rotations; retention still holds."""
    sink = sink_factory(make_token(), id_bytes=1, retention=3)
    await sink.prepare()
    last: list[Secret] = []
    for epoch in range(1, 601):
        secret = Secret.random(32)
        last = [*last[-2:], secret]
        await sink.install(ALICE, secret, meta(epoch))
    assert await sink.object_ids(ALICE) == {
        "bob": [naming.epoch_id(600, 1)],
        "bob.old": sorted(naming.epoch_id(e, 1) for e in (598, 599)),
    }
    assert await sink.verify(ALICE, last[-1], meta(600)) is True
    assert await sink.verify(ALICE, last[-2], meta(600)) is False


async def test_fifty_links_rotate_concurrently(
    make_token: Callable[[], Any], sink_factory: Callable[..., Pkcs11Sink]
) -> None:
    """50 links on one token, from two sink instances sharing one logged-in session."""
    tok = make_token()
    sinks = [sink_factory(tok, name="a", object_label="{link}"), sink_factory(tok, name="b")]
    for sink in sinks:
        await sink.prepare()
    assert sinks[0]._entry is sinks[1]._entry  # one logged-in session per token and process
    links = [Link(f"l{i:02d}", "alice", f"peer{i:02d}", True) for i in range(50)]
    current: dict[str, Secret] = {}

    async def rotate(sink: Pkcs11Sink, link: Link) -> None:
        for epoch in range(1, 21):
            secret = Secret.random(32)
            await sink.install(link, secret, meta(epoch))
            current[link.name] = secret
            if epoch % 5 == 0:
                assert await sink.verify(link, secret, meta(epoch)) is True

    async with trio.open_nursery() as nursery:
        for i, link in enumerate(links):
            nursery.start_soon(rotate, sinks[i % 2], link)

    for i, link in enumerate(links):
        sink = sinks[i % 2]
        assert await sink.verify(link, current[link.name], meta(20)) is True
        current_ids, retired_ids = (await sink.object_ids(link)).values()
        assert (current_ids, retired_ids) == ([naming.epoch_id(20, 8)], [naming.epoch_id(19, 8)])


async def test_retired_label_keeps_label_lookup_unambiguous(
    make_token: Callable[[], Any], sink_factory: Callable[..., Pkcs11Sink]
) -> None:
    sink = sink_factory(make_token(), retention=3, retired_label="{label}~old")
    await sink.prepare()
    for epoch in range(1, 6):
        await sink.install(ALICE, Secret.random(32), meta(epoch))
    assert await sink.object_ids(ALICE) == {
        "bob": [naming.epoch_id(5, 8)],
        "bob~old": [naming.epoch_id(3, 8), naming.epoch_id(4, 8)],
    }
    assert sink.identity(ALICE, 5) == "pkcs:object=bob;id=0000000000000005"
    await sink.erase(ALICE, "test")
    assert await sink.object_ids(ALICE) == {"bob": [], "bob~old": []}


async def test_erase_destroys_every_object_of_the_link_only(
    make_token: Callable[[], Any], sink_factory: Callable[..., Pkcs11Sink]
) -> None:
    sink = sink_factory(make_token())
    await sink.prepare()
    other = Link("other", "alice", "carol", True)
    kept = Secret.random(32)
    await sink.install(other, kept, meta(1))
    for epoch in (1, 2):
        await sink.install(ALICE, Secret.random(32), meta(epoch))
    await sink.erase(ALICE, "reject_after")
    assert await sink.object_ids(ALICE) == {"bob": [], "bob.old": []}
    assert await sink.token_mac(ALICE, b"x") is None
    assert await sink.verify(other, kept, meta(1)) is True


async def test_reinstall_and_objects_deleted_behind_our_back(
    make_token: Callable[[], Any], sink_factory: Callable[..., Pkcs11Sink]
) -> None:
    sink = sink_factory(make_token())
    await sink.prepare()
    first, second = Secret.random(32), Secret.random(32)
    await sink.install(ALICE, first, meta(1))
    await sink.install(ALICE, first, meta(1))
    assert await sink.object_ids(ALICE) == {"bob": [naming.epoch_id(1, 8)], "bob.old": []}
    # A different secret under the same epoch (a resync restarting the chain) replaces it.
    await sink.install(ALICE, second, meta(1))
    assert await sink.object_ids(ALICE) == {"bob": [naming.epoch_id(1, 8)], "bob.old": []}
    assert await sink.verify(ALICE, second, meta(1)) is True

    entry = sink._open()

    def delete_all() -> None:
        for obj in list(entry.session.get_objects({})):
            obj.destroy()

    await sink.worker.run(delete_all)  # the sink's index now holds stale handles
    third = Secret.random(32)
    await sink.install(ALICE, third, meta(2))
    assert await sink.verify(ALICE, third, meta(2)) is True
    assert await sink.object_ids(ALICE) == {"bob": [naming.epoch_id(2, 8)], "bob.old": []}


async def test_wrong_pin_is_a_clear_error_at_prepare(
    make_token: Callable[[], Any], sink_factory: Callable[..., Pkcs11Sink], tmp_path: Any
) -> None:
    tok = make_token()
    wrong = "9" + tok.pin[1:] if tok.pin[0] != "9" else "8" + tok.pin[1:]
    pin_file = tmp_path / "wrong.pin"
    pin_file.write_text(wrong)
    pin_file.chmod(0o600)
    sink = sink_factory(tok, pin={"file": str(pin_file)})
    with pytest.raises(Misconfigured, match=r"the PIN was rejected \(CKR_PIN_INCORRECT\)") as err:
        await sink.prepare()
    assert tok.label in str(err.value)
    assert wrong not in str(err.value) and tok.pin not in str(err.value)
    # The failure left nothing open: the right PIN (from the environment) works afterwards.
    os.environ["QKDAGENT_HSM_TEST_PIN"] = tok.pin
    try:
        good = sink_factory(tok, name="good", pin={"env": "QKDAGENT_HSM_TEST_PIN"})
        await good.prepare()
    finally:
        os.environ.pop("QKDAGENT_HSM_TEST_PIN", None)  # the sink removes it once read
    await good.install(ALICE, Secret.random(32), meta(1))


async def test_missing_token_is_a_clear_error_at_prepare(
    make_token: Callable[[], Any], sink_factory: Callable[..., Pkcs11Sink]
) -> None:
    tok = make_token()
    sink = sink_factory(tok, name="x")
    sink.spec = token.TokenSpec(sink.spec.module, sink.spec.selector.__class__(label="no-such"))
    with pytest.raises(NotInstalled, match=r"no token matching token='no-such'") as err:
        await sink.prepare()
    assert repr(tok.label) in str(err.value)  # lists the tokens that do exist


async def test_missing_module_is_not_installed(
    make_token: Callable[[], Any], sink_factory: Callable[..., Pkcs11Sink], tmp_path: Any
) -> None:
    sink = sink_factory(make_token(), module=str(tmp_path / "nope.so"))
    with pytest.raises(NotInstalled, match=r"nope\.so does not exist"):
        await sink.prepare()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {
                "object_label": "qkd-link-to-{peer}-via-the-long-haul-fibre-ring",
                "max_label_bytes": 40,
            },
            r"object_label template renders at least 41 bytes .* limit of 40",
        ),
        (
            {"object_labels": {"site": "x" * 41}, "max_label_bytes": 40},
            r"object_label for link 'site' 'x+' is 41 bytes, longer than the token's limit of 40",
        ),
        (
            {"retired_label": "{label}-retired-" + "y" * 32, "max_label_bytes": 40},
            r"retired_label template renders at least 41 bytes",
        ),
    ],
    ids=["template", "fixed-label", "retired-label"],
)
async def test_label_too_long_is_a_clear_error_at_prepare(
    make_token: Callable[[], Any],
    sink_factory: Callable[..., Pkcs11Sink],
    extra: dict[str, Any],
    message: str,
) -> None:
    sink = sink_factory(make_token(), **extra)
    with pytest.raises(Misconfigured, match=message):
        await sink.prepare()


LONG_PEER = Link("l", "alice", "a-very-long-peer", True)


@pytest.mark.parametrize(
    ("links", "extra", "message"),
    [
        (
            (LONG_PEER,),
            {"max_label_bytes": 10},
            r"object_label for link 'l' 'a-very-long-peer' is 16",
        ),
        (
            (LONG_PEER,),
            {"max_label_bytes": 16},
            r"retired_label for link 'l' 'a-very-long-peer\.old' is 20 bytes, .* limit of 16",
        ),
        (
            (Link("one", "alice", "bob", True), Link("two", "alice", "bob", True)),
            {},
            r"links 'one' and 'two' both map to label 'bob'",
        ),
        (
            (Link("one", "alice", "bob", True), Link("two", "alice", "carol", True)),
            {"object_labels": {"two": "bob.old"}},
            r"links 'one' and 'two' both map to label 'bob\.old'",
        ),
        (
            (ALICE,),
            {"retired_label": "{peer}"},
            r"retired_label for link 'site' equals its label 'bob'",
        ),
    ],
    ids=[
        "label",
        "retired-label",
        "same-label",
        "label-is-a-retired-label",
        "retired-equals-label",
    ],
)
async def test_labels_of_the_assigned_links_are_checked_at_prepare(
    make_token: Callable[[], Any],
    sink_factory: Callable[..., Pkcs11Sink],
    links: tuple[Link, ...],
    extra: dict[str, Any],
    message: str,
) -> None:
    """The core sets `links` before prepare(): every real label is rendered and checked."""
    tok = make_token()
    sink = sink_factory(tok, **extra)
    sink.links = links
    with pytest.raises(Misconfigured, match=message) as err:
        await sink.prepare()
    assert tok.label in str(err.value)
    # The failed prepare() released the token: a good configuration opens it afterwards.
    good = sink_factory(tok, name="good", object_label="{link}")
    good.links = links
    await good.prepare()
    assert good._entry is not None and good._entry.users == 1


async def test_only_labels_in_use_limit_the_template(
    make_token: Callable[[], Any], sink_factory: Callable[..., Pkcs11Sink]
) -> None:
    """A long template no link renders (all links have fixed labels) is no error."""
    sink = sink_factory(
        make_token(),
        object_label="a-template-that-no-link-of-this-sink-uses-{peer}",
        object_labels={"site": "hsm.bob.example"},
        max_label_bytes=20,
    )
    sink.links = (ALICE,)
    await sink.prepare()
    await sink.install(ALICE, Secret.random(32), meta(1))
    assert sink.identity(ALICE, 1) == "pkcs:object=hsm.bob.example;id=0000000000000001"


async def test_label_too_long_for_a_link_added_after_prepare_fails_install(
    make_token: Callable[[], Any], sink_factory: Callable[..., Pkcs11Sink]
) -> None:
    """A reload can give a prepared sink new links: install() checks their labels too."""
    sink = sink_factory(make_token(), max_label_bytes=10)
    await sink.prepare()
    with pytest.raises(SinkError, match=r"'a-very-long-peer' is 16 bytes"):
        await sink.install(LONG_PEER, Secret.random(32), meta(1))


async def test_two_links_on_one_label_are_refused(
    make_token: Callable[[], Any], sink_factory: Callable[..., Pkcs11Sink]
) -> None:
    sink = sink_factory(make_token())
    await sink.prepare()
    await sink.install(Link("one", "alice", "bob", True), Secret.random(32), meta(1))
    with pytest.raises(SinkError, match="both map to label 'bob'"):
        await sink.install(Link("two", "alice", "bob", True), Secret.random(32), meta(1))


def test_token_code_refuses_to_run_off_the_worker_thread() -> None:
    with pytest.raises(AssertionError):
        token.acquire(
            {}, token.TokenSpec("/nonexistent.so", token.TokenSelector(label="x")), Secret(b"1")
        )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"pin": {"env": "X"}}, "give exactly one of token"),
        ({"token": "t", "uri": "pkcs11:token=t", "pin": {"env": "HOME"}}, "exactly one"),
        ({"token": "t", "pin": "1234"}, "not accepted inline"),
        ({"uri": "pkcs11:token=t?pin-value=1234", "pin": {"env": "HOME"}}, "pin-value"),
        ({"token": "t", "pin": {"env": "HOME"}, "object_label": "{nope}"}, "unknown placeholder"),
        ({"token": "t", "pin": {"env": "HOME"}, "id_bytes": 1, "retention": 200}, "too large"),
        ({"token": "t", "pin": {"env": "HOME"}, "key_type": "aes"}, "must be one of"),
        ({"token": "t", "pin": {"env": "HOME"}, "retired_label": True}, "must be a string"),
        ({"token": "t", "pin": {"env": "HOME"}, "retired_label": "{label}-{x}"}, "placeholder"),
        (
            {"token": "t", "pin": {"env": "HOME"}, "object_labels": {"a": "x", "b": "x"}},
            "same label to two links",
        ),
    ],
)
def test_bad_options_are_config_errors(data: dict[str, Any], message: str, tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match=message):
        build_component(Pkcs11Sink, data, name="hsm", state_dir=tmp_path)


def test_uri_selects_token_and_module(tmp_path: Any) -> None:
    table = {
        "uri": "pkcs11:token=qkd%20agent;serial=42?module-path=/opt/p11/lib.so",
        "pin": {"env": "HOME"},
    }
    sink = build_component(Pkcs11Sink, table, name="hsm", state_dir=tmp_path)
    assert sink.spec.module == "/opt/p11/lib.so"
    assert sink.spec.selector.label == "qkd agent" and sink.spec.selector.serial == "42"


async def test_cancelled_callers_never_interleave_token_operations(
    make_token: Callable[[], Any], sink_factory: Callable[..., Pkcs11Sink]
) -> None:
    """Callers cancelled mid-job (as the core's timeouts do) leave a consistent token."""
    sink = sink_factory(make_token())
    await sink.prepare()
    links = [Link(f"c{i}", "alice", f"p{i}", True) for i in range(10)]

    async def churn(link: Link) -> None:
        for epoch in range(1, 1000):
            await sink.install(link, Secret.random(32), meta(epoch))

    with trio.move_on_after(0.3):
        async with trio.open_nursery() as nursery:
            for link in links:
                nursery.start_soon(churn, link)
    for link in links:
        final = Secret.random(32)
        await sink.install(link, final, meta(5000))
        assert await sink.verify(link, final, meta(5000)) is True
        ids = await sink.object_ids(link)
        assert list(ids.values()) == [[naming.epoch_id(5000, 8)], []]  # 4999 never existed


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"id_bytes": 4}, "id_bytes = 4, but the token allows 2-byte IDs"),
        ({"id_bytes": 2, "max_label_bytes": 64}, "max_label_bytes = 64, but the token allows 40"),
        ({"id_bytes": 2, "object_labels": {"l": "z" * 41}}, "is 41 bytes, longer than .* 40"),
    ],
)
def test_yubihsm_limits_are_checked(extra: dict[str, Any], message: str, tmp_path: Any) -> None:
    table = {"token": "y", "pin": {"env": "HOME"}, **extra}
    sink = build_component(Pkcs11Sink, table, name="hsm", state_dir=tmp_path)
    info = token.TokenInfo("y", "0012345", "Yubico", "YubiHSM", 0)
    with pytest.raises(Misconfigured, match=message):
        sink._check_limits(token.OpenToken(("m", "s", 0), None, info))


def test_yubihsm_defaults_to_its_label_limit(tmp_path: Any) -> None:
    table = {"token": "y", "pin": {"env": "HOME"}, "id_bytes": 2}
    sink = build_component(Pkcs11Sink, table, name="hsm", state_dir=tmp_path)
    info = token.TokenInfo("y", "0012345", "Yubico", "YubiHSM", 0)
    sink._check_limits(token.OpenToken(("m", "s", 0), None, info))
    assert sink.label_limit == 40


def _lookup(sink: Pkcs11Sink, challenge: bytes, **where: Any) -> tuple[bytes, bytes]:
    """What a consumer does: C_FindObjects by label (and maybe ID), then HMAC in the token.

    python-pkcs11's get_key raises MultipleObjectsReturned when the search is ambiguous.
    """
    import pkcs11

    entry = sink._open()
    found = entry.session.get_key(object_class=pkcs11.ObjectClass.SECRET_KEY, **where)
    mac = found.sign(challenge, mechanism=pkcs11.Mechanism.SHA256_HMAC)
    return bytes(found[pkcs11.Attribute.ID]), bytes(mac)


@pytest.mark.parametrize("retention", [2, 3])
async def test_lookup_by_label_alone_finds_exactly_the_newest_key(
    make_token: Callable[[], Any], sink_factory: Callable[..., Pkcs11Sink], retention: int
) -> None:
    """Default retired_label: only the current key carries the plain label."""
    sink = sink_factory(make_token(), retention=retention)
    await sink.prepare()
    secrets = {epoch: Secret.random(32) for epoch in range(1, 8)}
    for epoch, secret in secrets.items():
        await sink.install(ALICE, secret, meta(epoch))
    challenge = os.urandom(32)

    def mac(epoch: int) -> tuple[bytes, bytes]:
        digest = hmac.new(secrets[epoch].reveal(), challenge, hashlib.sha256).digest()
        return naming.epoch_id(epoch, 8), digest

    assert await sink.worker.run(lambda: _lookup(sink, challenge, label="bob")) == mac(7)
    # A client one rotation behind: its epoch's key is under the retired label, same ID.
    previous = naming.epoch_id(6, 8)
    found = await sink.worker.run(lambda: _lookup(sink, challenge, label="bob.old", id=previous))
    assert found == mac(6)
    retired = [naming.epoch_id(e, 8) for e in range(8 - retention, 7)]
    assert await sink.object_ids(ALICE) == {"bob": [naming.epoch_id(7, 8)], "bob.old": retired}


async def test_token_refusing_relabel_is_a_clear_error_and_keeps_the_label_unambiguous(
    make_token: Callable[[], Any], sink_factory: Callable[..., Pkcs11Sink]
) -> None:
    """SoftHSM refuses C_SetAttributeValue on a CKA_MODIFIABLE=false object (0x1B)."""
    import pkcs11

    tok = make_token()
    sink = sink_factory(tok)
    await sink.prepare()
    first, second = Secret.random(32), Secret.random(32)
    entry = sink._open()

    def store_unmodifiable() -> None:
        A = pkcs11.Attribute
        entry.session.create_object(
            {
                A.CLASS: pkcs11.ObjectClass.SECRET_KEY,
                A.KEY_TYPE: pkcs11.KeyType.GENERIC_SECRET,
                A.VALUE: first.reveal(),
                A.LABEL: "bob",
                A.ID: naming.epoch_id(1, 8),
                A.TOKEN: True,
                A.PRIVATE: True,
                A.SIGN: True,
                A.MODIFIABLE: False,
            }
        )
        entry.forget_index()

    await sink.worker.run(store_unmodifiable)
    with pytest.raises(SinkError) as err:
        await sink.install(ALICE, second, meta(2))
    message = str(err.value)
    assert "refused to relabel pkcs:object=bob;id=0000000000000001 to 'bob.old'" in message
    assert "(CKR_ACTION_PROHIBITED)" in message and "retired_label = false" in message
    assert_not_leaked(message, [first, second])
    # Rolled back: the previous key is still the only object under the label.
    assert await sink.object_ids(ALICE) == {"bob": [naming.epoch_id(1, 8)], "bob.old": []}
    assert await sink.verify(ALICE, first, meta(1)) is True

    # The documented way out for such tokens: older keys keep the label (lookups by label+ID).
    same_label = sink_factory(tok, name="same-label", retired_label=False)
    await same_label.prepare()
    await same_label.install(ALICE, second, meta(2))
    assert await same_label.object_ids(ALICE) == {
        "bob": [naming.epoch_id(1, 8), naming.epoch_id(2, 8)]
    }
    assert await same_label.verify(ALICE, second, meta(2)) is True


async def test_token_selected_by_uri(
    softhsm: Any, make_token: Callable[[], Any], sink_factory: Callable[..., Pkcs11Sink]
) -> None:
    """Two tokens on one module: token + serial, or the serial alone, picks the right one."""
    one, two = make_token(), make_token()
    module = f"?module-path={softhsm.module}"
    by_both = sink_factory(
        two, name="both", uri=f"pkcs11:token={two.label};serial={two.serial}{module}"
    )
    by_serial = sink_factory(one, name="serial", uri=f"pkcs11:serial={one.serial}{module}")
    await by_both.prepare()
    await by_serial.prepare()
    assert (by_both._open().info.label, by_both._open().info.serial) == (two.label, two.serial)
    assert (by_serial._open().info.label, by_serial._open().info.serial) == (one.label, one.serial)
    secret = Secret.random(32)
    await by_both.install(ALICE, secret, meta(1))
    assert await by_both.verify(ALICE, secret, meta(1)) is True
    assert await by_serial.object_ids(ALICE) == {"bob": [], "bob.old": []}  # the other token


async def test_uri_matching_no_token_is_a_clear_error_at_prepare(
    softhsm: Any, make_token: Callable[[], Any], sink_factory: Callable[..., Pkcs11Sink]
) -> None:
    tok = make_token()
    wrong = "0" * len(tok.serial) if tok.serial != "0" * len(tok.serial) else "1" * 16
    uri = f"pkcs11:token={tok.label};serial={wrong}?module-path={softhsm.module}"
    sink = sink_factory(tok, uri=uri)
    with pytest.raises(NotInstalled) as err:
        await sink.prepare()
    message = str(err.value)
    assert f"no token matching token={tok.label!r}, serial={wrong!r} in {softhsm.module}" in message
    assert repr(tok.label) in message  # names the tokens that exist
    assert sink._entry is None


async def test_trio_thread_keeps_running_while_the_worker_stores_keys(
    make_token: Callable[[], Any], sink_factory: Callable[..., Pkcs11Sink]
) -> None:
    """One worker job stores 120 keys; a trio task with short sleeps advances throughout.

    Deterministic, no timing thresholds: at three points the job waits until the trio task has
    seen it get there. Were the trio thread blocked on the job, it could never see that and the
    job would fail after the (failure-only) 60 s guard.
    """
    sink = sink_factory(make_token())
    await sink.prepare()
    entry, labels = sink._open(), sink.labels(ALICE)
    total, checkpoints = 120, (30, 60, 90)
    progress = 0
    seen_by_trio = {point: threading.Event() for point in checkpoints}

    def batch() -> None:
        nonlocal progress
        for epoch in range(1, total + 1):
            token.install(
                entry,
                label=labels.label,
                retired_label=labels.retired,
                keep=naming.keep_window(epoch, sink.retention, sink.id_bytes),
                secret=Secret.random(32),
                policy=sink.policy,
            )
            progress = epoch
            if epoch in seen_by_trio and not seen_by_trio[epoch].wait(timeout=60):
                raise AssertionError(f"the trio thread did not run during the job ({epoch=})")

    ticks_during_job: list[int] = []  # the job's progress at each tick of the trio task
    job_done = False

    async def ticker() -> None:
        while not job_done:
            await trio.sleep(0.001)
            now = progress
            if 0 < now < total:
                ticks_during_job.append(now)
            for point, event in seen_by_trio.items():
                if now >= point:
                    event.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await sink.worker.run(batch)
        job_done = True

    assert set(checkpoints) <= set(ticks_during_job)
    assert len(ticks_during_job) >= len(checkpoints)
    assert await sink.object_ids(ALICE) == {
        "bob": [naming.epoch_id(total, 8)],
        "bob.old": [naming.epoch_id(total - 1, 8)],
    }


async def test_each_agent_has_its_own_worker_and_sessions_until_its_last_sink_closes(
    make_token: Callable[[], Any], sink_factory: Callable[..., Pkcs11Sink]
) -> None:
    tok_a, tok_b = make_token(), make_token()
    a1 = sink_factory(tok_a, name="a1", agent="alice")
    a2 = sink_factory(tok_a, name="a2", agent="alice", object_label="{link}")
    bob = sink_factory(tok_b, name="b", agent="bob")
    for sink in (a1, a2, bob):
        await sink.prepare()
    alice_state = a1._state
    assert a1._open() is a2._open()  # one logged-in session per agent and token
    assert a1.worker is a2.worker and a1.worker is not bob.worker
    assert list(alice_state.opened) == [a1._open().key] and bob._open() not in (a1._open(),)

    await a1.aclose()
    secret = Secret.random(32)
    await a2.install(ALICE, secret, meta(1))  # the session stays open for the other sink
    assert await a2.verify(ALICE, secret, meta(1)) is True
    await a2.aclose()
    assert alice_state.opened == {} and alice_state._worker is None  # the last sink stopped them

    await bob.install(BOB, secret, meta(1))  # bob's agent is untouched by alice's
    assert await bob.verify(BOB, secret, meta(1)) is True


async def test_an_agent_never_reinitialises_the_module_under_another_agents_session(
    make_token: Callable[[], Any], sink_factory: Callable[..., Pkcs11Sink]
) -> None:
    alice = sink_factory(make_token(), agent="alice")
    await alice.prepare()
    late = make_token()  # initialised after the module was: SoftHSM lists it after C_Initialize
    bob = sink_factory(late, agent="bob")
    with pytest.raises(NotInstalled, match="no token matching"):
        await bob.prepare()  # a re-initialisation would have closed alice's session
    secret = Secret.random(32)
    await alice.install(ALICE, secret, meta(1))
    assert await alice.verify(ALICE, secret, meta(1)) is True
