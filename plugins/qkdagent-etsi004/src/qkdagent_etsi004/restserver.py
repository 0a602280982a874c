"""One simulated module serving qkd-module's REST form (plain HTTP, h11 over trio).

Behind an explicit flag only (`qkdm-sim --rest`): plain HTTP has no identity and carries keys in
clear, exactly like the module it imitates. Requests are read within bounds (h11 bounds the
head, `rest.MAX_BODY` the body, `FRAME_TIMEOUT` the time) and parsed with the literal-only
parser; anything else gets HTTP 400/404/405/413 and the server keeps serving.

Semantics map onto the same `ModuleNetwork` as the binary dialects. The REST caller has no
certificate, so it acts as the module's first application. `destination` must be the peer
module's REST address, as the real module calls it to synchronise. Statuses use the module's
older numbering; index -1 asks for the first key this module has not handed out yet.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping

import h11
import trio

from . import codec, rest
from .codec import QoS, Status
from .network import ModuleNetwork, Wait
from .server import FRAME_TIMEOUT, MAX_CONNECTIONS

log = logging.getLogger(__name__)


class RestServer:
    def __init__(
        self,
        network: ModuleNetwork,
        module_id: str,
        addresses: Mapping[str, str],
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.network = network
        self.module_id = module_id
        self.app = sorted(network.modules[module_id])[0]
        self.addresses = addresses
        """module -> its REST HOST:PORT (filled in once every module is bound)."""
        self.host = host
        self.port = port
        self.refused = 0
        self.frame_timeout = FRAME_TIMEOUT
        self._served: dict[str, int] = {}
        """KSID text -> the next index `-1` hands out on this module."""
        self._open = 0

    def _event(self, text: str) -> None:
        log.info("qkdm-sim %s (REST, plain HTTP): %s", self.module_id, text)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, tcp: trio.SocketStream) -> None:
        try:
            if self._open >= MAX_CONNECTIONS:
                return
            self._open += 1
            try:
                await self._serve(tcp)
            finally:
                self._open -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(tcp)

    async def _serve(self, tcp: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        try:
            with trio.fail_after(self.frame_timeout):
                target, body = await self._read(tcp, conn)
        except trio.TooSlowError:
            self._refuse("request not received within the timeout")
            return
        except h11.ProtocolError:
            self._refuse("malformed HTTP request")
            await self._send(tcp, conn, 400, b"Bad Request")
            return
        except _Refused as exc:
            self._refuse(exc.why)
            await self._send(tcp, conn, exc.code, exc.why.encode())
            return
        if target is None:
            return
        code, answer = await self._answer(target, body)
        await self._send(tcp, conn, code, answer)

    async def _read(self, tcp: trio.SocketStream, conn: h11.Connection) -> tuple[str | None, bytes]:
        target: str | None = None
        body = bytearray()
        pieces = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await tcp.receive_some(65536)
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                target = event.target.decode("ascii", "replace")
                if event.method != b"POST":
                    raise _Refused(405, f"method {event.method[:10]!r} not allowed")
                if target not in rest.PATHS:
                    raise _Refused(404, "unknown path")
            elif isinstance(event, h11.Data):
                body += event.data
                pieces += 1
                if len(body) > rest.MAX_BODY:
                    raise _Refused(413, "body too long")
                if pieces > rest.MAX_BODY_PIECES:
                    raise _Refused(413, "body in too many pieces")
            elif isinstance(event, h11.EndOfMessage):
                return target, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""

    async def _send(
        self, tcp: trio.SocketStream, conn: h11.Connection, code: int, body: bytes
    ) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        headers = [
            ("Content-Type", "text/html; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
        try:
            data = conn.send(h11.Response(status_code=code, headers=headers))
            data += conn.send(h11.Data(body)) + conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return
        await tcp.send_all(data)

    def _refuse(self, why: str) -> None:
        self.refused += 1
        self._event(f"refused a request: {why}")

    async def _answer(self, target: str, body: bytes) -> tuple[int, bytes]:
        try:
            if target == "/open_connect":
                return self._open_connect(rest.decode_open(body))
            if target == "/get_key":
                return await self._get_key(rest.decode_get_key(body))
            if target == "/close":
                return self._close(rest.decode_close(body))
            return 200, rest.answer_available(self._available())
        except rest.LiteralError as exc:
            self._refuse(str(exc))
            return 400, b"Bad Request"

    def _open_connect(self, req: rest.OpenRequest) -> tuple[int, bytes]:
        peer = self.network.peer.get(self.module_id)
        failed = rest.OpenAnswer(req.ksid, rest.NO_QKD_CONNECTION)
        if peer is None or req.destination != self.addresses.get(peer):
            self._event("OPEN_CONNECT refused: destination is not the peer module")
            return 400, rest.answer_open(failed)
        if req.length <= 0 or req.length % 8 or req.timeout <= 0:
            return 400, rest.answer_open(failed)
        qos = QoS(key_chunk_size=req.length // 8, timeout=req.timeout, ttl=0)
        # URIs as the binary requests carry them: one pair per direction of the link
        binary = codec.OpenConnectRequest(
            f"qkd-module://{self.module_id}",
            f"qkd-module://{peer}",
            qos,
            codec.NULL_KSID if req.ksid is None else uuid.UUID(req.ksid).bytes,
        )
        answer = self.network.open_connect(self.module_id, self.app, binary)
        ksid = codec.ksid_text(answer.ksid)
        if answer.status in (Status.SUCCESSFUL, Status.PEER_NOT_CONNECTED):
            self._served.setdefault(ksid, 0)
            self._event(f"OPEN_CONNECT: status 0 KSID {ksid}")
            return 200, rest.answer_open(rest.OpenAnswer(ksid, rest.SUCCESSFUL))
        self._event(f"OPEN_CONNECT: status 2 (004 status {answer.status})")
        return 400, rest.answer_open(failed)

    async def _get_key(self, req: rest.GetKeyRequest) -> tuple[int, bytes]:
        index = req.index
        if index == -1:
            index = self._first_available(req.ksid)
        if not 0 <= index <= codec.UINT32_MAX:
            return 400, rest.answer_get_key(rest.KeyAnswer(None, -1, rest.INSUFFICIENT_KEY))
        binary = codec.GetKeyRequest(uuid.UUID(req.ksid).bytes, index, codec.MAX_METADATA, b"")
        deadline = trio.current_time() + 60.0
        while True:
            answer = self.network.get_key(self.module_id, self.app, binary)
            if not isinstance(answer, Wait):
                break
            if trio.current_time() + answer.seconds > deadline:
                return 400, rest.answer_get_key(rest.KeyAnswer(None, index, rest.INSUFFICIENT_KEY))
            await trio.sleep(answer.seconds)
        if answer.status != Status.SUCCESSFUL:
            # the module's answer for an unknown stream is [None, -1, 1], for a missing index
            # [None, index, 1]
            gone = answer.status == Status.GET_KEY_PEER_NOT_CONNECTED
            missing = rest.KeyAnswer(None, -1 if gone else index, rest.INSUFFICIENT_KEY)
            return 400, rest.answer_get_key(missing)
        if req.index == -1:
            self._served[req.ksid] = max(self._served.get(req.ksid, 0), index + 1)
        return 200, rest.answer_get_key(rest.KeyAnswer(answer.key, index, rest.SUCCESSFUL))

    def _first_available(self, ksid: str) -> int:
        """The lowest index not handed out by `-1` here and not already read by this module."""
        stream = self.network.streams.get(uuid.UUID(ksid).bytes)
        start = self._served.get(ksid, 0)
        if stream is None:
            return start
        for index in sorted(stream.chunks):
            if index >= start and self.module_id not in stream.chunks[index].readers:
                return index
        return max(start, stream.highest + 1)

    def _close(self, ksid: str) -> tuple[int, bytes]:
        closed = self.network.close(
            self.module_id, self.app, codec.CloseRequest(uuid.UUID(ksid).bytes)
        )
        self._served.pop(ksid, None)
        self._event(f"CLOSE {ksid}: status {closed.status}")
        if closed.status == Status.SUCCESSFUL:
            return 200, rest.answer_close(rest.SUCCESSFUL)
        return 400, rest.answer_close(rest.NO_QKD_CONNECTION)

    def _available(self) -> int:
        count = 0
        for stream in self.network.streams.values():
            if stream.apps.get(self.module_id) == self.app:
                count += sum(1 for c in stream.chunks.values() if self.module_id not in c.readers)
        return count


class _Refused(Exception):
    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code
        self.why = why
