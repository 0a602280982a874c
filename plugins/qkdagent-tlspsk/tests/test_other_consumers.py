"""The gnutls and nghttpx formats, parsed by the real Debian tools in real handshakes.

The handshakes come from the sink's own libssl probe (OpenSSL client against the GnuTLS and
nghttpx servers), so no key ever appears on a command line.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio
from qkdagent_tlspsk.probe import handshake

from qkdagent import KeyMeta, Link, Secret
from qkdagent.testing import require_binary, write_test_pki

SERVER_LINK = Link("edge", "alice", "bob", True)


def meta(epoch: int) -> KeyMeta:
    return KeyMeta(epoch, (f"k{epoch}",), "tls-psk", time.time())


async def accepted(port: int, identity: str, secret: Secret, tls: str = "1.2") -> bool:
    result = await trio.to_thread.run_sync(
        lambda: handshake("127.0.0.1", port, identity, secret, tls=tls, timeout=3)
    )
    return result.ok


@pytest.mark.parametrize("style", ["template", "cqptoolkit"])
async def test_gnutls_serv_reads_the_gnutls_file(
    style: str, tmp_path: Path, h: Any, processes: Any
) -> None:
    gnutls_serv = require_binary("gnutls-serv")["gnutls-serv"]
    port = h.free_port()
    sink = h.make_sink(
        tmp_path,
        path=str(tmp_path / "passwd.psk"),
        format="gnutls",
        identity_style=style,
        probe=f"127.0.0.1:{port}",
    )
    await sink.prepare()
    await sink.erase(SERVER_LINK, "startup")
    proc = processes.start(
        [
            gnutls_serv,
            "-p",
            str(port),
            "--pskpasswd",
            str(sink.path),
            "--echo",
            "--priority",
            "NORMAL:+PSK:+DHE-PSK:+ECDHE-PSK",
        ],
        tmp_path / "gnutls.log",
    )
    await trio.to_thread.run_sync(h.wait_listening, port, proc)
    first, second = Secret.random(32), Secret.random(32)
    # gnutls-serv re-reads passwd.psk on every handshake: no reload, but the probe confirms.
    await sink.install(SERVER_LINK, first, meta(1))
    await sink.install(SERVER_LINK, second, meta(2))
    id1, id2 = sink.identity_for(SERVER_LINK, meta(1)), sink.identity_for(SERVER_LINK, meta(2))
    if style == "cqptoolkit":
        assert id2 == "pkcs:object=bob;id=2"
        assert sink.path.read_text().startswith("#" + id2.encode().hex() + ":")
    for tls in ("1.2", "1.3"):
        assert await accepted(port, id2, second, tls)
        assert await accepted(port, id1, first, tls), "previous identity kept for the grace period"
        assert not await accepted(port, id2, first, tls)
    await sink.erase(SERVER_LINK, "reject_after")
    assert not await accepted(port, id2, second)


async def test_nghttpx_reads_its_file_and_reloads_on_sighup(
    tmp_path: Path, h: Any, processes: Any
) -> None:
    nghttpx = require_binary("nghttpx")["nghttpx"]
    pki = write_test_pki(tmp_path / "pki", ["edge"])  # nghttpx insists on a (dummy) certificate
    port, backend = h.free_port(), h.free_port()
    sink = h.make_sink(
        tmp_path,
        path=str(tmp_path / "nghttpx.psk"),
        format="nghttpx",
        pid_file=str(tmp_path / "nghttpx.pid"),
        probe=f"127.0.0.1:{port}",
        probe_ciphers="PSK-AES128-GCM-SHA256",
        confirm_timeout=10,
    )
    await sink.prepare()
    first, second = Secret.random(32), Secret.random(32)
    await sink.erase(SERVER_LINK, "startup")
    empty_conf = tmp_path / "nghttpx.conf"
    empty_conf.write_text("")
    proc = processes.start(
        [
            nghttpx,
            f"--conf={empty_conf}",
            f"-f127.0.0.1,{port}",
            f"-b127.0.0.1,{backend}",
            f"--psk-secrets={sink.path}",
            "--ciphers=PSK-AES128-GCM-SHA256:DHE-PSK-AES128-GCM-SHA256",
            "--tls-max-proto-version=TLSv1.2",
            "--no-ocsp",
            "--workers=1",
            "--no-http2-cipher-block-list",
            f"--pid-file={tmp_path / 'nghttpx.pid'}",
            str(pki["edge"].key),
            str(pki["edge"].cert),
        ],
        tmp_path / "nghttpx.log",
    )
    await trio.to_thread.run_sync(h.wait_listening, port, proc)
    # nghttpx writes its pid file after it starts listening
    await trio.to_thread.run_sync(h.wait_pid_file, tmp_path / "nghttpx.pid")
    await sink.install(
        SERVER_LINK, first, meta(1)
    )  # SIGHUP, then the probe waits for the new worker
    await sink.install(SERVER_LINK, second, meta(2))
    assert await accepted(port, "edge.2", second)
    assert await accepted(port, "edge.1", first)
    assert not await accepted(port, "edge.2", first)
    assert proc.poll() is None
