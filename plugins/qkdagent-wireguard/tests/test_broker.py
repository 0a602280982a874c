"""The privileged broker: serves only allowed interface/peer pairs to allowed callers."""

from __future__ import annotations

import base64
import errno
import os
import select
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from qkdagent_wireguard import broker as broker_module
from qkdagent_wireguard.backend import BackendError, Op, Outcome
from qkdagent_wireguard.broker import (
    MAX_FRAME,
    Broker,
    BrokerBackend,
    bind_socket,
    parse_allow,
    serve,
)
from qkdagent_wireguard.drive import drive_blocking
from wg_testbed import genkey

from qkdagent import KeyMeta, Link, Misconfigured, Secret

LINK = Link("site", "alice", "bob", True)
UNPRIVILEGED = 54321


def meta(epoch: int) -> KeyMeta:
    return KeyMeta(epoch, (f"k{epoch}",), "wireguard", time.time())


def broker_apply(path: Path, interface: str, ops: list[Op]) -> list[Outcome]:
    """One request to the broker, blocking (these tests call it from worker threads)."""
    return drive_blocking(BrokerBackend(path).exchange(interface, ops), 5, "broker")


def apply_as(uid: int, path: Path, interface: str, op: Op) -> str:
    """Send one broker request from a forked child running as `uid` (and gid `uid`)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            result = "ok:" + broker_apply(path, interface, [op])[0].value
        except BackendError as exc:
            result = f"err:{exc}"
        except BaseException as exc:
            result = f"crash:{type(exc).__name__}"
            code = 1
        os.write(write_end, result.encode()[:4000])
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode()
    os.waitpid(pid, 0)
    return answer


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory other users may enter (pytest's tmp_path is private to root)."""
    directory = Path(tempfile.mkdtemp(prefix="qkdwg-broker-"))
    os.chmod(directory, 0o755)  # noqa: S103 - the socket inside is 0660, group-restricted
    yield directory
    shutil.rmtree(directory)


async def test_unprivileged_caller_sets_a_psk_through_the_broker(
    userspace_pair, broker_factory, public_dir
) -> None:  # type: ignore[no-untyped-def]
    a, b = userspace_pair.a, userspace_pair.b
    sock = public_dir / "broker.sock"
    await trio.to_thread.run_sync(
        lambda: broker_factory(
            "--allow", f"{a.iface}:{b.public_text}", "--user", str(UNPRIVILEGED),
            "--socket-group", str(UNPRIVILEGED), "--backend", "uapi", socket=sock,
        )
    )  # fmt: skip
    assert oct(sock.stat().st_mode & 0o777) == "0o660"
    assert sock.stat().st_gid == UNPRIVILEGED
    key = os.urandom(32)
    answer = await trio.to_thread.run_sync(
        apply_as, UNPRIVILEGED, sock, a.iface, Op(b.public, key, True)
    )
    assert answer == "ok:match"
    assert a.psk_of(b) == key
    # Any other unprivileged user cannot even connect (socket 0660, group of the allowed uid).
    other = await trio.to_thread.run_sync(
        apply_as, UNPRIVILEGED + 1, sock, a.iface, Op(b.public, os.urandom(32), True)
    )
    assert other.startswith("err:") and "Permission denied" in other
    assert a.psk_of(b) == key


async def test_caller_without_the_right_uid_is_refused(userspace_pair, broker_factory) -> None:  # type: ignore[no-untyped-def]
    a, b = userspace_pair.a, userspace_pair.b
    sock = await trio.to_thread.run_sync(
        lambda: broker_factory("--allow", f"{a.iface}:{b.public_text}", "--user", "12345")
    )
    before = a.psk_of(b)
    with pytest.raises(BackendError, match="uid 0 is not allowed"):
        await trio.to_thread.run_sync(
            broker_apply, sock, a.iface, [Op(b.public, os.urandom(32), True)]
        )
    assert a.psk_of(b) == before


async def test_peer_not_on_the_allow_list_is_refused(
    userspace_pair, broker_factory, make_sink
) -> None:  # type: ignore[no-untyped-def]
    a, b = userspace_pair.a, userspace_pair.b
    _, someone = genkey()
    sock = await trio.to_thread.run_sync(
        lambda: broker_factory("--allow", f"{a.iface}:{base64.b64encode(someone).decode()}")
    )
    before = a.psk_of(b)
    sink = make_sink(a, b, backend="broker", broker_socket=str(sock))
    with pytest.raises(Misconfigured, match="allow list"):
        await sink.prepare()
    with pytest.raises(BackendError, match="allow list"):
        await trio.to_thread.run_sync(
            broker_apply, sock, a.iface, [Op(b.public, os.urandom(32), True)]
        )
    # the same peer on another interface is not allowed either
    with pytest.raises(BackendError, match="allow list"):
        await trio.to_thread.run_sync(
            broker_apply, sock, b.iface, [Op(someone, os.urandom(32), True)]
        )
    assert a.psk_of(b) == before


async def test_broker_sink_rotates_and_erases(userspace_pair, broker_factory, make_sink) -> None:  # type: ignore[no-untyped-def]
    a, b = userspace_pair.a, userspace_pair.b
    sock = await trio.to_thread.run_sync(
        lambda: broker_factory("--allow", f"{a.iface}:{b.public_text}")
    )
    sink = make_sink(a, b, backend="broker", broker_socket=str(sock))
    await sink.prepare()
    secret = Secret.random()
    await sink.install(LINK, secret, meta(1))
    assert a.psk_of(b) == secret.reveal()
    assert await sink.verify(LINK, secret, meta(1)) is True
    await sink.erase(LINK, "reject_after")
    assert a.psk_of(b) not in (None, secret.reveal())
    log = (sock.parent / "broker-0.log").read_text()
    assert secret.reveal().hex() not in log and "uid=0" in log
    await sink.aclose()


async def test_missing_broker_socket_is_not_installed(tmp_path, userspace_pair, make_sink) -> None:  # type: ignore[no-untyped-def]
    from qkdagent import NotInstalled

    sink = make_sink(
        userspace_pair.a, userspace_pair.b, backend="broker", broker_socket=str(tmp_path / "no")
    )
    with pytest.raises(NotInstalled, match="broker"):
        await sink.prepare()


def test_refused_caller_is_disconnected_before_its_frame_is_read(broker_factory) -> None:  # type: ignore[no-untyped-def]
    peer = base64.b64encode(os.urandom(32)).decode()
    path = broker_factory("--allow", f"wg0:{peer}", "--user", "12345", "--backend", "uapi")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        sock.setblocking(False)
        # The header announces the largest frame allowed; only its first 64 KiB follow. A broker
        # that read frames before judging the caller would wait here for the other ~8 MB.
        try:
            sock.send(struct.pack(">I", MAX_FRAME) + os.urandom(65536))
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        while True:
            assert select.select([sock], [], [], 10)[0], "the broker kept the refused caller"
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:  # closed with our bytes still unread
                break
            if not chunk:
                break
            data += chunk
    (size,) = struct.unpack_from(">I", data)
    assert len(data) == 4 + size
    assert b'"ok":false' in data and b"uid 0 is not allowed" in data
    log = path.with_name(path.stem + ".log").read_text()
    assert "refused caller" in log and "frame" not in log


class _Served:
    """A backend that answers "match" to everything without touching WireGuard."""

    name = "served"
    timeout = 1.0

    def exchange(self, interface: str, ops: list[Op]):  # type: ignore[no-untyped-def]
        return [Outcome.MATCH for _ in ops]
        yield

    def close(self) -> None:
        pass


def test_unreadable_credentials_do_not_stop_the_broker(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    real, calls = broker_module.peer_credentials, []

    def fail_once(sock: socket.socket) -> broker_module.Credentials:
        calls.append(sock)
        if len(calls) == 1:
            raise OSError(errno.EBADF, "injected failure")
        return real(sock)

    monkeypatch.setattr(broker_module, "peer_credentials", fail_once)
    peer = os.urandom(32)
    allow = parse_allow([f"wg0:{base64.b64encode(peer).decode()}"])
    broker = Broker(_Served(), allow, uids=frozenset({os.getuid()}))
    listener = bind_socket(tmp_path / "b.sock")
    wake, waker = socket.socketpair()
    thread = threading.Thread(target=serve, args=(broker, listener, wake), daemon=True)
    thread.start()
    try:
        with socket.socket(socket.AF_UNIX) as first:
            first.connect(str(tmp_path / "b.sock"))
            first.settimeout(10)
            assert first.recv(1) == b""  # dropped, unserved
        op = Op(peer, os.urandom(32), True)
        assert broker_apply(tmp_path / "b.sock", "wg0", [op]) == [Outcome.MATCH]
        assert len(calls) == 2
    finally:
        waker.send(b"x")
        thread.join(10)
        listener.close()
        wake.close()
        waker.close()
    assert not thread.is_alive()
