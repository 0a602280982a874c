"""Two real agents feed a real stunnel server (alice) and a real stunnel client (bob).

alice is the initiator and the TLS server: she installs each epoch first and keeps the previous
identity during the grace period, so bob's stunnel client (which moves a moment later) never
offers an identity the server has dropped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio

from qkdagent import Link
from qkdagent.testing import open_agent_pair

INTERVAL = 2.0
REJECT_AFTER = 4.0
BOB_LINK = Link("alice-bob", "bob", "alice", False)


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
async def test_agents_rotate_stunnel_and_reject_after_stops_new_handshakes(
    tls: str, tmp_path: Path, h: Any, start_stunnel: Any, nursery: trio.Nursery
) -> None:
    echo_port, server_port, client_port = h.free_port(), h.free_port(), h.free_port()
    await nursery.start(h.echo_server, echo_port)
    srv_psk, cli_psk = tmp_path / "srv.psk", tmp_path / "cli.psk"
    for path in (srv_psk, cli_psk):  # stunnel needs a file to start; the agents replace it
        path.write_text(f"boot-{os.urandom(4).hex()}:{os.urandom(32).hex()}\n")
        path.chmod(0o600)
    srv = start_stunnel(
        "srv", client=False, accept=server_port, connect=echo_port, tls=tls, psk=srv_psk
    )
    cli = start_stunnel(
        "cli", client=True, accept=client_port, connect=server_port, tls=tls, psk=cli_psk
    )
    alice_sinks = {
        "stunnel": {
            "type": "tls-psk",
            "path": str(srv_psk),
            "role": "server",
            "grace_period": 3,
            "pid_file": str(srv.pid_file),
            "log_file": str(srv.log),
            "probe": f"127.0.0.1:{server_port}",
            "probe_tls": tls,
        }
    }
    bob_sinks = {
        "stunnel": {
            "type": "tls-psk",
            "path": str(cli_psk),
            "role": "client",
            "grace_period": 3,
            "pid_file": str(cli.pid_file),
            "log_file": str(cli.log),
        }
    }
    async with open_agent_pair(
        tmp_path / "agents",
        alice={"sinks": alice_sinks, "plugins": ["tlspsk"]},
        bob={"sinks": bob_sinks, "plugins": ["tlspsk"]},
        link={"interval": INTERVAL, "reject_after": REJECT_AFTER},
    ) as pair:
        link = pair.sink("bob", "stunnel")
        for epoch in (2, 3):
            await pair.wait_for_epoch(epoch)
            assert pair.secret("alice", "stunnel") == pair.secret("bob", "stunnel")
            # bob installs (write, SIGHUP, log line) right after he commits, and a stunnel reload
            # rebinds its listener: poll (bounded) until the tunnel carries data again.
            secret = pair.secret("bob", "stunnel").reveal()
            payload = os.urandom(2048)
            with trio.fail_after(5):
                while link.current_key(BOB_LINK) != secret or (  # noqa: ASYNC110 (external)
                    await h.echo_roundtrip(client_port, payload, timeout=1) != payload
                ):
                    await trio.sleep(0.02)
        last_epoch = pair.epoch("alice")
        last = pair.secret("alice", "stunnel").reveal()
        identity = f"alice-bob.{last_epoch}"
        assert srv_psk.read_text().startswith(f"{identity}:")
        # Positive control (bounded retries: a grace expiry may be reloading stunnel right now).
        with trio.fail_after(5):
            while not await h.openssl_client(server_port, identity, last, tls):  # noqa: ASYNC110
                await trio.sleep(0.05)
        await pair.stop("bob")
        # Without bob no rotation succeeds; after reject_after alice erases the link's entries.
        with trio.fail_after(REJECT_AFTER + 10):
            while identity in srv_psk.read_text():  # noqa: ASYNC110 (file written by the agent)
                await trio.sleep(0.1)
        # ... and once stunnel reloaded, new handshakes with the last key fail, every time.
        with trio.fail_after(5):
            while await h.openssl_client(server_port, identity, last, tls):  # noqa: ASYNC110
                await trio.sleep(0.05)
        for _ in range(3):
            assert not await h.openssl_client(server_port, identity, last, tls)
        assert srv.proc.poll() is None, "stunnel keeps running with the erased file"
