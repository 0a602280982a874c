"""Pure decisions and option validation, without a daemon."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from qkdagent_strongswan import StrongswanPpkSink
from qkdagent_strongswan.config import PpkConfig, check_ppk_id
from qkdagent_strongswan.logic import (
    Outcome,
    ReauthTracker,
    flatten_sas,
    link_versions,
    make_before_break_setting,
    names,
    newest_uid,
    parse_conn_message,
    parse_uid,
    ppk_in_effect,
    should_reauth,
    stale_versions,
    version_at_least,
    with_ppk_id,
)

from qkdagent import ConfigError, Link, Options
from qkdagent.testing import build_component

INITIATOR = Link("ab", "alice", "bob", True)
RESPONDER = Link("ab", "bob", "alice", False)


def config(**table: Any) -> PpkConfig:
    table.setdefault("ppk_id", "qkd-gw")
    opts = Options(table, where="sinks.ppk")
    cfg = PpkConfig.read(opts)
    opts.finish()
    return cfg


def test_defaults() -> None:
    cfg = config()
    assert cfg.socket == Path("/var/run/charon.vici")
    assert cfg.secret_id == "qkdagent-{link}"
    assert cfg.ike is None and cfg.reauth == "off"
    assert cfg.erase == "unload" and not cfg.versioned
    assert config(ike="gw").reauth == "responder"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"ppk_id": "a@b"}, "sinks.ppk.ppk_id: may only contain"),
        ({"ppk_id": "a:b"}, "may only contain"),
        ({"ppk_id": "x{peer}"}, "uses unknown placeholder"),
        ({"secret_id": "id with space"}, "sinks.ppk.secret_id: may only contain"),
        ({"reauth": "responder"}, "needs `ike`"),
        ({"reauth": "initiator", "ike": "gw"}, "must be one of"),
        ({"erase": "zero"}, "must be one of"),
        ({"conn_file": "x.json", "ike": "gw"}, "only used with `versioned = true`"),
        ({"conn_file": "x.json", "versioned": True}, "needs `ike`"),
        ({"check_interval": 0}, "must be at least"),
        ({"bogus": 1}, "is not a known option"),
    ],
)
def test_bad_options_name_the_key(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(**table)


def test_missing_ppk_id_is_required() -> None:
    with pytest.raises(ConfigError, match=r"sinks\.ppk\.ppk_id: is required"):
        PpkConfig.read(Options({}, where="sinks.ppk"))


def test_check_ppk_id() -> None:
    assert check_ppk_id("qkd-gw_1.2") is None
    assert check_ppk_id("") is not None
    assert check_ppk_id("x" * 201) is not None
    assert check_ppk_id("CN=x") is not None


def test_names_fixed_and_versioned() -> None:
    fixed = names(config(ppk_id="qkd-{link}"), INITIATOR, "ppk", 7)
    assert (fixed.secret_id, fixed.ppk_id) == ("qkdagent-ab", "qkd-ab")
    versioned = names(config(ppk_id="qkd", versioned=True), INITIATOR, "ppk", 7)
    assert (versioned.secret_id, versioned.ppk_id) == ("qkdagent-ab-7", "qkd-7")
    custom = names(config(secret_id="q-{sink}-{link}"), INITIATOR, "s1", 1)
    assert custom.secret_id == "q-s1-ab"


def test_stale_versions_keep_newest_and_ignore_others() -> None:
    loaded = ["qkdagent-ab-1", "qkdagent-ab-2", "qkdagent-ab-3", "qkdagent-abc-1", "ike", "x-1"]
    assert stale_versions(loaded, "qkdagent-ab-", 3, 2) == ["qkdagent-ab-1"]
    assert stale_versions(loaded, "qkdagent-ab-", 3, 1) == ["qkdagent-ab-1", "qkdagent-ab-2"]
    assert stale_versions(loaded, "qkdagent-ab-", 3, 3) == []
    assert link_versions(loaded, "qkdagent-ab-") == [
        "qkdagent-ab-1",
        "qkdagent-ab-2",
        "qkdagent-ab-3",
    ]


def test_only_the_links_responder_reauthenticates() -> None:
    cfg = config(ike="gw")
    assert should_reauth(cfg, RESPONDER)
    assert not should_reauth(cfg, INITIATOR)
    assert not should_reauth(config(ike="gw", reauth="off"), RESPONDER)
    assert not should_reauth(config(), RESPONDER)


def sa(uid: str, state: str, ppk: str | None = "yes") -> dict[str, object]:
    out: dict[str, object] = {"uniqueid": uid, "state": state}
    if ppk is not None:
        out["ppk"] = ppk
    return out


@pytest.mark.parametrize(
    ("uid", "parsed"), [("7", 7), (7, 7), ("\u00b2", None), ("9" * 5000, None), ("-1", None)]
)
def test_charon_unique_ids(uid: object, parsed: int | None) -> None:
    assert parse_uid(uid) == parsed


def test_tracker_done_when_a_new_sa_is_established() -> None:
    tracker = ReauthTracker(frozenset({"1"}))
    assert tracker.update([sa("1", "ESTABLISHED")]) is Outcome.PENDING
    assert tracker.update([sa("1", "ESTABLISHED"), sa("2", "CONNECTING")]) is Outcome.PENDING
    assert tracker.update([sa("1", "DELETING"), sa("2", "ESTABLISHED")]) is Outcome.DONE
    assert tracker.established == "2" and tracker.ppk == "yes" and not tracker.gap


def test_tracker_failed_when_a_new_sa_vanishes() -> None:
    tracker = ReauthTracker(frozenset({"1"}))
    tracker.note({"ikesa-name": "gw", "ikesa-uniqueid": "5"}, "gw")
    tracker.note({"ikesa-name": "other", "ikesa-uniqueid": "6"}, "gw")
    tracker.note({"ikesa-name": "gw", "ikesa-uniqueid": "1"}, "gw")
    assert tracker.seen == {"5"}
    assert tracker.update([sa("1", "ESTABLISHED")]) is Outcome.FAILED


def test_tracker_notices_break_before_make() -> None:
    tracker = ReauthTracker(frozenset({"1"}))
    assert tracker.update([]) is Outcome.PENDING
    assert tracker.update([sa("2", "ESTABLISHED", ppk=None)]) is Outcome.DONE
    assert tracker.gap and tracker.ppk is None


def test_flatten_sas_decodes_bytes() -> None:
    answer = [{"gw": {"uniqueid": b"3", "state": b"ESTABLISHED", "child-sas": {"c": {}}}}]
    assert flatten_sas(answer) == [
        {"uniqueid": "3", "state": "ESTABLISHED", "child-sas": {"c": {}}, "name": "gw"}
    ]


def test_version_compare() -> None:
    assert version_at_least("6.0.0", (6, 0))
    assert version_at_least("6.0.0dr1", (6, 0))
    assert not version_at_least("5.9.8", (6, 0))
    assert not version_at_least("", (6, 0))


def test_make_before_break_scan() -> None:
    assert make_before_break_setting(["charon {\n  # make_before_break = yes\n}"]) is None
    assert make_before_break_setting(["charon {\n  make_before_break = yes\n}"]) is True
    assert make_before_break_setting(["make_before_break = yes", "make_before_break=no"]) is False


def test_conn_message_validation() -> None:
    good = {"gw": {"version": "2", "local_addrs": ["192.0.2.1"], "children": {"gw": {}}}}
    assert parse_conn_message(json.dumps(good), "gw") == good
    updated = with_ppk_id(good, "gw", "qkd-3")
    assert updated["gw"]["ppk_id"] == "qkd-3" and "ppk_id" not in good["gw"]
    for bad, message in [
        ("{", "not valid JSON"),
        (json.dumps({"other": {}}), "single key 'gw'"),
        (json.dumps({"gw": {"x": True}}), "gw.x: must be a string"),
        (json.dumps({"gw": {"x": [{}]}}), "lists may only hold"),
        (json.dumps({"gw": "text"}), "must be an object"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_conn_message(bad, "gw")


def test_sink_repr_and_no_io_in_constructor(tmp_path: Path) -> None:
    table = {"ppk_id": "qkd-gw", "socket": str(tmp_path / "none.vici")}
    sink = build_component(StrongswanPpkSink, table, name="ppk", state_dir=tmp_path)
    assert "none.vici" in repr(sink) and sink.type_name == "strongswan-ppk"


async def test_unreachable_charon_is_a_sink_error(tmp_path: Path) -> None:
    from qkdagent import KeyMeta, NotInstalled, Secret, SinkError

    table = {"ppk_id": "qkd-gw", "socket": str(tmp_path / "none.vici")}
    sink = build_component(StrongswanPpkSink, table, name="ppk", state_dir=tmp_path)
    with pytest.raises(NotInstalled, match="does not exist"):
        await sink.prepare()
    with pytest.raises(SinkError, match="cannot connect to charon's VICI socket") as info:
        await sink.install(INITIATOR, Secret.random(), KeyMeta(1, ("k",), "ppk", 0.0))
    assert "redacted" not in str(info.value)
    with pytest.raises(SinkError, match="at least 16 bytes"):
        await sink.install(INITIATOR, Secret.random(8), KeyMeta(1, ("k",), "ppk", 0.0))


def test_ppk_in_effect_needs_an_sa_made_after_the_reauth_request() -> None:
    old, new = sa("7", "ESTABLISHED"), sa("9", "ESTABLISHED")
    assert (
        newest_uid([old, sa("x", "ESTABLISHED"), sa("8", "CONNECTING")]) == 8
        and newest_uid([]) == 0
    )
    # no reauthentication requested: only an SA reporting `ppk: no` refutes it
    assert ppk_in_effect([], None) and ppk_in_effect([old, sa("3", "ESTABLISHED", None)], None)
    assert not ppk_in_effect([old, sa("8", "ESTABLISHED", "no")], None)
    # requested (need 8): the old SA with `ppk: yes` does not count, nor does none at all
    assert not ppk_in_effect([old], 8) and not ppk_in_effect([], 8)
    assert not ppk_in_effect([old, sa("8", "CONNECTING")], 8)
    assert ppk_in_effect([old, new], 8) and ppk_in_effect([new], 9)
    assert not ppk_in_effect([new, sa("10", "ESTABLISHED", "no")], 9)
