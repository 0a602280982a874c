"""Frames over a trio stream (the mutual-TLS connection), and the bridge for the engine's thread.

Every read has a deadline; a header announcing a frame outside the bounds is refused before the
body is read or any buffer for it exists (`frames.body_length`). Whatever goes wrong with the
connection (closed, reset, TLS failure, deadline) is a `ChannelError`; a malformed header is a
`FrameError`. The engine runs in a worker thread and calls `ThreadTransport`, which runs each
frame's I/O on the event loop (`trio.from_thread.run`): the connection stays a trio stream, and
cancelling the source's task cancels a block waiting for the peer.
"""

from __future__ import annotations

import trio

from .channel import ChannelError
from .frames import HEADER, MAX_FRAME, body_length

CHUNK = 1 << 16


class FramedStream:
    def __init__(self, stream: trio.abc.Stream, timeout: float, limit: int = MAX_FRAME) -> None:
        self.stream = stream
        self.timeout = timeout
        self.limit = limit
        self._buffer = bytearray()
        self._send_lock = trio.Lock()

    async def _read(self, count: int) -> bytes:
        while len(self._buffer) < count:
            try:
                data = await self.stream.receive_some(min(CHUNK, count - len(self._buffer)))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ChannelError("connection to the other end failed") from exc
            if not data:
                raise ChannelError("the other end closed the connection")
            self._buffer += data
        out = bytes(self._buffer[:count])
        del self._buffer[:count]
        return out

    async def receive_body(self, deadline: float | None = None) -> bytes:
        """The next frame's body (kind, payload, tag), within `deadline` seconds (default: the
        stream's timeout)."""
        with trio.move_on_after(self.timeout if deadline is None else deadline):
            length = body_length(await self._read(HEADER), self.limit)
            return await self._read(length)
        raise ChannelError("timed out waiting for the other end")

    async def send_frame(self, frame: bytes) -> None:
        async with self._send_lock:
            with trio.move_on_after(self.timeout):
                try:
                    await self.stream.send_all(frame)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise ChannelError("connection to the other end failed") from exc
                return
            raise ChannelError("timed out sending to the other end")

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await trio.aclose_forcefully(self.stream)


class ThreadTransport:
    """`netend.Transport` for the engine's worker thread: each call runs on the event loop."""

    def __init__(self, stream: FramedStream) -> None:
        self.stream = stream

    def send_frame(self, frame: bytes) -> None:
        trio.from_thread.run(self.stream.send_frame, frame)

    def receive_body(self) -> bytes:
        return trio.from_thread.run(self.stream.receive_body)
