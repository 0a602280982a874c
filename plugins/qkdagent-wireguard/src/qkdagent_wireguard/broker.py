"""A tiny privileged helper that sets PSKs for an unprivileged agent (Rosenpass-style split).

The broker holds CAP_NET_ADMIN (or access to the userspace control sockets); the agent does not.
It listens on a unix socket, checks the caller's kernel-reported credentials (SO_PEERCRED) as it
accepts the connection (a refused caller is closed before any of its bytes are read) and
serves only the interface/peer pairs it was started with. Frames are a 4-byte big-endian length
and a JSON body; a connection carries any number of requests in a row (the agent keeps one
open, which saves a connect/accept per install). Replies carry outcomes ("match",
"mismatch", ...), never key bytes, and the log names callers, interfaces and public keys only.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .backend import Backend, BackendError, Op, Outcome
from .drive import Exchange, connect_unix, drive_blocking, recv_some, send_all
from .keys import KEY_LEN, check_ifname, check_psk, parse_public_key, public_key_text

log = logging.getLogger(__name__)

MAX_FRAME = 8 * 1024 * 1024
MAX_OPS = 20000
VERSION = 1


class BrokerProtocolError(Exception):
    """A malformed or refused request; the text is safe to send back and to log."""


# -- framing ---------------------------------------------------------------------------------


def _frame(body: dict[str, object]) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()
    return struct.pack(">I", len(data)) + data


def _decode_frame(data: bytes) -> dict[str, object]:
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise BrokerProtocolError("frame is not valid JSON") from None
    if not isinstance(body, dict):
        raise BrokerProtocolError("frame must be a JSON object")
    return body


# -- request encoding (client) and decoding (server) -----------------------------------------


def encode_request(interface: str, ops: Sequence[Op]) -> dict[str, object]:
    return {
        "v": VERSION,
        "interface": interface,
        "ops": [
            {"peer": public_key_text(op.peer), "key": op.expect.hex(), "write": op.write}
            for op in ops
        ],
    }


def decode_request(body: dict[str, object]) -> tuple[str, list[Op]]:
    """Validate every field of an untrusted request."""
    if body.get("v") != VERSION:
        raise BrokerProtocolError(f"unsupported protocol version (this broker speaks {VERSION})")
    interface = body.get("interface")
    if not isinstance(interface, str) or check_ifname(interface):
        raise BrokerProtocolError("interface must be a Linux interface name")
    raw_ops = body.get("ops")
    if not isinstance(raw_ops, list) or not raw_ops or len(raw_ops) > MAX_OPS:
        raise BrokerProtocolError(f"ops must be a list of 1 to {MAX_OPS} operations")
    ops = []
    for index, item in enumerate(raw_ops):
        if not isinstance(item, dict) or set(item) != {"peer", "key", "write"}:
            raise BrokerProtocolError(f"ops[{index}] must have exactly peer, key and write")
        try:
            peer = parse_public_key(item["peer"])
        except ValueError as exc:
            raise BrokerProtocolError(f"ops[{index}].peer {exc}") from None
        key = item["key"]
        write = item["write"]
        if not isinstance(write, bool):
            raise BrokerProtocolError(f"ops[{index}].write must be a boolean")
        try:
            raw = bytes.fromhex(key) if isinstance(key, str) else b""
            check_psk(raw)
        except ValueError:
            raise BrokerProtocolError(
                f"ops[{index}].key must be {KEY_LEN} non-zero bytes in hex"
            ) from None
        ops.append(Op(peer, raw, write))
    if len({op.peer for op in ops}) != len(ops):
        raise BrokerProtocolError("a request names the same peer twice")
    return interface, ops


# -- server ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(conn: socket.socket) -> Credentials:
    """The connecting process's pid, uid and gid as the kernel recorded them at connect()."""
    data = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Credentials(*struct.unpack("3i", data))


def parse_allow(entries: Iterable[str]) -> frozenset[tuple[str, bytes]]:
    """`IFACE:PEER_PUBLIC_KEY_BASE64` entries; raises ValueError naming the bad entry."""
    allowed = set()
    for entry in entries:
        interface, sep, peer = entry.partition(":")
        if not sep:
            raise ValueError(f"--allow {entry!r}: expected INTERFACE:PEER_PUBLIC_KEY")
        if problem := check_ifname(interface):
            raise ValueError(f"--allow {entry!r}: interface {problem}")
        try:
            allowed.add((interface, parse_public_key(peer)))
        except ValueError as exc:
            raise ValueError(f"--allow {entry!r}: peer key {exc}") from None
    return frozenset(allowed)


class Broker:
    """Policy and dispatch; `serve` adds the socket loop."""

    def __init__(
        self,
        backend: Backend,
        allow: frozenset[tuple[str, bytes]],
        uids: frozenset[int],
        gids: frozenset[int] = frozenset(),
    ) -> None:
        self.backend = backend
        self.allow = allow
        self.uids = uids
        self.gids = gids

    def authorised(self, creds: Credentials) -> bool:
        """By uid, or by gid: SO_PEERCRED reports the caller's primary (effective) gid only,
        so membership of a supplementary group does not count."""
        return creds.uid in self.uids or creds.gid in self.gids

    def handle(self, body: dict[str, object], creds: Credentials) -> dict[str, object]:
        """Answer one request from a caller with `creds`; never raises for bad input."""
        if not self.authorised(creds):
            log.warning("refused caller pid=%d uid=%d gid=%d", creds.pid, creds.uid, creds.gid)
            return {"ok": False, "error": f"uid {creds.uid} is not allowed to use this broker"}
        try:
            interface, ops = decode_request(body)
            for op in ops:
                if (interface, op.peer) not in self.allow:
                    raise BrokerProtocolError(
                        f"interface {interface} peer {public_key_text(op.peer)} is not on the "
                        "broker's allow list"
                    )
            outcomes = drive_blocking(
                self.backend.exchange(interface, ops),
                self.backend.timeout,
                "WireGuard",
            )
        except (BrokerProtocolError, BackendError) as exc:
            log.warning("request from uid=%d refused: %s", creds.uid, exc)
            return {"ok": False, "error": str(exc)}
        log.info(
            "uid=%d interface=%s writes=%d outcomes=%s",
            creds.uid,
            interface,
            sum(op.write for op in ops),
            ",".join(sorted({o.value for o in outcomes})),
        )
        return {"ok": True, "outcomes": [o.value for o in outcomes]}

    def serve_frame(self, data: bytes, creds: Credentials) -> bytes:
        """The reply frame to one request frame body (a malformed body gets an error reply)."""
        try:
            body = _decode_frame(data)
        except BrokerProtocolError as exc:
            log.warning("bad frame from uid=%d: %s", creds.uid, exc)
            return _frame({"ok": False, "error": str(exc)})
        return _frame(self.handle(body, creds))


def bind_socket(path: Path, mode: int = 0o660, group: int | None = None) -> socket.socket:
    """Listen on `path` (a stale socket file is replaced; any other file is refused).

    The socket is bound under a temporary name, given its owner and mode, put in listening
    state and only then renamed into place, so a client never finds a socket that refuses
    connections or has the wrong permissions.
    """
    if (path.exists() or path.is_symlink()) and not path.is_socket():
        raise OSError(f"{path} exists and is not a socket; refusing to replace it")
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(os.fspath(staging))
    finally:
        os.umask(old)
    try:
        if group is not None:
            os.chown(staging, -1, group)
        os.chmod(staging, mode)
        sock.listen(64)
        os.replace(staging, path)
    except BaseException:
        sock.close()
        staging.unlink(missing_ok=True)
        raise
    return sock


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    creds: Credentials
    buf: bytearray


def serve(
    broker: Broker, listener: socket.socket, stop: socket.socket, max_conns: int = 128
) -> None:
    """Serve requests until `stop` turns readable (blocking, one thread).

    Connections stay open for further requests (the agent keeps one), so a single selector
    multiplexes them: a slow or idle client never holds up another. Requests are handled whole,
    one at a time, in arrival order; replies are small and sent with a timeout.
    """
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(stop, selectors.EVENT_READ)
    conns: dict[int, _Conn] = {}

    def drop(conn: _Conn) -> None:
        sel.unregister(conn.sock)
        del conns[conn.sock.fileno()]
        conn.sock.close()

    try:
        while True:
            for key, _ in sel.select():
                if key.fileobj is stop:
                    return
                if key.fileobj is listener:
                    try:
                        sock, _ = listener.accept()
                    except (BlockingIOError, ConnectionAbortedError, InterruptedError):
                        continue
                    except OSError as exc:
                        log.warning("accept failed: %s", exc)
                        return
                    conn = _admit(broker, sock, len(conns) >= max_conns)
                    if conn is not None:
                        conns[sock.fileno()] = conn
                        sel.register(sock, selectors.EVENT_READ)
                    continue
                conn = conns[key.fd]
                try:
                    if not _serve_ready(broker, conn):
                        drop(conn)
                except (OSError, BrokerProtocolError) as exc:
                    log.warning("connection from uid=%d failed: %s", conn.creds.uid, exc)
                    drop(conn)
    finally:
        for conn in list(conns.values()):
            drop(conn)
        sel.close()


def _admit(broker: Broker, sock: socket.socket, full: bool) -> _Conn | None:
    """A connection to serve, or None after closing it: too many connections, credentials
    unreadable, or a caller not allowed. A refused caller gets one short error frame (sent
    without blocking) and is closed before anything it sent is read."""
    try:
        sock.setblocking(False)
        if full:
            log.warning("too many connections; refusing one")
            sock.close()
            return None
        creds = peer_credentials(sock)
        if not broker.authorised(creds):
            log.warning("refused caller pid=%d uid=%d gid=%d", creds.pid, creds.uid, creds.gid)
            reply = {"ok": False, "error": f"uid {creds.uid} is not allowed to use this broker"}
            try:
                sock.send(_frame(reply))
            except OSError:
                pass
            sock.close()
            return None
    except OSError as exc:
        log.warning("cannot admit a connection: %s", exc)
        sock.close()
        return None
    return _Conn(sock, creds, bytearray())


def _serve_ready(broker: Broker, conn: _Conn) -> bool:
    """Read what arrived and answer every complete frame; False at end of stream."""
    try:
        chunk = conn.sock.recv(65536)
    except BlockingIOError:
        return True
    if not chunk:
        return False
    conn.buf += chunk
    while len(conn.buf) >= 4:
        (size,) = struct.unpack_from(">I", conn.buf)
        if size > MAX_FRAME:
            raise BrokerProtocolError(f"frame of {size} bytes exceeds the {MAX_FRAME}-byte limit")
        if len(conn.buf) < 4 + size:
            break
        data = bytes(conn.buf[4 : 4 + size])
        conn.buf[: 4 + size] = bytes(4 + size)  # wipe the request (it holds keys)
        del conn.buf[: 4 + size]
        reply = broker.serve_frame(data, conn.creds)
        conn.sock.settimeout(10)
        try:
            conn.sock.sendall(reply)
        finally:
            conn.sock.setblocking(False)
    return True


# -- client backend --------------------------------------------------------------------------


class _Stale(Exception):
    """A kept connection broke (broker restarted): reconnect once."""


class BrokerBackend:
    """The agent side: send a batch to the broker over one kept connection and map its
    outcomes; runs on the trio thread like the other backends."""

    name = "broker"

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None

    def exchange(self, interface: str, ops: Sequence[Op]) -> Exchange[list[Outcome]]:
        request = bytearray(_frame(encode_request(interface, ops)))
        try:
            for attempt in (1, 2):
                reused = self._sock is not None
                try:
                    if self._sock is None:
                        self._sock = yield from connect_unix(self.path)
                    reply = yield from _ask(self._sock, request)
                    break
                except _Stale as exc:
                    self.close()
                    if reused and attempt == 1:
                        continue
                    raise BackendError(f"broker at {self.path}: {exc}") from None
                except (OSError, BrokerProtocolError) as exc:
                    self.close()
                    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
                    raise BackendError(f"broker at {self.path}: {reason}") from None
                except BaseException:
                    self.close()
                    raise
        finally:
            request[:] = bytes(len(request))
        if reply.get("ok") is not True:
            error = reply.get("error")
            reason = error if isinstance(error, str) else "no reason given"
            raise BackendError(f"broker refused: {reason}")
        outcomes = reply.get("outcomes")
        try:
            assert isinstance(outcomes, list) and len(outcomes) == len(ops)
            return [Outcome(value) for value in outcomes]
        except (AssertionError, ValueError):
            raise BackendError("broker sent a malformed reply") from None

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def _ask(sock: socket.socket, request: bytearray) -> Exchange[dict[str, object]]:
    """One request/reply on a kept connection; _Stale when it broke before any reply byte.

    A caller the broker refuses at accept gets an error frame and is disconnected unread, so
    sending may fail: the frame is then looked for among what already arrived.
    """
    try:
        yield from send_all(sock, request)
    except (BrokenPipeError, ConnectionResetError) as exc:
        refusal = _arrived_frame(sock)
        if refusal is not None:
            return refusal
        raise _Stale(exc.strerror or "connection lost") from None
    try:
        head = yield from recv_some(sock, 4)
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise _Stale(exc.strerror or "connection lost") from None
    if not head:
        raise _Stale("the broker closed the connection")
    head += yield from _recv_exactly(sock, 4 - len(head))
    (size,) = struct.unpack(">I", head)
    if size > MAX_FRAME:
        raise BrokerProtocolError(f"reply of {size} bytes is too large")
    return _decode_frame((yield from _recv_exactly(sock, size)))


def _arrived_frame(sock: socket.socket, limit: int = 65536) -> dict[str, object] | None:
    """A whole reply frame already waiting on a broken connection, else None (no waiting)."""
    data = b""
    while len(data) < limit:
        try:
            chunk = sock.recv(limit - len(data), socket.MSG_DONTWAIT)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    if len(data) < 4:
        return None
    (size,) = struct.unpack_from(">I", data)
    if len(data) != 4 + size:
        return None
    try:
        return _decode_frame(data[4:])
    except BrokerProtocolError:
        return None


def _recv_exactly(sock: socket.socket, size: int) -> Exchange[bytes]:
    buf = bytearray()
    if size == 0:
        return b""
    while len(buf) < size:
        chunk = yield from recv_some(sock, min(size - len(buf), 65536))
        if not chunk:
            raise BrokerProtocolError("connection closed mid-frame")
        buf += chunk
    return bytes(buf)
