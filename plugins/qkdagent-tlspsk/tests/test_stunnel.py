"""Real stunnel server and client, each fed by its own sink (as two agents would do).

Until the two-agent fixture drives them, the test plays both agents: the same derived secret goes
to the server-side sink of "alice" and the client-side sink of "bob" for each epoch.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from qkdagent_tlspsk import TlsPskSink
from qkdagent_tlspsk.service import run_expiry

from qkdagent import KeyMeta, Link, Secret, SinkError
from qkdagent.testing import assert_not_leaked

SERVER_LINK = Link("dc1-dc2", "alice", "bob", True)
CLIENT_LINK = Link("dc1-dc2", "bob", "alice", False)


def meta(epoch: int) -> KeyMeta:
    return KeyMeta(epoch, (f"k{epoch}",), "tls-psk", time.time())


@dataclass
class Tunnel:
    server: TlsPskSink
    client: TlsPskSink
    server_proc: Any
    client_proc: Any
    server_port: int
    client_port: int


@pytest.fixture
async def tunnel_factory(
    tmp_path: Path, h: Any, start_stunnel: Callable[..., Any], nursery: trio.Nursery
) -> Callable[..., Any]:
    async def make(tls: str, grace: float = 30.0) -> Tunnel:
        echo_port, server_port, client_port = h.free_port(), h.free_port(), h.free_port()
        await nursery.start(h.echo_server, echo_port)
        server = h.make_sink(
            tmp_path,
            "srv",
            path=str(tmp_path / "srv.psk"),
            role="server",
            pid_file=str(tmp_path / "srv.pid"),
            log_file=str(tmp_path / "srv.log"),
            probe=f"127.0.0.1:{server_port}",
            probe_tls=tls,
            grace_period=grace,
        )
        client = h.make_sink(
            tmp_path,
            "cli",
            path=str(tmp_path / "cli.psk"),
            role="client",
            pid_file=str(tmp_path / "cli.pid"),
            log_file=str(tmp_path / "cli.log"),
            grace_period=grace,
        )
        for sink, link in ((server, SERVER_LINK), (client, CLIENT_LINK)):
            await sink.prepare()
            await sink.erase(link, "startup")  # as the agent does: a random non-matching key
        srv = start_stunnel(
            "srv", client=False, accept=server_port, connect=echo_port, tls=tls, psk=server.path
        )
        cli = start_stunnel(
            "cli", client=True, accept=client_port, connect=server_port, tls=tls, psk=client.path
        )
        return Tunnel(server, client, srv.proc, cli.proc, server_port, client_port)

    return make


async def rotate(t: Tunnel, epoch: int) -> Secret:
    secret = Secret.random(32)
    await t.server.install(SERVER_LINK, secret, meta(epoch))
    await t.client.install(CLIENT_LINK, secret, meta(epoch))
    return secret


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
async def test_echo_through_both_stunnels_after_every_rotation(
    tls: str, tunnel_factory: Any, h: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    t = await tunnel_factory(tls)
    assert await h.echo_roundtrip(t.client_port, b"before any key", timeout=3) == b""
    secrets = []
    for epoch in (1, 2, 3):
        secrets.append(await rotate(t, epoch))
        payload = os.urandom(4096)
        assert await h.echo_eventually(t.client_port, payload), f"epoch {epoch}"
        assert await t.server.verify(SERVER_LINK, secrets[-1], meta(epoch)) is True
        first = t.client.path.read_text().splitlines()[0]
        assert first.startswith(f"dc1-dc2.{epoch}:"), (
            "the client file lists the current identity first"
        )
    # Within the grace period the server still takes the previous epoch's identity and key.
    assert await h.openssl_client(t.server_port, "dc1-dc2.2", secrets[1].reveal(), tls)
    assert not await h.openssl_client(t.server_port, "dc1-dc2.1", secrets[0].reveal(), tls)
    assert not await h.openssl_client(t.server_port, "dc1-dc2.3", os.urandom(32), tls)
    assert t.server_proc.poll() is None and t.client_proc.poll() is None
    assert h.file_mode(t.server.path) == 0o600 and h.file_mode(t.client.path) == 0o600
    state = t.server.context.state_dir / "plugins" / "tls-psk-srv" / "slots.json"
    assert h.file_mode(state) == 0o600
    assert_not_leaked(caplog.text + state.read_text() + repr(vars(t.server)), secrets)


async def test_previous_key_is_refused_once_grace_is_over(
    tunnel_factory: Any, h: Any, nursery: trio.Nursery
) -> None:
    t = await tunnel_factory("1.2", grace=1.0)
    await nursery.start(run_expiry, t.server.context.state_dir)
    old = await rotate(t, 1)
    new = await rotate(t, 2)
    assert await h.openssl_client(t.server_port, "dc1-dc2.1", old.reveal(), "1.2")
    deadline = trio.current_time() + 10
    while await h.openssl_client(t.server_port, "dc1-dc2.1", old.reveal(), "1.2"):
        assert trio.current_time() < deadline, "old key still accepted 10 s after a 1 s grace"
        await trio.sleep(0.2)
    assert "dc1-dc2.1:" not in t.server.path.read_text()
    assert await h.openssl_client(t.server_port, "dc1-dc2.2", new.reveal(), "1.2")
    payload = b"still tunnelling"
    assert await h.echo_eventually(t.client_port, payload)


async def test_invalid_secret_is_never_written_and_stunnel_keeps_serving(
    tunnel_factory: Any, h: Any
) -> None:
    t = await tunnel_factory("1.2")
    good = await rotate(t, 1)
    before = t.server.path.read_bytes()
    for bad in (Secret(os.urandom(8)), Secret(os.urandom(513))):
        with pytest.raises(SinkError, match="16-512 bytes") as info:
            await t.server.install(SERVER_LINK, bad, meta(2))
        assert bad.reveal().hex() not in str(info.value)
    assert t.server.path.read_bytes() == before
    assert await h.openssl_client(t.server_port, "dc1-dc2.1", good.reveal(), "1.2")
    assert await h.echo_eventually(t.client_port, b"ping")


async def test_a_reload_the_consumer_rejects_is_an_install_failure(
    tunnel_factory: Any, h: Any, tmp_path: Path
) -> None:
    t = await tunnel_factory("1.2")
    old = await rotate(t, 1)
    conf = tmp_path / "srv.conf"
    good_conf = conf.read_text()
    conf.write_text(good_conf + "no_such_option = 1\n")  # an admin broke the config
    new = Secret.random(32)
    with pytest.raises(SinkError, match="rejected the new PSK file"):
        await t.server.install(SERVER_LINK, new, meta(2))
    # stunnel kept its old keys: exactly the silent failure the confirmation catches.
    assert await h.openssl_client(t.server_port, "dc1-dc2.1", old.reveal(), "1.2")
    assert not await h.openssl_client(t.server_port, "dc1-dc2.2", new.reveal(), "1.2")
    conf.write_text(good_conf)
    await t.server.install(SERVER_LINK, new, meta(2))  # idempotent retry succeeds
    assert await h.openssl_client(t.server_port, "dc1-dc2.2", new.reveal(), "1.2")


async def test_probe_failure_is_reported(tmp_path: Path, h: Any, tunnel_factory: Any) -> None:
    t = await tunnel_factory("1.2")
    await rotate(t, 1)
    wrong = h.make_sink(
        tmp_path,
        "wrong",
        path=str(t.server.path),
        pid_file=str(tmp_path / "srv.pid"),
        probe=f"127.0.0.1:{t.server_port}",
        probe_tls="1.3",
        confirm_timeout=0.5,
    )
    await wrong.prepare()
    with pytest.raises(SinkError, match="did not accept the new key"):
        await wrong.install(SERVER_LINK, Secret.random(32), meta(2))


async def test_erase_fails_closed_and_keeps_stunnel_running(tunnel_factory: Any, h: Any) -> None:
    t = await tunnel_factory("1.3")
    key = await rotate(t, 1)
    assert await h.echo_eventually(t.client_port, b"x")
    await t.server.erase(SERVER_LINK, "reject_after")
    assert not await h.openssl_client(t.server_port, "dc1-dc2.1", key.reveal(), "1.3")
    assert await h.echo_roundtrip(t.client_port, b"y", timeout=3) == b""
    assert t.server_proc.poll() is None
    assert await t.server.verify(SERVER_LINK, key, meta(1)) is False


async def test_dead_consumer_is_an_install_failure(tmp_path: Path, h: Any) -> None:
    pid_file = tmp_path / "gone.pid"
    pid_file.write_text("4194000\n")
    sink = h.make_sink(tmp_path, path=str(tmp_path / "psk"), pid_file=str(pid_file))
    await sink.prepare()
    await sink.erase(SERVER_LINK, "startup")  # no consumer needed to fail closed
    with pytest.raises(SinkError, match="not running"):
        await sink.install(SERVER_LINK, Secret.random(32), meta(1))
