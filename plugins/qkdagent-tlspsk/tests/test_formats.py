"""File formats, identity templates and slot planning: pure logic, no I/O."""

from __future__ import annotations

import os

import pytest
from qkdagent_tlspsk import identity as ident
from qkdagent_tlspsk import slots
from qkdagent_tlspsk.formats import FORMATS, Entry, FormatError

from qkdagent import Link

KEY = bytes(range(32))


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("stunnel", f"lnk.7:{KEY.hex()}\n"),
        ("nghttpx", f"lnk.7:{KEY.hex()}\n"),
        ("gnutls", f"lnk.7:{KEY.hex()}\n"),
        ("nginx-patch", f"lnk.7:{{HEX}}{KEY.hex()}\n"),
        ("openssl", KEY.hex()),
    ],
)
def test_render_and_parse_round_trip(fmt: str, expected: str) -> None:
    form = FORMATS[fmt]
    data = form.render([Entry("lnk.7", KEY)])
    assert data.decode() == expected
    parsed = form.parse(data)
    assert [e.key for e in parsed] == [KEY]
    assert not any(line != line.rstrip() for line in data.decode().splitlines())


def test_several_entries_keep_their_order() -> None:
    entries = [Entry(f"id{i}", os.urandom(32)) for i in range(3)]
    assert FORMATS["stunnel"].parse(FORMATS["stunnel"].render(entries)) == entries


def test_gnutls_writes_colon_identities_in_hex_like_psktool() -> None:
    name = "pkcs:object=bob;id=2a"
    data = FORMATS["gnutls"].render([Entry(name, KEY)])
    assert data.decode() == f"#{name.encode().hex()}:{KEY.hex()}\n"
    assert FORMATS["gnutls"].parse(data) == [Entry(name, KEY)]


def test_nghttpx_parse_skips_comments_and_stunnel_does_not() -> None:
    data = f"# managed\n\nid:{KEY.hex()}\n".encode()
    assert FORMATS["nghttpx"].parse(data) == [Entry("id", KEY)]
    with pytest.raises(FormatError, match="line 1"):
        FORMATS["stunnel"].parse(data)


@pytest.mark.parametrize(
    ("identity", "problem"),
    [
        ("", "empty"),
        ("a:b", "contains ':'"),
        ("#x", "starts with '#'"),
        (" x", "whitespace"),
        ("x ", "whitespace"),
        ("a\nb", "control"),
        ("x" * 256, "256 bytes"),
    ],
)
def test_stunnel_rejects_bad_identities(identity: str, problem: str) -> None:
    with pytest.raises(FormatError, match=problem):
        FORMATS["stunnel"].render([Entry(identity, KEY)])


@pytest.mark.parametrize("size", [0, 8, 15, 513])
def test_key_length_is_checked_and_never_echoed(size: int) -> None:
    key = os.urandom(size)
    with pytest.raises(FormatError) as info:
        FORMATS["stunnel"].render([Entry("id", key)])
    assert "16-512" in str(info.value)
    if key:
        assert key.hex() not in str(info.value)


def test_longest_and_shortest_valid_values_pass() -> None:
    FORMATS["stunnel"].render([Entry("x" * 255, os.urandom(16)), Entry("y", os.urandom(512))])


def test_duplicate_identity_is_refused() -> None:
    with pytest.raises(FormatError, match="twice"):
        FORMATS["stunnel"].render([Entry("a", KEY), Entry("a", KEY)])


def test_openssl_holds_exactly_one_key() -> None:
    with pytest.raises(FormatError, match="exactly one"):
        FORMATS["openssl"].render([Entry("a", KEY), Entry("b", KEY)])


def test_parse_errors_name_the_line_not_the_content() -> None:
    secret_text = "zz" + KEY.hex()
    with pytest.raises(FormatError) as info:
        FORMATS["stunnel"].parse(f"ok:{KEY.hex()}\nid:{secret_text}\n".encode())
    assert "line 2" in str(info.value)
    assert KEY.hex() not in str(info.value)


# -- identities --------------------------------------------------------------------------------


def test_both_sides_render_the_same_identity() -> None:
    server_link = Link("dc1-dc2", "alice", "bob", True)
    client_link = Link("dc1-dc2", "bob", "alice", False)
    for template in (
        ident.DEFAULT_TEMPLATE,
        ident.CQPTOOLKIT_TEMPLATE,
        "{server}-{client}-{epoch}",
    ):
        a = ident.render(template, server_link, 42, "tls", server_side=True)
        b = ident.render(template, client_link, 42, "tls", server_side=False)
        assert a == b
    assert ident.render(ident.CQPTOOLKIT_TEMPLATE, server_link, 42, "t", server_side=True) == (
        "pkcs:object=bob;id=2a"
    )
    assert ident.render(ident.DEFAULT_TEMPLATE, server_link, 42, "t", server_side=True) == (
        "dc1-dc2.42"
    )


@pytest.mark.parametrize("template", ["{local}", "{peer}", "{link!r}", "{epoch:08}", "{x.y}", "{"])
def test_templates_reject_unknown_or_fancy_fields(template: str) -> None:
    assert ident.check_template(template) is not None


def test_uses_epoch() -> None:
    assert ident.uses_epoch("{link}.{epoch}")
    assert ident.uses_epoch("id={epoch_hex}")
    assert not ident.uses_epoch("{link}")


# -- slots ----------------------------------------------------------------------------------


def test_install_keeps_previous_for_grace_then_expires() -> None:
    s1 = slots.after_install([], "l", "l.1", 1, now=100, grace=30)
    assert s1 == [slots.Slot("l.1", "l", 1)]
    s2 = slots.after_install(s1, "l", "l.2", 2, now=200, grace=30)
    assert s2 == [slots.Slot("l.2", "l", 2), slots.Slot("l.1", "l", 1, 230)]
    assert slots.next_expiry(s2) == 230
    assert slots.expire(s2, 229.9) == s2
    assert slots.expire(s2, 230) == [slots.Slot("l.2", "l", 2)]
    # A third rotation drops epoch 1 even within its grace: only the previous epoch is kept.
    s3 = slots.after_install(s2, "l", "l.3", 3, now=210, grace=30)
    assert [s.identity for s in s3] == ["l.3", "l.2"]


def test_zero_grace_and_reinstall() -> None:
    s1 = slots.after_install([], "l", "l.1", 1, now=0, grace=0)
    assert slots.after_install(s1, "l", "l.2", 2, now=1, grace=0) == [slots.Slot("l.2", "l", 2)]
    assert slots.after_install(s1, "l", "l.1", 1, now=1, grace=30) == s1


def test_links_are_independent_and_current_ones_come_first() -> None:
    s = slots.after_install([], "a", "a.1", 1, now=0, grace=10)
    s = slots.after_install(s, "a", "a.2", 2, now=1, grace=10)
    s = slots.after_install(s, "b", "b.1", 1, now=2, grace=10)
    assert [x.identity for x in s] == ["a.2", "b.1", "a.1"]
    erased = slots.after_erase(s, "a", now=3)
    assert [x.identity for x in erased] == ["b.1"]


def test_slot_bookkeeping_round_trips_and_rejects_garbage() -> None:
    s = [slots.Slot("a.2", "a", 2), slots.Slot("a.1", "a", 1, 12.5)]
    assert slots.loads(slots.dumps(s)) == s
    for bad in (
        b"[]",
        b'{"version": 2, "slots": []}',
        b'{"version": 1, "slots": [{"identity": 1}]}',
    ):
        with pytest.raises(ValueError):
            slots.loads(bad)


def test_placeholders_are_random_and_replaced_by_a_real_install() -> None:
    (p1, k1), (p2, k2) = slots.placeholder(), slots.placeholder()
    assert p1.identity != p2.identity and k1 != k2 and len(k1) == 32
    assert slots.after_install([p1], "l", "l.1", 1, now=0, grace=5) == [slots.Slot("l.1", "l", 1)]
