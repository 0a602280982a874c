"""Pure logic: key checks, the UAPI text protocol, outcome comparison, broker request checks."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from qkdagent_wireguard.backend import BackendError, Op, Outcome, compare
from qkdagent_wireguard.broker import (
    Broker,
    Credentials,
    decode_request,
    encode_request,
    parse_allow,
)
from qkdagent_wireguard.keys import check_ifname, check_psk, parse_public_key
from qkdagent_wireguard.sink import WireGuardSink
from qkdagent_wireguard.uapi import (
    FIND_LIMIT,
    build_set,
    judge,
    locate,
    parse_errno,
    parse_get,
    split_reply,
)

from qkdagent import ConfigError
from qkdagent.testing import build_component

PEER = os.urandom(32)
PEER_B64 = base64.b64encode(PEER).decode()


def test_psk_must_be_32_nonzero_bytes() -> None:
    key = os.urandom(32)
    assert check_psk(key) == key
    with pytest.raises(ValueError, match="exactly 32"):
        check_psk(b"\x01" * 31)
    with pytest.raises(ValueError, match="all-zero"):
        check_psk(bytes(32))


def test_public_key_is_strict_base64_of_32_bytes() -> None:
    assert parse_public_key(PEER_B64) == PEER
    with pytest.raises(ValueError, match="base64"):
        parse_public_key(PEER_B64[:-2] + "!!")
    with pytest.raises(ValueError, match="16 bytes"):
        parse_public_key(base64.b64encode(bytes(16)).decode())


@pytest.mark.parametrize("name", ["", "a" * 16, "wg/0", "wg 0", "wg:0", ".."])
def test_bad_interface_names(name: str) -> None:
    assert check_ifname(name) is not None


def test_set_request_is_psk_only_update() -> None:
    key = os.urandom(32)
    request = bytes(build_set([Op(PEER, key, True), Op(os.urandom(32), key, False)]))
    assert request == (
        b"set=1\npublic_key=" + PEER.hex().encode() + b"\nupdate_only=true\n"
        b"preshared_key=" + key.hex().encode() + b"\n\n"
    )
    assert b"allowed_ip" not in request and b"endpoint" not in request


def test_get_reply_parsing_and_errno() -> None:
    other = os.urandom(32)
    key = os.urandom(32)
    reply = (
        f"private_key={'11' * 32}\nlisten_port=51820\n"
        f"public_key={PEER.hex()}\npreshared_key={key.hex()}\nallowed_ip=10.0.0.2/32\n"
        f"public_key={other.hex()}\npreshared_key={'00' * 32}\n"
        "errno=0\n\n"
    ).encode()
    end, code = split_reply(reply)
    body = reply[:end]
    assert code == 0 and body.endswith(
        b"allowed_ip=10.0.0.2/32\n"
        + f"public_key={other.hex()}\npreshared_key={'00' * 32}\n".encode()
    )
    assert parse_get(body) == {PEER: key, other: None}
    assert parse_get(bytearray(reply), end) == {PEER: key, other: None}  # in place, bounded
    assert split_reply(b"errno=0\n\n") == (0, 0)
    two = bytearray(reply + b"errno=-22\n\n")  # a second reply in the same buffer
    assert split_reply(two, len(reply)) == (len(reply), -22)
    assert parse_errno(b"errno=-22\n\n") == -22
    for garbage in (b"garbage\n\n", b"errno=x\n\n", b"errno=0\n"):
        with pytest.raises(BackendError):
            parse_errno(garbage)
    for bad in ("zz", "ab" * 31, "ab" * 33, "zz" * 32):
        with pytest.raises(BackendError, match="malformed"):
            parse_get(f"public_key={PEER.hex()}\npreshared_key={bad}\n".encode())
    # only whole lines count: a key that merely ends another line is not a peer
    assert locate(b"xpublic_key=" + PEER.hex().encode() + b"\n", PEER) is None
    assert locate(body, other) is not None and locate(body, os.urandom(32)) is None


def test_judge_writes_need_the_peer_listed_and_reads_compare() -> None:
    key, other, absent = os.urandom(32), os.urandom(32), os.urandom(32)
    body = (
        f"private_key={'11' * 32}\npublic_key={PEER.hex()}\npreshared_key={'00' * 32}\n"
        f"public_key={other.hex()}\npreshared_key={key.hex()}\n"
    ).encode()
    ops = [Op(PEER, os.urandom(32), True), Op(other, key, False), Op(absent, key, True)]
    expected = [Outcome.MATCH, Outcome.MATCH, Outcome.NO_PEER]
    assert judge(ops, body) == expected
    many = ops + [Op(os.urandom(32), key, False) for _ in range(FIND_LIMIT)]  # regex path
    assert judge(many, body) == expected + [Outcome.NO_PEER] * FIND_LIMIT
    assert judge([Op(other, os.urandom(32), False), Op(PEER, key, False)], body) == [
        Outcome.MISMATCH,
        Outcome.NO_PSK,
    ]


def test_compare_outcomes() -> None:
    key, other = os.urandom(32), os.urandom(32)
    held = {PEER: key, other: None}
    ops = [
        Op(PEER, key, True),
        Op(PEER, os.urandom(32), False),
        Op(other, key, False),
        Op(os.urandom(32), key, False),
    ]
    assert compare(ops, held) == [
        Outcome.MATCH,
        Outcome.MISMATCH,
        Outcome.NO_PSK,
        Outcome.NO_PEER,
    ]


def test_op_repr_hides_key() -> None:
    key = os.urandom(32)
    assert key.hex() not in repr(Op(PEER, key, True))


def _options(tmp_path: Path, **table: object) -> WireGuardSink:
    return build_component(WireGuardSink, table, name="wg", agent="test", state_dir=tmp_path)


def test_config_reading(tmp_path: Path) -> None:
    sink = _options(tmp_path, interface="wg0", peer_public_key=PEER_B64, backend="uapi")
    assert (sink.interface, sink.peer, sink.backend_kind) == ("wg0", PEER, "uapi")
    assert sink.uapi_dir == Path("/run/wireguard")
    with pytest.raises(ConfigError, match=r"sinks\.wg\.backend"):
        _options(tmp_path, interface="wg0", peer_public_key=PEER_B64, backend="wg-quick")
    with pytest.raises(ConfigError, match=r"sinks\.wg\.peer_public_key.*base64"):
        _options(tmp_path, interface="wg0", peer_public_key="not a key")
    with pytest.raises(ConfigError, match=r"sinks\.wg\.interface"):
        _options(tmp_path, interface="wg/0", peer_public_key=PEER_B64)
    with pytest.raises(ConfigError, match=r"sinks\.wg\.allowed_ips.*not a known option"):
        _options(tmp_path, interface="wg0", peer_public_key=PEER_B64, allowed_ips=["x"])


def test_broker_request_round_trip_and_validation() -> None:
    key = os.urandom(32)
    body = encode_request("wg0", [Op(PEER, key, True)])
    assert decode_request(body) == ("wg0", [Op(PEER, key, True)])
    bad_cases = [
        ({**body, "v": 2}, "version"),
        ({**body, "interface": "wg/0"}, "interface"),
        ({**body, "ops": []}, "ops"),
        ({**body, "ops": [{"peer": PEER_B64, "key": "00" * 32, "write": True}]}, "non-zero"),
        ({**body, "ops": [{"peer": PEER_B64, "key": "ab" * 31, "write": True}]}, "32"),
        ({**body, "ops": [{"peer": "x", "key": key.hex(), "write": True}]}, "peer"),
        ({**body, "ops": [{"peer": PEER_B64, "key": key.hex(), "write": "yes"}]}, "boolean"),
        ({**body, "ops": body["ops"] * 2}, "twice"),  # type: ignore[operator]
    ]
    for bad, words in bad_cases:
        with pytest.raises(Exception, match=words):
            decode_request(bad)


class _Recorder:
    name = "fake"

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Op]]] = []

    timeout = 1.0

    def exchange(self, interface: str, ops: list[Op]):  # type: ignore[no-untyped-def]
        self.calls.append((interface, list(ops)))
        return [Outcome.MATCH for _ in ops]
        yield  # a generator that never waits

    def close(self) -> None:
        pass


def test_broker_policy_checks_credentials_and_allow_list() -> None:
    backend = _Recorder()
    allow = parse_allow([f"wg0:{PEER_B64}"])
    broker = Broker(backend, allow, uids=frozenset({1000}), gids=frozenset({2000}))
    key = os.urandom(32)
    body = encode_request("wg0", [Op(PEER, key, True)])
    assert broker.handle(body, Credentials(1, 1000, 1000)) == {"ok": True, "outcomes": ["match"]}
    assert broker.handle(body, Credentials(1, 3000, 2000))["ok"] is True
    refused = broker.handle(body, Credentials(1, 0, 0))
    assert refused["ok"] is False and "uid 0" in str(refused["error"])
    other_peer = encode_request("wg0", [Op(os.urandom(32), key, True)])
    assert "allow list" in str(broker.handle(other_peer, Credentials(1, 1000, 1))["error"])
    other_iface = encode_request("wg1", [Op(PEER, key, True)])
    assert "allow list" in str(broker.handle(other_iface, Credentials(1, 1000, 1))["error"])
    assert len(backend.calls) == 2
    assert key.hex() not in repr(broker.handle(other_peer, Credentials(1, 1000, 1)))


def test_parse_allow_rejects_bad_entries() -> None:
    with pytest.raises(ValueError, match="INTERFACE:PEER"):
        parse_allow(["wg0"])
    with pytest.raises(ValueError, match="peer key"):
        parse_allow(["wg0:abc"])


def test_genl_set_message_carries_only_key_psk_and_update_only() -> None:
    import struct

    from qkdagent_wireguard import genl

    key = os.urandom(32)
    attrs = bytes(genl.set_psk_attrs("wg0", [(PEER, key)]))
    top = list(genl.iter_nlas(attrs))
    assert [kind for kind, _ in top] == [genl.WGDEVICE_A_IFNAME, genl.WGDEVICE_A_PEERS]
    assert bytes(top[0][1]) == b"wg0\x00"
    (peer,) = [value for _, value in genl.iter_nlas(top[1][1])]
    fields = {kind: bytes(value) for kind, value in genl.iter_nlas(peer)}
    assert fields == {
        genl.WGPEER_A_PUBLIC_KEY: PEER,
        genl.WGPEER_A_PRESHARED_KEY: key,
        genl.WGPEER_A_FLAGS: struct.pack("=I", genl.WGPEER_F_UPDATE_ONLY),
    }


def test_genl_device_parsing() -> None:
    from qkdagent_wireguard import genl

    key, other = os.urandom(32), os.urandom(32)

    def peer(index: int, public: bytes, psk: bytes) -> bytes:
        body = genl.nla(genl.WGPEER_A_PUBLIC_KEY, public)
        return genl.nla(index, body + genl.nla(genl.WGPEER_A_PRESHARED_KEY, psk))

    peers = genl.nla(
        genl.WGDEVICE_A_PEERS | genl.NLA_F_NESTED, peer(0, PEER, key) + peer(1, other, bytes(32))
    )
    found: dict[bytes, bytes | None] = {}
    genl.parse_device(memoryview(genl.nla(genl.WGDEVICE_A_IFNAME, b"wg0\x00") + peers), found)
    assert found == {PEER: key, other: None}
    with pytest.raises(OSError, match="malformed"):
        list(genl.iter_nlas(b"\xff\x00\x01\x00abcd"))


def test_netlink_without_kernel_wireguard_is_a_clear_error() -> None:
    from qkdagent_wireguard.netlink import NetlinkBackend

    backend = NetlinkBackend()
    try:
        backend.read("wg-none0")
    except BackendError as exc:  # the usual case here: no WireGuard family (ENOENT)
        assert "ENOENT" in str(exc) or "ENODEV" in str(exc)
    else:  # pragma: no cover - a host with kernel WireGuard but no such interface
        raise AssertionError("reading a missing interface must fail")
    finally:
        backend.close()


@pytest.mark.parametrize("name", ["site-a.toml", "site-b.toml", "gateway.toml"])
def test_example_configs_have_valid_wireguard_sinks(name: str, tmp_path: Path) -> None:
    import tomllib

    path = Path(__file__).resolve().parents[3] / "contrib" / "wireguard" / name
    config = tomllib.loads(path.read_text())
    sinks = {k: v for k, v in config["sinks"].items() if v.get("type") == "wireguard"}
    assert sinks and "wireguard" in config["agent"]["plugins"]
    for sink_name, table in sinks.items():
        sink = build_component(
            WireGuardSink, table, name=sink_name, agent="example", state_dir=tmp_path
        )
        assert len(sink.peer) == 32
        assert any(sink_name in link["sinks"] for link in config["links"].values())
