"""The cross-platform userspace control socket (wireguard-go, boringtun): protocol and client.

Requests are `key=value` lines ending with a blank line; keys are lowercase hex. A connection
serves many requests in a row (but not pipelined ones: wireguard-go's set parser reads ahead),
so a batch is a `set` with every write, its reply, then a `get` to read the keys back. One
connection per interface stays open: a reused connection makes an install several times cheaper
than connecting anew, and far cheaper than spawning `wg set`. Request buffers are wiped after
sending (best effort: Python may hold other copies).
"""

from __future__ import annotations

import errno as errno_codes
import os
import socket
from collections.abc import Sequence
from pathlib import Path

from .backend import BackendError, Op, Outcome, compare

MAX_REPLY = 64 * 1024 * 1024


def build_set(ops: Sequence[Op]) -> bytearray:
    """`set=1` with one peer section per write: public key, update_only, then the PSK."""
    request = bytearray(b"set=1\n")
    for op in ops:
        if op.write:
            request += b"public_key=%s\nupdate_only=true\npreshared_key=%s\n" % (
                op.peer.hex().encode(),
                op.expect.hex().encode(),
            )
    request += b"\n"
    return request


def parse_errno(reply: bytes) -> int:
    """The `errno=N` line that ends every reply; a reply without one is a protocol error."""
    for line in reply.decode("ascii", "replace").splitlines():
        if line.startswith("errno="):
            try:
                return int(line[6:])
            except ValueError:
                break
    raise BackendError("the WireGuard control socket sent a reply without a valid errno line")


def parse_get(reply: bytes) -> dict[bytes, bytes | None]:
    """Map every peer's public key to its PSK (None when it has none) from a `get=1` reply."""
    peers: dict[bytes, bytes | None] = {}
    current: bytes | None = None
    for raw in reply.split(b"\n"):
        key, sep, value = raw.partition(b"=")
        if not sep:
            continue
        try:
            if key == b"public_key":
                current = bytes.fromhex(value.decode("ascii"))
                peers[current] = None
            elif key == b"preshared_key" and current is not None:
                psk = bytes.fromhex(value.decode("ascii"))
                peers[current] = psk if any(psk) else None
        except (ValueError, UnicodeDecodeError):
            raise BackendError("the WireGuard control socket sent a malformed key") from None
    return peers


class _Stale(Exception):
    """The connection broke (daemon restarted, idle connection closed): reconnect once."""


class UapiBackend:
    """Backend over `<directory>/<interface>.sock` (blocking; callers use a worker thread)."""

    name = "uapi"

    def __init__(self, directory: Path = Path("/run/wireguard"), timeout: float = 5.0) -> None:
        self.directory = directory
        self.timeout = timeout
        self._conns: dict[str, socket.socket] = {}

    def socket_path(self, interface: str) -> Path:
        return self.directory / f"{interface}.sock"

    def exists(self, interface: str) -> bool:
        return self.socket_path(interface).is_socket()

    def apply(self, interface: str, ops: Sequence[Op]) -> list[Outcome]:
        """Write the batch's PSKs, read the device back and compare (one reconnect allowed)."""
        path = self.socket_path(interface)
        for attempt in (1, 2):
            reused = interface in self._conns
            try:
                sock = self._conns.get(interface) or self._connect(interface)
                return self._exchange(sock, path, ops)
            except _Stale as exc:
                self._drop(interface)
                if reused and attempt == 1:
                    continue
                raise BackendError(f"{path}: {exc}") from None
            except BaseException:
                self._drop(interface)
                raise
        raise AssertionError("unreachable")

    def _connect(self, interface: str) -> socket.socket:
        path = self.socket_path(interface)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(os.fspath(path))
        except FileNotFoundError:
            sock.close()
            raise BackendError(
                f"no WireGuard control socket for interface {interface!r} at {path}"
            ) from None
        except OSError as exc:
            sock.close()
            raise BackendError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        self._conns[interface] = sock
        return sock

    def _exchange(self, sock: socket.socket, path: Path, ops: Sequence[Op]) -> list[Outcome]:
        if any(op.write for op in ops):
            request = build_set(ops)
            try:
                _send(sock, request)
            finally:
                request[:] = bytes(len(request))
            code = parse_errno(_read_reply(sock, path))
            if code != 0:
                name = errno_codes.errorcode.get(-code, str(code))
                raise BackendError(f"{path} refused the PSK update: errno={code} ({name})")
        _send(sock, b"get=1\n\n")
        reply = _read_reply(sock, path)
        code = parse_errno(reply)
        if code != 0:
            raise BackendError(f"{path} refused to read the device: errno={code}")
        return compare(ops, parse_get(reply))

    def _drop(self, interface: str) -> None:
        sock = self._conns.pop(interface, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        for interface in list(self._conns):
            self._drop(interface)


def _send(sock: socket.socket, data: bytes | bytearray) -> None:
    try:
        sock.sendall(data)
    except TimeoutError:
        raise BackendError("the WireGuard control socket did not accept the request") from None
    except OSError as exc:
        raise _Stale(exc.strerror or "send failed") from None


def _read_reply(sock: socket.socket, path: Path) -> bytes:
    """One reply: lines ending with `errno=N` and a blank line."""
    data = bytearray()
    while not data.endswith(b"\n\n"):  # replies hold no blank line before their end
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise BackendError(f"{path} did not answer in time") from None
        except OSError as exc:
            raise _Stale(exc.strerror or "receive failed") from None
        if not chunk:
            raise _Stale("the daemon closed the connection")
        data += chunk
        if len(data) > MAX_REPLY:
            raise BackendError(f"{path} sent an oversized reply")
    return bytes(data)
