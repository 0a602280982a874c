"""A trio-native, cancellable subscription to charon's VICI `log` events.

Used while a reauthentication runs: an attempt that fails (AUTH_FAILED, no PPK) can come and go
within milliseconds, between two `list-sas` polls; its log lines carry the new IKE SA's unique
id, so the sink learns that the attempt existed. The wire format is the `vici` package's own
(`vici.protocol`); only the socket is trio's, so waiting for events never blocks a thread.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from vici.protocol import Message, Packet

from qkdagent import SinkError

from .logic import decode
from .vici_io import BACKLOG_RETRIES

MAX_PACKET = 512 * 1024


class LogEvents:
    """Receive side of one VICI connection registered for `log` events."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    @classmethod
    @asynccontextmanager
    async def open(cls, path: Path) -> AsyncIterator[LogEvents]:
        delays = iter(BACKLOG_RETRIES)
        while True:
            try:
                stream = await trio.open_unix_socket(str(path))
                break
            except OSError as exc:
                delay = next(delays, None) if exc.errno == errno.EAGAIN else None
                if delay is None:
                    raise SinkError(
                        f"cannot connect to VICI socket {path}: {exc.strerror}"
                    ) from None
                await trio.sleep(delay)
        async with stream:
            events = cls(stream)
            await events._send(Packet.register_event("log"))
            while True:
                kind, _ = await events._packet()
                if kind == Packet.EVENT_CONFIRM:
                    break
                if kind == Packet.EVENT_UNKNOWN:
                    raise SinkError("charon does not offer VICI log events")
            yield events

    async def next(self, containing: bytes = b"") -> dict[str, object]:
        """The next log event: `group`, `level`, `msg`, and `ikesa-name`/`ikesa-uniqueid`.

        Events whose raw bytes lack `containing` are skipped without decoding: charon sends
        every log line to every subscriber, and most are about other connections.
        """
        while True:
            raw = await self._raw_packet()
            if containing not in raw:
                continue
            packet = Packet.parse(raw)
            if packet.response_type == Packet.EVENT:
                message = decode(Message.deserialize(packet.payload))
                return message if isinstance(message, dict) else {}

    async def _send(self, packet: bytes) -> None:
        await self._stream.send_all(struct.pack("!I", len(packet)) + packet)

    async def _packet(self) -> tuple[int, object]:
        packet = Packet.parse(await self._raw_packet())
        return packet.response_type, packet

    async def _raw_packet(self) -> bytes:
        (length,) = struct.unpack("!I", await self._exactly(4))
        if length > MAX_PACKET:
            raise SinkError(f"VICI packet of {length} bytes is too large")
        return await self._exactly(length)

    async def _exactly(self, count: int) -> bytes:
        while len(self._buffer) < count:
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                raise SinkError("charon closed the VICI event connection")
            self._buffer += chunk
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data
