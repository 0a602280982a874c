"""The published hybrid vectors (tests/vectors/hybrid-*.json: a QKD key + an ML-KEM secret per
rotation) against the real code: the `mlkem` source decapsulates every vector's ciphertext with
the vector's seed and answers the vector's next public key; an independent implementation of
the key schedule (tests/vectors/README.md, `hmac` and `hashlib` only) gives the vectors' outputs;
and two real agents install what that schedule gives for their own epoch 1."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from qkdagent_pqc import kem
from qkdagent_pqc.source import MlkemSource

from qkdagent import Link, write_secret_file
from qkdagent.testing import ManInTheMiddle, build_component, open_agent_pair

from .conftest import StaticKeys

VECTORS = Path(__file__).resolve().parents[3] / "tests" / "vectors"
FILES = sorted(VECTORS.glob("hybrid-*.json"))
CASES = [
    pytest.param(case, id=f"{path.stem}-{n}")
    for path in FILES
    for n, case in enumerate(json.loads(path.read_text())["cases"])
]


def test_both_parameter_sets_have_vectors() -> None:
    sets = {c.values[0]["mlkem"]["parameter_set"] for c in CASES}  # type: ignore[index]
    assert sets == set(kem.PARAMETER_SETS)


def _enc(data: bytes | str) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return len(raw).to_bytes(4, "big") + raw


def _expand32(prk: bytes, info: bytes) -> bytes:
    return hmac.new(prk, info + b"\x01", hashlib.sha3_256).digest()


def chain_start(bootstrap: bytes, link: str) -> tuple[bytes, bytes]:
    prk = hmac.new(b"qkdagent v1 bootstrap", bootstrap, hashlib.sha3_256).digest()
    return (
        _expand32(prk, _enc("qkdagent v1 bootstrap chain") + _enc(link)),
        _expand32(prk, _enc("qkdagent v1 bootstrap auth") + _enc(link)),
    )


def rotate(
    chain: bytes,
    header: tuple[str, str, str, int],
    sources: list[tuple[str, str, bytes]],
    nonces: tuple[bytes, bytes],
    labels: list[str],
    answers: list[tuple[str, bytes]],
) -> dict[str, Any]:
    """One epoch of the schedule, written from tests/vectors/README.md."""
    link, initiator, responder, epoch = header
    count = len(sources).to_bytes(4, "big")
    prk = hmac.new(
        chain,
        count + b"".join(_enc(n) + _enc(i) + _enc(k) for n, i, k in sources),
        hashlib.sha3_256,
    ).digest()
    t = hashlib.sha3_256(
        _enc("qkdagent v2 transcript")
        + _enc(link)
        + _enc(initiator)
        + _enc(responder)
        + epoch.to_bytes(8, "big")
        + count
        + b"".join(_enc(n) + _enc(i) for n, i, _ in sources)
        + _enc(nonces[0])
        + _enc(nonces[1])
        + len(labels).to_bytes(4, "big")
        + b"".join(_enc(label) for label in sorted(labels))
        + len(answers).to_bytes(4, "big")
        + b"".join(_enc(n) + _enc(a) for n, a in answers)
    ).digest()
    conf = _expand32(prk, _enc("qkdagent v1 confirm") + t)
    return {
        "transcript_hash": t.hex(),
        "chain_key": _expand32(prk, _enc("qkdagent v1 chain") + t).hex(),
        "auth_key": _expand32(prk, _enc("qkdagent v1 auth") + t).hex(),
        "confirm_key": conf.hex(),
        "confirm_initiator": hmac.new(
            conf, _enc("qkdagent v1 confirm initiator") + t, hashlib.sha3_256
        ).hexdigest(),
        "confirm_responder": hmac.new(
            conf, _enc("qkdagent v1 confirm responder") + t, hashlib.sha3_256
        ).hexdigest(),
        "outputs": {
            label: _expand32(prk, _enc("qkdagent v1 sink") + _enc(label) + t).hex()
            for label in labels
        },
    }


@pytest.mark.parametrize("case", CASES)
async def test_the_source_decapsulates_and_answers_as_the_vectors_say(
    case: dict[str, Any], tmp_path: Path
) -> None:
    fixed = case["mlkem"]
    params = kem.PARAMETER_SETS[fixed["parameter_set"]]
    key_file = tmp_path / "static.key"
    write_secret_file(key_file, base64.b64encode(bytes.fromhex(fixed["static_seed"])))
    public = base64.b64encode(bytes.fromhex(fixed["static_public"])).decode()
    table = {
        "parameter_set": params.name,
        "private_key": {"file": str(key_file)},
        "peer_public_keys": {case["initiator"]: public},
    }
    bob = Link(case["link"], case["responder"], case["initiator"], False)
    alice = Link(case["link"], case["initiator"], case["responder"], True)
    responder = build_component(MlkemSource, table, links=(bob,), agent=case["responder"])
    initiator = build_component(MlkemSource, table, links=(alice,), agent=case["initiator"])
    assert responder.static_fingerprint == kem.b64url(bytes.fromhex(fixed["static_fingerprint"]))
    state: bytes | None = None  # epoch 1: the static key
    for ep in case["epochs"]:
        pqc = next(s for s in ep["sources"] if s["source"] == fixed["source"])
        mlkem = ep["mlkem"]
        fp, ciphertext = kem.parse_key_id(params, pqc["key_id"])
        assert (fp.hex(), ciphertext.hex()) == (mlkem["public_fingerprint"], mlkem["ciphertext"])
        assert (state or bytes.fromhex(fixed["static_seed"])).hex() == mlkem["decapsulation_seed"]
        next_seed = bytes.fromhex(mlkem["next_seed"])
        responder._generate = lambda seed=next_seed: params.private_key(seed)  # type: ignore[misc]
        answered = await responder.answer(bob, pqc["key_id"], state)
        assert answered.key.value.reveal().hex() == pqc["key"]
        assert answered.key.key_id == pqc["key_id"]
        assert [{"source": fixed["source"], "answer": answered.answer.hex()}] == ep["answers"]
        assert answered.state == next_seed
        # the initiator keeps that public key; the next epoch's ciphertext is made for it
        kept = await initiator.accept_answer(alice, answered.answer, None)
        assert kept == answered.answer
        following = case["epochs"][ep["epoch"] :]
        if following:
            assert (
                kem.fingerprint(params, kept).hex() == following[0]["mlkem"]["public_fingerprint"]
            )
        state = answered.state


@pytest.mark.parametrize("case", CASES)
def test_the_documented_schedule_gives_the_vectors_outputs(case: dict[str, Any]) -> None:
    chain, auth = chain_start(bytes.fromhex(case["bootstrap"]), case["link"])
    assert (chain.hex(), auth.hex()) == (case["c0"], case["a0"])
    header = (case["link"], case["initiator"], case["responder"])
    for ep in case["epochs"]:
        got = rotate(
            chain,
            (*header, ep["epoch"]),
            [(s["source"], s["key_id"], bytes.fromhex(s["key"])) for s in ep["sources"]],
            (bytes.fromhex(ep["initiator_nonce"]), bytes.fromhex(ep["responder_nonce"])),
            case["labels"],
            [(a["source"], bytes.fromhex(a["answer"])) for a in ep["answers"]],
        )
        for name, value in got.items():
            assert ep[name] == value, f"epoch {ep['epoch']}: {name}"
        chain = bytes.fromhex(got["chain_key"])


async def test_real_agents_install_what_the_documented_schedule_gives(
    tmp_path: Path, static_keys: StaticKeys, autojump_clock: trio.testing.MockClock
) -> None:
    """Epoch 1 of a real pqc-only pair, recomputed from the bootstrap, the messages on the wire
    and bob's static seed: the vectors' recipe is what the agents do."""
    sides = {
        name: {
            "plugins": ["pqc", "memory"],
            "sources": {"pqc": static_keys.table(name)},
            "sinks": {"rec": {"type": "recording"}},
        }
        for name in ("alice", "bob")
    }
    link = {"interval": 10, "reject_after": 600, "jitter": 0}
    async with open_agent_pair(tmp_path, **sides, link=link, local=True) as pair:
        mitm = ManInTheMiddle.on(pair, "bob")
        await pair.wait_for_epoch(1, timeout=60)
        rotate_1 = next(e for e in mitm.requests("rotate") if json.loads(e.body)["epoch"] == 1)
        installed = pair.secret("alice", "rec").reveal()
        assert installed == pair.secret("bob", "rec").reveal()
        bootstrap_file = Path(pair.configs["alice"]["links"]["alice-bob"]["bootstrap"]["file"])
    request = json.loads(rotate_1.body)
    assert rotate_1.reply is not None
    reply = json.loads(rotate_1.reply.body)
    [(source, key_id)] = request["keys"]
    params = kem.PARAMETER_SETS[kem.DEFAULT]
    seed = base64.b64decode(static_keys.files["bob"].read_bytes())
    _, ciphertext = kem.parse_key_id(params, key_id)
    secret = params.private_key(seed).decapsulate(ciphertext)
    chain, _ = chain_start(base64.b64decode(bootstrap_file.read_bytes()), "alice-bob")
    got = rotate(
        chain,
        ("alice-bob", "alice", "bob", 1),
        [(source, key_id, secret)],
        (base64.b64decode(request["nonce"]), base64.b64decode(reply["nonce"])),
        request["labels"],
        [(n, base64.b64decode(a)) for n, a in reply["answers"]],
    )
    assert request["labels"] == ["recording"]  # a sink's label defaults to its type
    assert got["outputs"]["recording"] == installed.hex()
