"""The plain `openssl` format, consumed by a real `openssl s_server -psk "$(cat FILE)"`.

The consumer only takes its key on the command line, so this test puts throwaway keys on argv
(s_server's and s_client's); the sink itself never does.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio

from qkdagent import KeyMeta, Link, Secret
from qkdagent.testing import require_binary

LINK = Link("edge", "alice", "bob", True)


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
async def test_s_server_takes_the_key_from_the_sink_file(
    tls: str, tmp_path: Path, h: Any, processes: Any
) -> None:
    openssl = require_binary("openssl")["openssl"]
    sink = h.make_sink(tmp_path, path=str(tmp_path / "psk.hex"), format="openssl")
    await sink.prepare()
    secret = Secret.random(32)
    meta = KeyMeta(7, ("k7",), "tls-psk", time.time())
    await sink.install(LINK, secret, meta)
    identity = sink.identity_for(LINK, meta)
    key_hex = sink.path.read_text()  # exactly what `-psk "$(cat FILE)"` passes
    assert key_hex == secret.reveal().hex() and h.file_mode(sink.path) == 0o600

    port = h.free_port()
    version = ["-tls1_3"] if tls == "1.3" else ["-tls1_2", "-cipher", "PSK"]
    argv = [openssl, "s_server", "-nocert", "-accept", f"127.0.0.1:{port}", "-rev", *version]
    argv += ["-psk", key_hex, "-psk_identity", identity]
    proc = processes.start(argv, tmp_path / "s_server.log")
    await trio.to_thread.run_sync(h.wait_listening, port, proc)
    assert await h.openssl_client(port, identity, secret.reveal(), tls)
    assert not await h.openssl_client(port, identity, Secret.random(32).reveal(), tls)
    assert await h.openssl_client(port, identity, secret.reveal(), tls), "still serving"
    assert proc.poll() is None
