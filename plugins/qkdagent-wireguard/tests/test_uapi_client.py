"""The UAPI client against a scripted fake daemon: reconnects, errno handling, bad replies."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from qkdagent_wireguard.backend import BackendError, Op, Outcome
from qkdagent_wireguard.uapi import UapiBackend

PEER = os.urandom(32)

Handler = Callable[[bytes, dict[bytes, bytes]], bytes | None]


def serve(path: Path, handler: Handler, close_after_get: bool) -> threading.Thread:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(8)
    state: dict[bytes, bytes] = {}

    def loop() -> None:
        with listener:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    buf = b""
                    while True:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        buf += chunk
                        if not buf.endswith(b"\n\n"):
                            continue
                        reply = handler(buf, state)
                        was_get, buf = buf.startswith(b"get=1"), b""
                        if reply is None:
                            break
                        conn.sendall(reply)
                        if close_after_get and was_get:
                            break

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    thread.listener = listener  # type: ignore[attr-defined]
    return thread


def honest(request: bytes, state: dict[bytes, bytes]) -> bytes:
    lines = request.decode().split("\n")
    if lines[0] == "set=1":
        peer = None
        for line in lines[1:]:
            key, _, value = line.partition("=")
            if key == "public_key":
                peer = bytes.fromhex(value)
            elif key == "preshared_key" and peer is not None:
                state[peer] = bytes.fromhex(value)
        return b"errno=0\n\n"
    body = f"public_key={PEER.hex()}\npreshared_key={state.get(PEER, bytes(32)).hex()}\n"
    return body.encode() + b"errno=0\n\n"


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Callable[[Handler, bool], UapiBackend]]:
    threads: list[threading.Thread] = []

    def start(handler: Handler, close_after_get: bool = False) -> UapiBackend:
        threads.append(serve(tmp_path / "wgfake.sock", handler, close_after_get))
        return UapiBackend(tmp_path, timeout=2)

    yield start
    for thread in threads:
        thread.listener.close()  # type: ignore[attr-defined]


def test_keeps_one_connection_and_reconnects_when_dropped(fake) -> None:  # type: ignore[no-untyped-def]
    backend = fake(honest, True)  # the daemon drops the connection after every batch
    for _ in range(3):
        key = os.urandom(32)
        assert backend.apply("wgfake", [Op(PEER, key, True)]) == [Outcome.MATCH]
    assert backend.apply("wgfake", [Op(os.urandom(32), key, False)]) == [Outcome.NO_PEER]
    backend.close()


def test_refused_set_is_reported_with_errno(fake) -> None:  # type: ignore[no-untyped-def]
    backend = fake(lambda req, state: b"errno=-22\n\n", False)
    with pytest.raises(BackendError, match=r"errno=-22 \(EINVAL\)"):
        backend.apply("wgfake", [Op(PEER, os.urandom(32), True)])


def test_garbage_reply_is_a_backend_error(fake) -> None:  # type: ignore[no-untyped-def]
    backend = fake(lambda req, state: b"hello\n\n", False)
    with pytest.raises(BackendError, match="errno"):
        backend.apply("wgfake", [Op(PEER, os.urandom(32), True)])


def test_silent_daemon_times_out(fake) -> None:  # type: ignore[no-untyped-def]
    backend = fake(lambda req, state: b"", False)
    backend.timeout = 0.2
    with pytest.raises(BackendError, match="did not answer in time"):
        backend.apply("wgfake", [Op(PEER, os.urandom(32), True)])


def test_key_never_in_errors(fake) -> None:  # type: ignore[no-untyped-def]
    backend = fake(lambda req, state: b"errno=-5\n\n", False)
    key = os.urandom(32)
    with pytest.raises(BackendError) as info:
        backend.apply("wgfake", [Op(PEER, key, True)])
    assert key.hex() not in str(info.value)
