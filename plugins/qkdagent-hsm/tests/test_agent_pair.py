"""Two real agents (loopback HTTPS, mutual TLS), each storing into its own SoftHSM2 token."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from qkdagent_hsm import naming

from qkdagent.testing import assert_not_leaked, open_agent_pair


def sink_table(softhsm: Any, tok: Any, **extra: Any) -> dict[str, Any]:
    return {
        "type": "pkcs11",
        "token": tok.label,
        "module": softhsm.module,
        "pin": {"file": str(tok.pin_file)},
        **extra,
    }


async def test_agents_keep_the_same_newest_key_in_both_tokens(
    softhsm: Any,
    make_token: Callable[[], Any],
    sink_factory: Callable[..., Any],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    alice_tok, bob_tok = make_token(), make_token()
    async with open_agent_pair(
        tmp_path,
        alice={"plugins": ["hsm"], "sinks": {"hsm": sink_table(softhsm, alice_tok)}},
        bob={"plugins": ["hsm"], "sinks": {"hsm": sink_table(softhsm, bob_tok, retention=3)}},
        link={"interval": 0.2, "jitter": 0, "reject_after": 30},
    ) as pair:
        await pair.wait_for_epoch(6)
        link_a = pair.alice.link("alice-bob").link
        link_b = pair.bob.link("alice-bob").link
        # The initiator first: its graceful stop drains the rotation in flight, commit included.
        await pair.stop("alice")
        await pair.stop("bob")
        epoch = pair.epoch("alice")
        assert pair.epoch("bob") == epoch >= 6
        secret = pair.secret("alice", "hsm")
        assert secret == pair.secret("bob", "hsm")

    # Read both tokens back through fresh sink instances (the agents closed theirs).
    alice = sink_factory(alice_tok, name="check-a", agent="alice")
    bob = sink_factory(bob_tok, name="check-b", agent="bob", retention=3)
    await alice.prepare()
    await bob.prepare()
    challenge = os.urandom(32)
    mac_a = await alice.token_mac(link_a, challenge)
    mac_b = await bob.token_mac(link_b, challenge)
    assert mac_a is not None and mac_a == mac_b
    assert mac_a[0] == naming.epoch_id(epoch, 8)
    assert await alice.verify(link_a, secret, _meta(epoch)) is True
    assert await bob.verify(link_b, secret, _meta(epoch)) is True
    # Labels name the peer (cqptoolkit): "bob" on alice's token, "alice" on bob's; N per side,
    # only the newest under the plain label, the older ones under "<label>.old".
    assert await alice.object_ids(link_a) == {
        "bob": [naming.epoch_id(epoch, 8)],
        "bob.old": [naming.epoch_id(epoch - 1, 8)],
    }
    assert await bob.object_ids(link_b) == {
        "alice": [naming.epoch_id(epoch, 8)],
        "alice.old": [naming.epoch_id(e, 8) for e in (epoch - 2, epoch - 1)],
    }
    assert_not_leaked(caplog.text, [secret])


def _meta(epoch: int) -> Any:
    import time

    from qkdagent import KeyMeta

    return KeyMeta(epoch, (), "hsm", time.time())
