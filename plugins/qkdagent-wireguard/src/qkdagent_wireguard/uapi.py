"""The cross-platform userspace control socket: protocol and client, tested with wireguard-go.

boringtun is not supported: its `set` answers keys it does not know, `update_only` included,
with EINVAL, and this client never writes without `update_only` (it must not create peers).

Requests are `key=value` lines ending with a blank line; keys are lowercase hex. One connection
per interface stays open. A batch is ONE round trip: `get=1` and then the `set=1` with every
write, sent together. That order is the only pipelining the daemon allows (wireguard-go parses a
`set` with a read-ahead scanner that swallows whatever follows it, but reads `get=1` exactly),
and it gives each install fresh evidence that its peer exists: the device is listed just before
the write, on the same connection, so a missing peer (where `update_only` silently does nothing)
is an error instead of a no-op, and `errno=0` on the set confirms the key was taken. Read ops
(verify, prepare) compare the PSK listed by that same `get`. Only the lines of the peers in the
batch are looked at. Request buffers are wiped after sending and replies after parsing (best
effort; see `ReplyBuffer`).
"""

from __future__ import annotations

import binascii
import errno as errno_codes
import functools
import re
import socket
from collections.abc import Sequence
from os import sched_yield
from pathlib import Path
from time import perf_counter

from .backend import BackendError, Op, Outcome, compare
from .drive import Exchange, connect_unix, send_all

MAX_REPLY = 64 * 1024 * 1024
BUFFER = 65536
"""Initial reply buffer per connection (a device listing of ~250 peers); doubled as needed."""
GET = b"get=1\n\n"
FIND_LIMIT = 8
"""Up to this many peers per batch are located with find, more with one regex pass."""
_PUBLIC = re.compile(rb"^public_key=([0-9a-f]{64})$", re.MULTILINE)
_PSK_LINE = b"\npreshared_key="

Buffer = bytes | bytearray
"""Replies are parsed in place: the functions below take the receive buffer and bounds."""


@functools.lru_cache(maxsize=4096)
def peer_line(peer: bytes) -> bytes:
    """`public_key=<hex>\n`: written and searched for on every install of that peer (public
    keys are not secret, so caching them is fine)."""
    return b"public_key=%s\n" % peer.hex().encode()


def build_set(ops: Sequence[Op], into: bytearray | None = None) -> bytearray:
    """`set=1` with one peer section per write: public key, update_only, then the PSK."""
    request = bytearray() if into is None else into
    request += b"set=1\n"
    for op in ops:
        if op.write:
            request += peer_line(op.peer)
            request += b"update_only=true\npreshared_key=%s\n" % op.expect.hex().encode()
    request += b"\n"
    return request


def split_reply(buf: Buffer, start: int = 0, end: int | None = None) -> tuple[int, int]:
    """(end of the body, errno) of the reply in `buf[start:end]`: its lines, the last being
    `errno=N`, then a blank line. The body is `buf[start:body_end]`; nothing is copied."""
    end = len(buf) if end is None else end
    line = buf.rfind(b"\n", start, end - 2) + 1 or start
    if (
        end - start < 9
        or not buf.endswith(b"\n\n", start, end)
        or not buf.startswith(b"errno=", line, end)
    ):
        raise BackendError("the WireGuard control socket sent a reply without a valid errno line")
    try:
        code = int(buf[line + 6 : end - 2])
    except ValueError:
        raise BackendError("the WireGuard control socket sent an invalid errno line") from None
    return line, code


def parse_errno(reply: Buffer) -> int:
    return split_reply(reply)[1]


def locate(body: Buffer, peer: bytes, end: int | None = None) -> int | None:
    """Offset just after the `public_key=` line of `peer` in a get body (up to `end`), None
    when absent."""
    end = len(body) if end is None else end
    line = peer_line(peer)
    at = body.find(line, 0, end)
    while at > 0 and body[at - 1] != 0x0A:  # must start a line
        at = body.find(line, at + 1, end)
    return None if at < 0 else at + len(line)


def index_peers(body: Buffer, end: int | None = None) -> dict[bytes, int]:
    """Every peer of a get body (up to `end`): public key -> offset just after its
    `public_key=` line."""
    end = len(body) if end is None else end
    return {bytes.fromhex(m[1].decode()): m.end() + 1 for m in _PUBLIC.finditer(body, 0, end)}


def psk_at(body: Buffer, start: int, end: int | None = None) -> bytes | None:
    """The PSK in the peer section starting at `start` (None when it has none or all-zero).

    Decoded straight from the buffer (no hex copy); the returned bytes cannot be wiped.
    """
    end = len(body) if end is None else end
    section = body.find(b"\npublic_key=", start - 1, end)
    at = body.find(_PSK_LINE, start - 1, end if section < 0 else section)
    if at < 0:
        return None
    at += len(_PSK_LINE)
    if body.find(b"\n", at, end) != at + 64:
        raise BackendError("the WireGuard control socket sent a malformed preshared key")
    with memoryview(body) as view:
        try:
            psk = binascii.a2b_hex(view[at : at + 64])
        except (binascii.Error, ValueError):
            raise BackendError(
                "the WireGuard control socket sent a malformed preshared key"
            ) from None
    return psk if any(psk) else None


def parse_get(body: Buffer, end: int | None = None) -> dict[bytes, bytes | None]:
    """Every peer's PSK (None when it has none) from a get body."""
    return {peer: psk_at(body, start, end) for peer, start in index_peers(body, end).items()}


def judge(ops: Sequence[Op], body: Buffer, end: int | None = None) -> list[Outcome]:
    """Outcomes from the get listed just before the batch's (accepted) writes.

    A write to a listed peer took effect (errno=0, `update_only` on an existing peer); a write
    to an unlisted one did nothing. A read compares the listed key.
    """
    if len(ops) == 1 and ops[0].write:  # one install: listed or not is the whole answer
        return [Outcome.NO_PEER if locate(body, ops[0].peer, end) is None else Outcome.MATCH]
    starts: dict[bytes, int | None]
    if len(ops) <= FIND_LIMIT:
        starts = {op.peer: locate(body, op.peer, end) for op in ops}
    else:
        starts = {**index_peers(body, end)}
    held: dict[bytes, bytes | None] = {}
    for op in ops:
        start = starts.get(op.peer)
        if start is not None:
            held[op.peer] = op.expect if op.write else psk_at(body, start, end)
    return compare(ops, held)


class ReplyBuffer:
    """One connection's receive buffer, reused and wiped after every exchange (best effort).

    A device listing holds the interface's private key and every peer's PSK. Replies are
    received straight into this buffer (`recv_into`, no intermediate bytes) and parsed in
    place; a reply that outgrows it is copied into one twice the size and the old one wiped.
    Not wiped: the PSKs a read op decodes (bytes, compared and dropped) and whatever copies
    the kernel and the daemon keep.
    """

    __slots__ = ("data", "used", "view")

    def __init__(self, size: int = BUFFER) -> None:
        self.data = bytearray(size)
        self.view = memoryview(self.data)
        self.used = 0

    def free(self) -> memoryview:
        """The unused tail (the buffer is doubled when full; OverflowError past MAX_REPLY)."""
        if self.used == len(self.data):
            if self.used >= MAX_REPLY:
                raise OverflowError("reply too large")
            bigger = bytearray(2 * self.used)
            bigger[: self.used] = self.view
            used = self.used
            self.release()
            self.data, self.view, self.used = bigger, memoryview(bigger), used
        return self.view[self.used :]

    def wipe(self) -> None:
        if self.used:
            self.data[: self.used] = bytes(self.used)
            self.used = 0

    def release(self) -> None:
        self.wipe()
        self.view.release()


class _Stale(Exception):
    """The connection broke (daemon restarted, idle connection closed): reconnect once."""


class UapiBackend:
    """Backend over `<directory>/<interface>.sock`."""

    name = "uapi"
    spin = 100e-6
    """Seconds a read that would block is retried before sleeping (see `_read_replies`)."""

    def __init__(self, directory: Path = Path("/run/wireguard"), timeout: float = 5.0) -> None:
        self.directory = directory
        self.timeout = timeout
        self._conns: dict[str, tuple[socket.socket, ReplyBuffer]] = {}
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
            conn = self._conns.get(interface)
            reused = conn is not None
            try:
                if conn is None:
                    conn = yield from self._connect(interface)
                return (yield from self._exchange(conn[0], conn[1], path, ops))
            except _Stale as exc:
                self._drop(interface)
                if reused and attempt == 1:
                    continue
                raise BackendError(f"{path}: {exc}") from None
            except BaseException:
                self._drop(interface)
                raise
        raise AssertionError("unreachable")

    def _connect(self, interface: str) -> Exchange[tuple[socket.socket, ReplyBuffer]]:
        path = self.socket_path(interface)
        try:
            sock = yield from connect_unix(path)
        except FileNotFoundError:
            raise BackendError(
                f"no WireGuard control socket for interface {interface!r} at {path}"
            ) from None
        except OSError as exc:
            raise BackendError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        conn = self._conns[interface] = (sock, ReplyBuffer())
        return conn

    def _exchange(
        self, sock: socket.socket, buf: ReplyBuffer, path: Path, ops: Sequence[Op]
    ) -> Exchange[list[Outcome]]:
        writes = False
        for op in ops:
            writes = writes or op.write
        request = build_set(ops, bytearray(GET)) if writes else bytearray(GET)
        try:
            try:  # inline first attempt: a request nearly always fits the socket buffer
                sent = sock.send(request)
            except BlockingIOError:
                sent = 0
            if sent < len(request):
                yield from send_all(sock, memoryview(request)[sent:])
        except OSError as exc:
            raise _Stale(exc.strerror or "send failed") from None
        finally:
            request[:] = bytes(len(request))
        try:
            ends = yield from _read_replies(sock, buf, path, 2 if writes else 1, self.spin)
            data = buf.data
            body_end, code = split_reply(data, 0, ends[0])
            if code != 0:
                raise BackendError(f"{path} refused to list the device: errno={code}")
            if writes and not (ends[1] - ends[0] == 9 and data.startswith(b"errno=0\n\n", ends[0])):
                code = split_reply(data, ends[0], ends[1])[1]
                if code != 0:
                    name = errno_codes.errorcode.get(-code, str(code))
                    raise BackendError(f"{path} refused the PSK update: errno={code} ({name})")
            return judge(ops, data, body_end)
        finally:
            buf.wipe()

    def _drop(self, interface: str) -> None:
        conn = self._conns.pop(interface, None)
        if conn is not None:
            conn[0].close()
            conn[1].release()

    def close(self) -> None:
        for interface in list(self._conns):
            self._drop(interface)


def _read_replies(
    sock: socket.socket, buf: ReplyBuffer, path: Path, count: int, spin: float
) -> Exchange[list[int]]:
    """Receive `count` replies in a row into `buf`; their end offsets. Each reply is lines
    ending with `errno=N` and a blank line (it holds no blank line before its end).

    A read that would block is retried for `spin` seconds, and only then waited for (a yield
    to the driver): the daemon answers in 20-60 µs, and sleeping instead adds our own thread's
    wake-up from idle (30-80 µs on a VM). Between retries it gives the CPU away (sched_yield):
    the kernel often wakes the daemon's thread on the CPU of the client that wrote to it, and
    a plain busy loop would keep it from running until the spin ran out (measured: median
    75-80 µs and p90 260-290 µs per install without the yield, 47-61 and 82-94 µs with it).
    The loop stays in here, tight, so a reply is noticed within one retry of landing.
    """
    data = buf.data
    ends: list[int] = []
    scan = 0
    recv_into = sock.recv_into
    spin_until = 0.0
    while True:
        while len(ends) < count:
            at = data.find(b"\n\n", scan, buf.used)
            if at < 0:
                break
            scan = at + 2
            ends.append(scan)
        if len(ends) == count:
            break
        scan = max(scan, buf.used - 1)
        try:
            tail = buf.free()
        except OverflowError:
            raise BackendError(f"{path} sent an oversized reply") from None
        data = buf.data
        try:
            while True:
                try:
                    received = recv_into(tail)
                    break
                except BlockingIOError:
                    now = perf_counter()
                    if not spin_until:
                        spin_until = now + spin
                    if now > spin_until:
                        yield sock, False
                    else:
                        sched_yield()  # the daemon may be queued on this very CPU
        except OSError as exc:
            raise _Stale(exc.strerror or "receive failed") from None
        finally:
            tail.release()
        if not received:
            raise _Stale("the daemon closed the connection")
        buf.used += received
    if ends[-1] != buf.used:
        raise BackendError(f"{path} sent more than was asked for")
    return ends
