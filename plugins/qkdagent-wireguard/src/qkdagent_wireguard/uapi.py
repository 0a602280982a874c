"""The cross-platform userspace control socket (wireguard-go, boringtun): protocol and client.

Requests are `key=value` lines ending with a blank line; keys are lowercase hex. One connection
per interface stays open. A batch is ONE round trip: `get=1` and then the `set=1` with every
write, sent together. That order is the only pipelining the daemon allows (wireguard-go parses a
`set` with a read-ahead scanner that swallows whatever follows it, but reads `get=1` exactly),
and it gives each install fresh evidence that its peer exists: the device is listed just before
the write, on the same connection, so a missing peer (where `update_only` silently does nothing)
is an error instead of a no-op, and `errno=0` on the set confirms the key was taken. Read ops
(verify, prepare) compare the PSK listed by that same `get`. Only the lines of the peers in the
batch are looked at. Request buffers are wiped after sending (best effort).
"""

from __future__ import annotations

import errno as errno_codes
import re
import socket
from collections.abc import Sequence
from pathlib import Path

from .backend import BackendError, Op, Outcome, compare
from .drive import Exchange, connect_unix, send_all

MAX_REPLY = 64 * 1024 * 1024
GET = b"get=1\n\n"
FIND_LIMIT = 8
"""Up to this many peers per batch are located with bytes.find, more with one regex pass."""
_PUBLIC = re.compile(rb"^public_key=([0-9a-f]{64})$", re.MULTILINE)


def build_set(ops: Sequence[Op], into: bytearray | None = None) -> bytearray:
    """`set=1` with one peer section per write: public key, update_only, then the PSK."""
    request = bytearray() if into is None else into
    request += b"set=1\n"
    for op in ops:
        if op.write:
            request += b"public_key=%s\nupdate_only=true\npreshared_key=%s\n" % (
                op.peer.hex().encode(),
                op.expect.hex().encode(),
            )
    request += b"\n"
    return request


def split_reply(reply: bytes) -> tuple[bytes, int]:
    """(body, errno) of one reply: its lines, the last being `errno=N`, then a blank line."""
    head, sep, line = reply[:-2].rpartition(b"\n")
    if not line.startswith(b"errno=") or not reply.endswith(b"\n\n"):
        raise BackendError("the WireGuard control socket sent a reply without a valid errno line")
    try:
        code = int(line[6:])
    except ValueError:
        raise BackendError("the WireGuard control socket sent an invalid errno line") from None
    return head + sep, code


def parse_errno(reply: bytes) -> int:
    return split_reply(reply)[1]


def locate(body: bytes, peer: bytes) -> int | None:
    """Offset just after the `public_key=` line of `peer` in a get body, None when absent."""
    line = b"public_key=%s\n" % peer.hex().encode()
    at = body.find(line)
    while at > 0 and body[at - 1] != 0x0A:  # must start a line
        at = body.find(line, at + 1)
    return None if at < 0 else at + len(line)


def index_peers(body: bytes) -> dict[bytes, int]:
    """Every peer of a get body: public key -> offset just after its `public_key=` line."""
    return {bytes.fromhex(m[1].decode()): m.end() + 1 for m in _PUBLIC.finditer(body)}


def psk_at(body: bytes, start: int) -> bytes | None:
    """The PSK in the peer section starting at `start` (None when it has none or all-zero)."""
    end = body.find(b"\npublic_key=", start - 1)
    at = body.find(b"\npreshared_key=", start - 1, len(body) if end < 0 else end)
    if at < 0:
        return None
    at += len(b"\npreshared_key=")
    value = body[at : body.find(b"\n", at)]
    try:
        psk = bytes.fromhex(value.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        psk = b""
    if len(psk) != 32:
        raise BackendError("the WireGuard control socket sent a malformed preshared key")
    return psk if any(psk) else None


def parse_get(body: bytes) -> dict[bytes, bytes | None]:
    """Every peer's PSK (None when it has none) from a get body."""
    return {peer: psk_at(body, start) for peer, start in index_peers(body).items()}


def judge(ops: Sequence[Op], body: bytes) -> list[Outcome]:
    """Outcomes from the get listed just before the batch's (accepted) writes.

    A write to a listed peer took effect (errno=0, `update_only` on an existing peer); a write
    to an unlisted one did nothing. A read compares the listed key.
    """
    starts: dict[bytes, int | None]
    if len(ops) <= FIND_LIMIT:
        starts = {op.peer: locate(body, op.peer) for op in ops}
    else:
        starts = {**index_peers(body)}
    held: dict[bytes, bytes | None] = {}
    for op in ops:
        start = starts.get(op.peer)
        if start is not None:
            held[op.peer] = op.expect if op.write else psk_at(body, start)
    return compare(ops, held)


class _Stale(Exception):
    """The connection broke (daemon restarted, idle connection closed): reconnect once."""


class UapiBackend:
    """Backend over `<directory>/<interface>.sock`."""

    name = "uapi"
    spin = 100e-6
    """The daemon answers in ~20 µs: worth retrying the read that long before sleeping."""

    def __init__(self, directory: Path = Path("/run/wireguard"), timeout: float = 5.0) -> None:
        self.directory = directory
        self.timeout = timeout
        self._conns: dict[str, socket.socket] = {}
        self._paths: dict[str, Path] = {}

    def socket_path(self, interface: str) -> Path:
        path = self._paths.get(interface)
        if path is None:
            path = self._paths[interface] = self.directory / f"{interface}.sock"
        return path

    def exists(self, interface: str) -> bool:
        return self.socket_path(interface).is_socket()

    def exchange(self, interface: str, ops: Sequence[Op]) -> Exchange[list[Outcome]]:
        """List the device and write the batch in one round trip (one reconnect allowed)."""
        path = self.socket_path(interface)
        for attempt in (1, 2):
            sock = self._conns.get(interface)
            reused = sock is not None
            try:
                if sock is None:
                    sock = yield from self._connect(interface)
                return (yield from self._exchange(sock, path, ops))
            except _Stale as exc:
                self._drop(interface)
                if reused and attempt == 1:
                    continue
                raise BackendError(f"{path}: {exc}") from None
            except BaseException:
                self._drop(interface)
                raise
        raise AssertionError("unreachable")

    def _connect(self, interface: str) -> Exchange[socket.socket]:
        path = self.socket_path(interface)
        try:
            sock = yield from connect_unix(path)
        except FileNotFoundError:
            raise BackendError(
                f"no WireGuard control socket for interface {interface!r} at {path}"
            ) from None
        except OSError as exc:
            raise BackendError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        self._conns[interface] = sock
        return sock

    def _exchange(
        self, sock: socket.socket, path: Path, ops: Sequence[Op]
    ) -> Exchange[list[Outcome]]:
        writes = False
        for op in ops:
            writes = writes or op.write
        request = build_set(ops, bytearray(GET)) if writes else bytearray(GET)
        try:
            yield from send_all(sock, request)
        except OSError as exc:
            raise _Stale(exc.strerror or "send failed") from None
        finally:
            request[:] = bytes(len(request))
        replies = yield from _read_replies(sock, path, 2 if writes else 1)
        body, code = split_reply(replies[0])
        if code != 0:
            raise BackendError(f"{path} refused to list the device: errno={code}")
        if writes and replies[1] != b"errno=0\n\n":
            code = parse_errno(replies[1])
            if code != 0:
                name = errno_codes.errorcode.get(-code, str(code))
                raise BackendError(f"{path} refused the PSK update: errno={code} ({name})")
        return judge(ops, body)

    def _drop(self, interface: str) -> None:
        sock = self._conns.pop(interface, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        for interface in list(self._conns):
            self._drop(interface)


def _read_replies(sock: socket.socket, path: Path, count: int) -> Exchange[list[bytes]]:
    """`count` replies in a row, each lines ending with `errno=N` and a blank line (a reply
    holds no blank line before its end)."""
    data = bytearray()
    ends: list[int] = []
    scan = 0
    while True:  # a reply holds no blank line before its end
        while len(ends) < count:
            at = data.find(b"\n\n", scan)
            if at < 0:
                break
            scan = at + 2
            ends.append(scan)
        if len(ends) == count:
            break
        scan = max(scan, len(data) - 1)
        try:
            chunk = sock.recv(65536)  # inline: this loop runs several times per install
        except BlockingIOError:
            yield sock, False
            continue
        except OSError as exc:
            raise _Stale(exc.strerror or "receive failed") from None
        if not chunk:
            raise _Stale("the daemon closed the connection")
        data += chunk
        if len(data) > MAX_REPLY:
            raise BackendError(f"{path} sent an oversized reply")
    if ends[-1] != len(data):
        raise BackendError(f"{path} sent more than was asked for")
    starts = [0, *ends[:-1]]
    return [bytes(data[a:b]) for a, b in zip(starts, ends, strict=True)]
