"""Pure rules: object IDs, wrap-around, retention plans, label templates, token URIs."""

from __future__ import annotations

import pytest
from qkdagent_hsm import naming
from qkdagent_hsm.naming import Existing
from qkdagent_hsm.uri import TokenSelector, UriError, parse_uri


def test_epoch_ids_equal_the_epoch_while_they_fit() -> None:
    assert naming.epoch_id(1, 8) == (1).to_bytes(8, "big")
    assert naming.epoch_id(1000, 2) == b"\x03\xe8"


def test_two_byte_ids_skip_zero_and_all_ones() -> None:
    assert naming.epoch_id(0xFFFE, 2) == b"\xff\xfe"
    assert naming.epoch_id(0xFFFF, 2) == b"\x00\x01"  # wraps to 1, never 0xFFFF or 0x0000
    assert naming.epoch_id(0, 2) == b"\xff\xfe"
    values = {naming.epoch_id(e, 1) for e in range(1, 1000)}
    assert b"\x00" not in values and b"\xff" not in values and len(values) == 254


def test_newest_uses_serial_arithmetic_across_the_wrap() -> None:
    ids = [naming.epoch_id(e, 1) for e in (253, 254, 255, 256)]  # 253, 254, 1, 2
    assert naming.newest(reversed(ids)) == naming.epoch_id(256, 1)
    assert naming.newest([]) is None
    assert naming.serial_newer(b"\x01", b"\xfe")
    assert not naming.serial_newer(b"\xfe", b"\x01")


def test_keep_window_lists_newest_first() -> None:
    assert naming.keep_window(5, 3, 8) == [naming.epoch_id(e, 8) for e in (5, 4, 3)]
    assert naming.keep_window(1, 3, 8) == [naming.epoch_id(e, 8) for e in (1, 0)]


def test_retention_must_fit_half_the_id_space() -> None:
    assert naming.check_retention(2, 1) is None
    assert "too large" in (naming.check_retention(127, 1) or "")
    assert naming.check_retention(0, 8) == "must be at least 1"


def _obj(label: str, epoch: int) -> Existing:
    return Existing(label, naming.epoch_id(epoch, 8), object())


def test_plan_keeps_window_and_destroys_the_rest() -> None:
    old, prev, dup, stray = _obj("b", 1), _obj("b", 4), _obj("b", 4), _obj("b", 9)
    plan = naming.plan_rotation(
        [old, prev, dup, stray],
        label="b",
        retired_label=None,
        keep=naming.keep_window(5, 2, 8),
        same_secret=None,
    )
    assert plan.create
    assert set(map(id, plan.destroy)) == {id(old), id(dup), id(stray)}
    assert plan.relabel == ()


def test_plan_is_idempotent_and_replaces_a_different_secret() -> None:
    current, other = _obj("b", 5), _obj("b", 5)
    keep = naming.keep_window(5, 2, 8)
    plan = naming.plan_rotation(
        [current, other], label="b", retired_label=None, keep=keep, same_secret=current
    )
    assert not plan.create and plan.destroy == (other,)
    plan = naming.plan_rotation(
        [current], label="b", retired_label=None, keep=keep, same_secret=None
    )
    assert plan.create and plan.destroy == (current,)


def test_plan_relabels_retained_objects_when_asked() -> None:
    prev, retired = _obj("b", 4), _obj("b.old", 3)
    plan = naming.plan_rotation(
        [prev, retired],
        label="b",
        retired_label="b.old",
        keep=naming.keep_window(5, 3, 8),
        same_secret=None,
    )
    assert plan.relabel == (prev,) and plan.destroy == ()


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{peer}", None),
        ("qkd/{local}-{peer}/{link}", None),
        ("{host}", "unknown placeholder {host}"),
        ("{peer!r}", "format spec or conversion"),
        ("{peer:>10}", "format spec or conversion"),
        ("{peer", "not a valid template"),
    ],
)
def test_templates(template: str, problem: str | None) -> None:
    found = naming.check_template(template)
    assert (found is None) if problem is None else (problem in (found or ""))


def test_labels_are_checked_in_utf8_bytes() -> None:
    assert naming.check_label("ä" * 20, 40, "label") is None
    assert "41 bytes" in (naming.check_label("ä" * 20 + "x", 40, "label") or "")
    assert "control" in (naming.check_label("a\nb", 40, "label") or "")


def test_link_labels_fixed_label_wins_and_retired_wraps_it() -> None:
    labels = naming.link_labels(
        "{peer}", naming.DEFAULT_RETIRED_LABEL, {"l2": "hsm.x"}, link="l1", peer="bob", local="a"
    )
    assert labels == naming.LinkLabels("bob", "bob.old") and labels.all() == ("bob", "bob.old")
    fixed = naming.link_labels("{peer}", None, {"l2": "hsm.x"}, link="l2", peer="bob", local="a")
    assert fixed == naming.LinkLabels("hsm.x", None) and fixed.all() == ("hsm.x",)


def test_check_links_finds_clashes_across_current_and_retired_labels() -> None:
    pair = naming.LinkLabels
    assert naming.check_links({"a": pair("x", "x.old"), "b": pair("y", "y.old")}, 40) is None
    assert "'a' and 'b' both map to label 'x'" in (
        naming.check_links({"a": pair("x", "x.old"), "b": pair("x", "x.old")}, 40) or ""
    )
    assert "both map to label 'x.old'" in (
        naming.check_links({"a": pair("x", "x.old"), "b": pair("x.old", "x.old.old")}, 40) or ""
    )
    assert "equals its label" in (naming.check_links({"a": pair("x", "x")}, 40) or "")
    assert "retired_label for link 'a'" in (naming.check_links({"a": pair("x", "x" * 9)}, 8) or "")
    assert naming.label_clash({"x": "a"}, "a", pair("x", None)) is None


def test_identity_string() -> None:
    assert naming.identity("hsm.isp.net", b"\x16\x2e") == "pkcs:object=hsm.isp.net;id=162e"


def test_uri_parsing() -> None:
    parsed = parse_uri("pkcs11:token=My%20Token;manufacturer=SoftHSM%20project;slot-id=3")
    assert parsed.selector == TokenSelector(
        label="My Token", manufacturer="SoftHSM project", slot_id=3
    )
    assert parsed.module_path is None
    assert parse_uri("PKCS11:serial=abc?module-path=/x.so").module_path == "/x.so"
    sel = parse_uri("pkcs11:token=a;serial=s1").selector
    assert sel.matches(label="a", manufacturer="m", serial="s1", model="x", slot_id=0)
    assert not sel.matches(label="a", manufacturer="m", serial="s2", model="x", slot_id=0)


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("pkcs12:token=a", "must start with"),
        ("pkcs11:", "selects no token"),
        ("pkcs11:token=a;object=k", "names an object"),
        ("pkcs11:token=a;token=b", "given twice"),
        ("pkcs11:token=a?pin-value=1234", "pin-value"),
        ("pkcs11:token=a?pin-source=file:/p", "pin-source"),
        ("pkcs11:token=a;colour=red", "unknown path attribute"),
        ("pkcs11:slot-id=x", "decimal"),
        ("pkcs11:slot-id=\u00b2", "decimal"),  # isdigit() passes it, int() refuses it
        ("pkcs11:slot-id=" + "9" * 5000, "decimal"),  # over int()'s digit limit
        ("pkcs11:token", "not name=value"),
        ("pkcs11:token=%ff", "UTF-8"),
    ],
)
def test_bad_uris(uri: str, problem: str) -> None:
    with pytest.raises(UriError, match=problem):
        parse_uri(uri)
