"""A hostile network between two agents (issue 11): forged, replayed, altered and pathological
messages change nothing but one failed attempt, and never stop an agent. Virtual time."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import trio
import trio.testing

from qkdagent import protocol, ratchet
from qkdagent.secret import Secret
from qkdagent.testing import Exchange, ManInTheMiddle, open_agent_pair, send_as
from tests.helpers import until

REC = {"sinks": {"rec": {"type": "recording"}}}
LINK = {"interval": 10, "reject_after": 600, "jitter": 0, "backoff_max": 5}
DEEP = b"[" * 5000


def _bootstrap_auth(pair) -> Secret:
    """The attacker of these tests does not have this; tests use it to build what only the
    genuine peer could send."""
    path = pair.configs["alice"]["links"]["alice-bob"]["bootstrap"]["file"]
    raw = base64.b64decode(Path(path).read_bytes())
    return ratchet.chain_start(Secret(raw), "alice-bob").auth_key


def _status(pair, name: str) -> dict:
    return pair.agents[name].link("alice-bob").describe()


def _unauthenticated(pair, name: str) -> float:
    metric = pair.agents[name].metrics.unauthenticated_refusals
    return metric.labels("alice-bob").get()


async def test_deeply_nested_replies_fail_one_attempt_and_the_agent_lives(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_agent_pair(tmp_path, alice=REC, bob=REC, link=LINK, local=True) as pair:
        await pair.wait_for_epoch(1, timeout=60)
        mitm = ManInTheMiddle.on(pair, "bob")
        answers = iter([409, 200, 400, 409, 200])

        async def nested(exchange: Exchange) -> object:
            status = next(answers, None)
            if status is None:
                return await exchange.forward()
            return exchange.forged(status, DEEP)

        mitm.tamper = nested
        epoch = pair.epoch("alice")
        await until(lambda: pair.epoch("alice") > epoch)
        assert len(mitm.log) >= 6  # five pathological answers, then the genuine exchange
        status = _status(pair, "alice")
        assert status["failures"] >= 5 and pair.epoch("bob") == pair.epoch("alice")
        assert pair.secret("alice", "rec") == pair.secret("bob", "rec")


async def test_deeply_nested_requests_are_refused_with_400(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_agent_pair(tmp_path, alice=REC, bob=REC, link=LINK, local=True) as pair:
        await pair.wait_for_epoch(1, timeout=60)
        url = f"https://{pair.configs['bob']['agent']['listen']}"
        for action in ("rotate", "resync", "commit"):
            for body in (DEEP, b'{"a":' * 3000, b"[" * 100 + b"]" * 100):
                reply = await send_as(pair.network, "alice", url, "alice-bob", action, body)
                assert reply.status == 400, (action, body[:10], reply)
        epoch = pair.epoch("bob")
        await pair.wait_for_epoch(epoch + 1, timeout=60)  # and bob goes on rotating


async def test_a_forged_epoch_hint_neither_resyncs_nor_strands_the_link(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_agent_pair(tmp_path, alice=REC, bob=REC, link=LINK, local=True) as pair:
        await pair.wait_for_epoch(2, timeout=60)
        mitm = ManInTheMiddle.on(pair, "bob")
        hints = iter([2**62 - 3, 0, 2**62 - 3, 0])

        async def forge(exchange: Exchange) -> object:
            hint = next(hints, None) if exchange.action == "rotate" else None
            if hint is None:
                return await exchange.forward()
            body = json.dumps({"error": "epoch", "epoch": hint, "message": "x"}).encode()
            return exchange.forged(409, body)

        mitm.tamper = forge
        epoch = pair.epoch("alice")
        await until(lambda: pair.epoch("alice") > epoch)
        assert not mitm.requests("resync")  # no forged hint made alice resynchronise
        assert pair.epoch("alice") == pair.epoch("bob") == epoch + 1  # the chain just went on
        assert _unauthenticated(pair, "alice") == 4
        assert "without an authenticated refusal" in (_status(pair, "alice")["last_error"] or "")


async def test_a_genuine_refusal_of_an_altered_request_is_not_believed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The attacker alters alice's rotate on its way, so bob's (authentic) refusal answers a
    request alice never sent: bound to the body's digest, it changes nothing."""
    async with open_agent_pair(tmp_path, alice=REC, bob=REC, link=LINK, local=True) as pair:
        await pair.wait_for_epoch(2, timeout=60)
        mitm = ManInTheMiddle.on(pair, "bob")
        altered = 0

        async def alter(exchange: Exchange) -> object:
            nonlocal altered
            if exchange.action != "rotate" or altered >= 3:
                return await exchange.forward()
            altered += 1
            fields = json.loads(exchange.body)
            fields["epoch"] += 7  # bob will refuse it with an authenticated epoch refusal
            reply = await exchange.forward(protocol.canonical(fields))
            assert reply.status == 409 and protocol.parse_refusal(reply.body).code == "epoch"
            return reply

        mitm.tamper = alter
        epoch = pair.epoch("alice")
        await until(lambda: pair.epoch("alice") > epoch)
        assert altered == 3 and not mitm.requests("resync")
        assert pair.epoch("alice") == pair.epoch("bob") == epoch + 1


async def test_an_authenticated_refusal_replayed_for_a_later_request_is_ignored(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_agent_pair(tmp_path, alice=REC, bob=REC, link=LINK, local=True) as pair:
        await pair.wait_for_epoch(1, timeout=60)
        url = f"https://{pair.configs['bob']['agent']['listen']}"
        # A genuine refusal of bob's, obtained with a request of the attacker's own making.
        probe = protocol.build(
            "rotate",
            link="alice-bob",
            sender="alice",
            receiver="bob",
            epoch=99,
            auth_key=Secret(b"x" * 32),
            keys=[["sim", "k"]],
            labels=["recording"],
            nonce=protocol.new_nonce(),
        )
        refused = await send_as(pair.network, "alice", url, "alice-bob", "rotate", probe)
        assert refused.status == 409
        assert protocol.parse_refusal(refused.body).epoch == pair.epoch("bob")
        mitm = ManInTheMiddle.on(pair, "bob")
        replays = 0

        async def replay(exchange: Exchange) -> object:
            nonlocal replays
            if exchange.action == "rotate" and replays < 3:
                replays += 1
                return exchange.forged(409, refused.body)
            return await exchange.forward()

        mitm.tamper = replay
        epoch = pair.epoch("alice")
        await until(lambda: pair.epoch("alice") > epoch)
        assert replays == 3 and not mitm.requests("resync")
        assert _unauthenticated(pair, "alice") == 3


async def test_an_authentic_hint_above_the_ceiling_is_not_followed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Even a refusal MAC'd under the bootstrap key (a peer that has gone rogue) cannot move
    the link where it could not rotate any more; nor can a resync ask for such an epoch."""
    async with open_agent_pair(tmp_path, alice=REC, bob=REC, link=LINK, local=True) as pair:
        await pair.wait_for_epoch(1, timeout=60)
        auth = _bootstrap_auth(pair)
        mitm = ManInTheMiddle.on(pair, "bob")
        forged = 0

        async def rogue(exchange: Exchange) -> object:
            nonlocal forged
            if exchange.action != "rotate" or forged >= 2:
                return await exchange.forward()
            forged += 1
            body = protocol.build_refusal(
                "epoch",
                "x",
                link="alice-bob",
                sender="bob",
                receiver="alice",
                epoch=protocol.RESYNC_CEILING + 5,
                request=protocol.request_digest(exchange.body),
                bootstrap_auth=auth,
            )
            return exchange.forged(409, body)

        mitm.tamper = rogue
        epoch = pair.epoch("alice")
        await until(lambda: pair.epoch("alice") > epoch)
        assert forged == 2 and not mitm.requests("resync")
        assert "above any reachable epoch" in (_status(pair, "alice")["last_error"] or "")
        mitm.leave()
        resync = protocol.build(
            "resync",
            link="alice-bob",
            sender="alice",
            receiver="bob",
            epoch=protocol.RESYNC_CEILING + 1,
            auth_key=auth,
            keys=[["sim", "k1"]],
            labels=["recording"],
            nonce=protocol.new_nonce(),
        )
        url = f"https://{pair.configs['bob']['agent']['listen']}"
        reply = await send_as(pair.network, "alice", url, "alice-bob", "resync", resync)
        assert reply.status == 400 and protocol.parse_refusal(reply.body).code == "epoch"


async def test_an_authentic_hint_still_resynchronises(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The authenticated path works: bob's genuine epoch refusal after alice lost her state."""
    async with open_agent_pair(tmp_path, alice=REC, bob=REC, link=LINK, local=True) as pair:
        await pair.wait_for_epoch(3, timeout=60)
        mitm = ManInTheMiddle.on(pair, "bob")
        await pair.stop("alice")
        import shutil

        shutil.rmtree(pair.configs["alice"]["agent"]["state_dir"])
        await pair.start("alice")
        await until(lambda: pair.epoch("alice") >= 4)
        assert len(mitm.requests("resync")) == 1
        assert pair.secret("alice", "rec") == pair.secret("bob", "rec")


async def test_a_server_certificate_of_another_agent_is_refused(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_agent_pair(tmp_path, alice=REC, bob=REC, link=LINK, local=True) as pair:
        await pair.wait_for_epoch(1, timeout=60)
        mitm = ManInTheMiddle.on(pair, "bob")
        mitm.as_identity("mallory")
        epoch = pair.epoch("alice")
        await trio.sleep(60)
        assert pair.epoch("alice") == epoch
        assert "naming mallory, not peer 'bob'" in _status(pair, "alice")["last_error"]
        mitm.leave()
        await until(lambda: pair.epoch("alice") > epoch)


async def test_a_client_certificate_of_another_agent_is_refused(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """mallory holds a certificate of the deployment CA and a genuine rotate of alice's (a
    replay): bob refuses it for the certificate, before even parsing the message, and answers
    an unknown link the same way (mallory cannot enumerate link names)."""
    async with open_agent_pair(tmp_path, alice=REC, bob=REC, link=LINK, local=True) as pair:
        mitm = ManInTheMiddle.on(pair, "bob")
        await pair.wait_for_epoch(1, timeout=60)
        genuine = mitm.requests("rotate")[-1].body
        url = mitm.url
        epoch = pair.epoch("bob")
        replies = [
            await send_as(pair.network, "mallory", url, link, action, body)
            for link, action, body in (
                ("alice-bob", "rotate", genuine),
                ("alice-bob", "commit", mitm.requests("commit")[-1].body),
                ("alice-bob", "rotate", DEEP),  # not parsed: no 400 "nested deeper"
                ("no-such-link", "rotate", genuine),
            )
        ]
        assert {(r.status, r.body) for r in replies} == {(403, replies[0].body)}
        assert "not a peer" in json.loads(replies[0].body)["message"]
        assert pair.epoch("bob") == epoch
        # a configured peer asking for a link that does not exist is told so
        unknown = await send_as(pair.network, "alice", url, "no-such-link", "rotate", genuine)
        assert unknown.status == 404


async def test_different_sink_labels_refuse_the_rotation_and_name_them(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    alice = {"sinks": {"wg": {"type": "recording", "label": "wg0"}}}
    bob = {"sinks": {"wg": {"type": "recording", "label": "wg0_alice"}}}
    async with open_agent_pair(tmp_path, alice=alice, bob=bob, link=LINK, local=True) as pair:
        await trio.sleep(30)
        assert pair.epoch("alice") == pair.epoch("bob") == 0
        for name in ("alice", "bob"):
            error = _status(pair, name)["last_error"]
            assert "'wg0_alice' only on the responder" in error
            assert "'wg0' only on the initiator" in error
        assert not pair.sink("alice", "wg").installs and not pair.sink("bob", "wg").installs


async def test_a_local_only_sink_is_not_compared(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    alice = {
        "sinks": {
            "wg": {"type": "recording", "label": "wg0"},
            "audit": {"type": "recording", "label": "audit", "local_only": True},
        }
    }
    bob = {"sinks": {"wg": {"type": "recording", "label": "wg0"}}}
    async with open_agent_pair(tmp_path, alice=alice, bob=bob, link=LINK, local=True) as pair:
        await pair.wait_for_epoch(2, timeout=60)
        assert pair.secret("alice", "wg") == pair.secret("bob", "wg")
        assert pair.sink("alice", "audit").calls[-1] == f"install:{pair.epoch('alice')}"
