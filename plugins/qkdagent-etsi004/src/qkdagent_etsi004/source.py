"""Source type `etsi004`: keys from a QKD module over ETSI GS QKD 004 (binary over mutual TLS, or
qkd-module's plain-HTTP REST form behind an explicit `insecure = true`).

Roles (REFERENCE §2.1): the initiator opens a key stream with a null KSID and hands out
`KSID:index` as key IDs, one fresh index per key; the responder opens the same KSID on its own
module and reads that index. Both agree on the index through the key ID, never by assuming it.
Streams stay open across rotations and are re-opened after CLOSE, TTL expiry, a module restart
(status 3) or a transport error; they are closed on shutdown. A key is used only if the module
answered status 0 for the very index asked, with exactly `key_chunk_size` bytes, not all zero,
and (responder) an index this source has not read before.
"""

from __future__ import annotations

import logging
import ssl
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import trio
from cryptography import x509
from cryptography.x509.oid import NameOID

from qkdagent import (
    ComponentEvent,
    Key,
    KeyNotFound,
    Link,
    Misconfigured,
    Options,
    PluginContext,
    Secret,
    Source,
    SourceError,
    SourceUnavailable,
    client_ssl_context,
    decimal,
)

from . import codec, rest
from .codec import Dialect, FrameError, QoS, Status
from .restmodule import RestModule
from .reuse import Learned, Persistence, ReusePolicy, parse_persistent
from .transport import Endpoint, Idle, ModuleConnection, TransportError

log = logging.getLogger(__name__)

TRANSPORTS = ("binary-v2", "binary-v1", "qkd-module")
REST_WARNING = (
    "transport qkd-module is plain HTTP without authentication: keys travel in clear and "
    "anyone on the path can read or inject them (insecure = true)"
)
REST_STRIKES = 3
"""Answers of 'stream unknown' ([None, -1, 1]) in a row before the initiator re-opens."""
RESPONDER_STREAMS = 16
"""KSIDs a responder keeps open (older ones are closed): an initiator re-opens rarely."""
OPENED_REMEMBERED = 4096
"""KSIDs an initiator remembers having been given (streams open or closed): a module that
hands one out again, for this destination or another, would have the same indices, so the
same keys, read twice (review finding); it is refused."""
MAX_INDICES = 1 << 20
"""Indices a responder remembers per stream (reuse refused); past it the stream is refused."""
CLOSE_GRACE = 2.0
CLOSE_WAIT = 0.2
"""Seconds after an answer `persistent = "auto"` waits, while it does not know the module keeps
connections, for the module to close a kept one before reusing it (a request written into a
connection the module is closing may have been executed: it is never resent)."""


def _split_address(text: str) -> str | None:
    host, sep, port = text.rpartition(":")
    number = decimal(port, 5)
    if not sep or not host or number is None or not 0 < number < 65536:
        return "must be HOST:PORT"
    return None


def _certificate_names(der: bytes | None) -> list[str]:
    """The CN and DNS names of the module's certificate. Raises if `cryptography` cannot read
    it (`ValueError`, `UnsupportedGeneralNameType`, `DuplicateExtension`...): OpenSSL, which
    checked it, takes some extensions it refuses (review finding)."""
    if not der:
        return []
    cert = x509.load_der_x509_certificate(der)
    names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names += san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        pass
    return names


@dataclass
class KeyStream:
    ksid: bytes
    qos: QoS
    opened: float
    next_index: int = 0
    read: set[int] = field(default_factory=set)
    asking: set[int] = field(default_factory=set)
    """Indices a `key_by_id` call is reading right now (a GET_KEY is never sent twice at once)."""
    text: str = ""
    """The KSID as UUID text (made once: every key ID carries it)."""

    def __post_init__(self) -> None:
        self.text = codec.ksid_text(self.ksid)

    def key_id(self, index: int) -> str:
        return f"{self.text}:{index}"


class Etsi004Source(Source):
    """An application's view of its QKD module. See the package README for every option."""

    fetch_ahead = True  # key_by_id is a round trip to the module: announce ahead

    type_name = "etsi004"

    def __init__(self, name: str, options: Options, context: PluginContext) -> None:
        super().__init__(name, options, context)
        address = options.string("module", check=_split_address)
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        self.transport: str = options.string("transport", "binary-v2", choices=TRANSPORTS)
        self.rest: RestModule | None = None
        self.insecure: bool = options.boolean("insecure", False)
        if self.transport == "qkd-module":
            if not self.insecure:
                options.fail("insecure", f"must be true to accept it: {REST_WARNING}")
            options.warn("transport", REST_WARNING)
        elif self.insecure:
            options.fail("insecure", f"applies only to transport qkd-module, not {self.transport}")
        rest_form = self.transport == "qkd-module"
        self.dialect = Dialect.V2 if rest_form else Dialect(self.transport)
        # plain HTTP has no TLS identity: cert/key/ca/module_id/server_name stay unknown options
        self.cert: Path = Path() if rest_form else options.path("cert")
        self.key_file: Path = Path() if rest_form else options.path("key")
        self.ca: Path = Path() if rest_form else options.path("ca")
        self.module_id: str | None = (
            None if rest_form else options.string("module_id", None, max_len=256)
        )
        self.endpoint = Endpoint(
            host, int(port), host if rest_form else options.string("server_name", host)
        )
        self.source_uri: str = options.string(
            "source_uri", f"qkd://{context.agent_name}", max_len=codec.MAX_URI
        )
        peers = options.table("peer_uris", {})
        for agent, uri in peers.items():
            if not isinstance(uri, str) or not uri or len(uri) > codec.MAX_URI:
                options.fail("peer_uris", f"entry {agent!r} must be a URI string")
            if rest_form and (_split_address(uri) or not uri.isascii()):
                options.fail("peer_uris", f"entry {agent!r}: the peer module's HOST:PORT")
        if rest_form and not (self.source_uri.isascii() and self.source_uri.isprintable()):
            options.fail("source_uri", "must be printable ASCII for transport qkd-module")
        self.peer_uris: dict[str, str] = dict(peers)
        self.qos = QoS(
            key_chunk_size=options.integer("key_chunk_size", 32, min=16, max=codec.MAX_KEY_CHUNK),
            max_bps=options.integer("max_bps", 0, min=0, max=codec.UINT32_MAX),
            min_bps=options.integer("min_bps", 0, min=0, max=codec.UINT32_MAX),
            jitter=options.integer("jitter", 0, min=0, max=codec.UINT32_MAX),
            priority=options.integer("priority", 0, min=0, max=codec.UINT32_MAX),
            timeout=options.integer("qos_timeout", 5000, min=1, max=600_000),
            ttl=options.integer("ttl", 3600, min=1, max=codec.UINT32_MAX),
            metadata_mimetype=options.string(
                "metadata_mimetype", "application/json", max_len=codec.MAX_MIMETYPE
            ),
        )
        self.metadata_size: int = (
            0 if rest_form else options.integer("metadata_size", 256, min=2, max=codec.MAX_METADATA)
        )
        self.reuse = ReusePolicy(Persistence.NEVER)
        if not rest_form:
            default = True if self.dialect is Dialect.V1 else "auto"
            mode = parse_persistent(options.raw("persistent", default))
            if mode is None:
                options.fail("persistent", 'must be true, false or "auto"')
            self.reuse = ReusePolicy(mode)
        self.connect_timeout: float = options.number("connect_timeout", 3.0, positive=True)
        if rest_form:
            self.rest = RestModule(
                host, int(port), self._where(), self.request_timeout, codec.MAX_KEY_CHUNK
            )
        self._strikes = 0
        self._streams: dict[str, KeyStream] = {}
        """Initiator streams, per peer agent."""
        self._joined: OrderedDict[bytes, KeyStream] = OrderedDict()
        """Responder streams, per KSID."""
        self._given: OrderedDict[bytes, None] = OrderedDict()
        """KSIDs OPEN_CONNECT gave this side as initiator, the latest `OPENED_REMEMBERED`."""
        self._conn: ModuleConnection | None = None
        self._conn_lock = trio.Lock()
        self._open_lock = trio.Lock()
        self._context: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        where = f"{self.endpoint.host}:{self.endpoint.port}"
        insecure = " INSECURE plain HTTP" if self.rest else ""
        return f"<Etsi004Source {self.name!r} module={where} {self.transport}{insecure}>"

    @property
    def request_timeout(self) -> float:
        """Seconds one exchange may take: the QoS timeout plus the connection set-up."""
        return self.qos.timeout / 1000 + self.connect_timeout

    # -- lifecycle ------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Load the TLS identity and prove the module answers the handshake as `module_id`."""
        if self.rest is not None:
            await self._prepare_rest(self.rest)
            return
        self._context = await trio.to_thread.run_sync(self._ssl_context)
        try:
            with trio.fail_after(self.connect_timeout):
                conn = await self._connect()
        except (TransportError, trio.TooSlowError) as exc:
            raise SourceUnavailable(f"{self._where()}: {exc or 'connect timed out'}") from None
        except SourceError as exc:
            raise Misconfigured(str(exc)) from None
        await conn.aclose()
        log.info(
            "source %s: QKD module %s reachable (%s)", self.name, self._where(), self.transport
        )

    async def _prepare_rest(self, module: RestModule) -> None:
        """Say loudly what the opt-in exposes, check every peer has a module address, and
        prove the module answers (`/available_keys` changes nothing there)."""
        log.warning("source %s: %s", self.name, REST_WARNING)
        self.context.report(ComponentEvent(self.name, "insecure_transport", REST_WARNING))
        for link in self.links:
            if link.peer not in self.peer_uris:
                raise Misconfigured(
                    f"{self._where()}: peer_uris has no module HOST:PORT for peer {link.peer!r}"
                )
        try:
            count = await module.available()
        except SourceUnavailable:
            raise
        except SourceError as exc:
            raise Misconfigured(f"{exc} (is this a qkd-module REST endpoint?)") from None
        log.info("source %s: qkd-module %s reachable, %d keys", self.name, self._where(), count)

    def _ssl_context(self) -> ssl.SSLContext:
        return client_ssl_context(self.cert, self.key_file, self.ca, what=f"source {self.name!r}")

    async def aclose(self) -> None:
        """CLOSE every stream this source opened (best effort, bounded), then disconnect."""
        streams = [*self._streams.values(), *self._joined.values()]
        self._streams.clear()
        self._joined.clear()
        with trio.move_on_after(CLOSE_GRACE, shield=True):
            for stream in streams:
                try:
                    if self.rest is not None:
                        await self.rest.close(stream.text)
                        continue
                    await self._call(codec.CloseRequest(stream.ksid), codec.Service.CLOSE_RESPONSE)
                except (SourceError, TransportError, FrameError):
                    break
        if self._conn is not None:
            await self._conn.aclose()
            self._conn = None

    # -- connections ----------------------------------------------------------------------

    def _where(self) -> str:
        return f"source {self.name!r}: module {self.endpoint.host}:{self.endpoint.port}"

    async def _connect(self) -> ModuleConnection:
        if self._context is None:
            self._context = await trio.to_thread.run_sync(self._ssl_context)
        conn = await ModuleConnection.connect(self.endpoint, self._context, self.dialect)
        if self.module_id is None:
            return conn
        try:
            names = _certificate_names(conn.peer_certificate())
        except Exception:  # cryptography's parse errors are not all ValueErrors
            await conn.aclose()
            raise SourceError(
                f"{self._where()}: its TLS certificate cannot be read to check module_id "
                f"{self.module_id!r}"
            ) from None
        if self.module_id not in names:
            await conn.aclose()
            raise SourceError(
                f"{self._where()}: its TLS certificate does not name module_id {self.module_id!r}"
            )
        return conn

    async def _call(self, request: codec.Message, expect: codec.Service) -> codec.Message:
        """One request/response within `request_timeout`; errors typed, connection dropped.

        A request is written once, on one connection, and never again by this source: a
        connection the module closed is found out before anything is written to it (and
        replaced); one that fails after the request was written is one failed attempt, as the
        module may have executed the request (a GET_KEY index is single-use).
        """
        try:
            with trio.fail_after(self.request_timeout):
                if not self.reuse.keep(trio.current_time()):
                    conn = await self._connect()
                    try:
                        return await conn.call(request, expect)
                    finally:
                        await conn.aclose()
                async with self._conn_lock:
                    return await self._call_kept(request, expect)
        except trio.TooSlowError:
            raise SourceUnavailable(f"{self._where()}: no answer within the timeout") from None
        except TransportError as exc:
            raise SourceUnavailable(f"{self._where()}: {exc}") from None
        except FrameError as exc:
            raise SourceError(f"{self._where()}: malformed answer refused: {exc}") from None

    async def _call_kept(self, request: codec.Message, expect: codec.Service) -> codec.Message:
        """The request on the kept connection if the module left it open, else on a new one
        that is kept in turn (caller holds `_conn_lock`)."""
        conn = self._conn
        if conn is not None:
            state = await conn.idle(0.0 if self.reuse.learned is Learned.KEEPS else CLOSE_WAIT)
            if state is not Idle.OPEN:
                await conn.aclose()
                conn = self._conn = None
                if state is Idle.CLOSED:
                    self._learn_close()
        if conn is None:
            conn = self._conn = await self._connect()
        reused = conn.answered > 0
        try:
            answer = await conn.call(request, expect)
        except TransportError:
            if reused:  # written into a connection the module was closing, perhaps
                self._learn_close()
            raise
        finally:
            if conn.broken:
                await conn.aclose()
                self._conn = None
        if reused and self.reuse.saw_reuse():
            log.info("%s: the module keeps connections open; one is reused", self._where())
        if not self.reuse.keep(trio.current_time()):
            await conn.aclose()
            self._conn = None
        return answer

    def _learn_close(self) -> None:
        if not self.reuse.saw_close(trio.current_time()):
            return
        if self.reuse.mode is Persistence.AUTO:
            log.info(
                "%s: the module closed a kept connection; a connection per request "
                "(looked at again in %.0f s)",
                self._where(),
                self.reuse.reprobe_after,
            )
        else:
            log.info("%s: the module closed a kept connection (persistent = true)", self._where())

    @property
    def module_keeps_connections(self) -> bool | None:
        """What was last seen of the module: None until a kept connection was reused or found
        closed (always None with `persistent = false`)."""
        if self.reuse.learned is Learned.UNKNOWN:
            return None
        return self.reuse.learned is Learned.KEEPS

    # -- OPEN_CONNECT ---------------------------------------------------------------------

    def peer_uri(self, link: Link) -> str:
        return self.peer_uris.get(link.peer, f"qkd://{link.peer}")

    async def _open(self, link: Link, ksid: bytes) -> KeyStream:
        source, destination = self.source_uri, self.peer_uri(link)
        if self.rest is not None:
            asked = None if ksid == codec.NULL_KSID else codec.ksid_text(ksid)
            rest_request = rest.OpenRequest(
                source, destination, self.qos.timeout, self.qos.key_chunk_size * 8, asked
            )
            got = await self.rest.open(rest_request)
            stream_id = uuid.UUID(got).bytes
            if ksid == codec.NULL_KSID:
                self._new_stream_id(stream_id)
            log.info("%s: key stream %s open (qkd-module)", self._where(), got)
            return KeyStream(stream_id, self.qos, trio.current_time())
        qos = self.qos
        for _attempt in range(2):
            request = codec.OpenConnectRequest(source, destination, qos, ksid)
            answer = await self._call(request, codec.Service.OPEN_CONNECT_RESPONSE)
            assert isinstance(answer, codec.OpenConnectResponse)
            status = answer.status
            if status in (Status.SUCCESSFUL, Status.PEER_NOT_CONNECTED):
                return self._opened(answer, ksid, qos)
            if status == Status.QOS_NOT_SATISFIABLE and answer.qos is not None:
                problem = self._unacceptable(answer.qos)
                if problem is not None:
                    raise Misconfigured(f"{self._where()}: QoS counter-proposal refused: {problem}")
                log.warning("%s: module granted less QoS than asked; accepted", self._where())
                if answer.ksid != codec.NULL_KSID and (ksid in (codec.NULL_KSID, answer.ksid)):
                    return self._opened(answer, ksid, answer.qos)
                qos = answer.qos
                continue
            raise self._open_failure(status)
        raise SourceError(
            f"{self._where()}: OPEN_CONNECT refused the module's own counter-proposal"
        )

    def _opened(self, answer: codec.OpenConnectResponse, ksid: bytes, asked: QoS) -> KeyStream:
        granted = answer.qos or asked
        problem = self._unacceptable(granted)
        if problem is not None:
            raise Misconfigured(f"{self._where()}: OPEN_CONNECT granted unusable QoS: {problem}")
        if answer.qos is None and ksid == codec.NULL_KSID:
            raise SourceError(f"{self._where()}: OPEN_CONNECT answer carries no Key_stream_ID")
        got = answer.ksid if answer.qos is not None else ksid
        if ksid == codec.NULL_KSID and got == codec.NULL_KSID:
            raise SourceError(f"{self._where()}: OPEN_CONNECT answered a null Key_stream_ID")
        if ksid != codec.NULL_KSID and got != ksid:
            raise SourceError(f"{self._where()}: OPEN_CONNECT answered another Key_stream_ID")
        if ksid == codec.NULL_KSID:
            self._new_stream_id(got)
        log.info(
            "%s: key stream %s open (status %d, chunk %d bytes, ttl %d s)",
            self._where(),
            codec.ksid_text(got),
            answer.status,
            granted.key_chunk_size,
            granted.ttl,
        )
        return KeyStream(got, granted, trio.current_time())

    def _new_stream_id(self, got: bytes) -> None:
        """A new stream of ours: its KSID must be new too (`OPENED_REMEMBERED`)."""
        if got in self._given or got in self._joined:
            raise SourceError(
                f"{self._where()}: OPEN_CONNECT answered Key_stream_ID {codec.ksid_text(got)}, "
                "which a stream of this source had before: its keys would be read twice; refused"
            )
        self._given[got] = None
        while len(self._given) > OPENED_REMEMBERED:
            self._given.popitem(last=False)

    def _unacceptable(self, granted: QoS) -> str | None:
        if granted.key_chunk_size != self.qos.key_chunk_size:
            return f"key_chunk_size {granted.key_chunk_size}, configured {self.qos.key_chunk_size}"
        if self.qos.min_bps and granted.max_bps < self.qos.min_bps:
            return f"max_bps {granted.max_bps} is below the configured min_bps {self.qos.min_bps}"
        if granted.ttl == 0:
            return "ttl 0"
        if granted.metadata_mimetype != self.qos.metadata_mimetype:
            return f"metadata_mimetype {granted.metadata_mimetype[:60]!r}"
        return None

    def _open_failure(self, status: int) -> Exception:
        where = f"{self._where()}: OPEN_CONNECT status {status}"
        if status == Status.NO_QKD_CONNECTION:
            return Misconfigured(f"{where} (no QKD connection: check source_uri and peer_uris)")
        if status == Status.KSID_IN_USE:
            return Misconfigured(f"{where} (Key_stream_ID in use by another application)")
        if status == Status.QOS_NOT_SATISFIABLE:
            return Misconfigured(f"{where} (QoS not satisfiable, no counter-proposal)")
        if status in (Status.INSUFFICIENT_KEY, Status.GET_KEY_PEER_NOT_CONNECTED, Status.TIMEOUT):
            return SourceUnavailable(f"{where} (try again later)")
        return SourceError(f"{where} (not a valid OPEN_CONNECT status)")

    # -- GET_KEY --------------------------------------------------------------------------

    async def _get(self, stream: KeyStream, index: int) -> bytes:
        """The key at `index`, checked; raises typed errors (status 3: `_Gone`)."""
        capacity = self.metadata_size
        for _attempt in range(2):
            metadata = bytes(capacity) if self.dialect is Dialect.V2 else b""
            request = codec.GetKeyRequest(stream.ksid, index, capacity, metadata)
            answer = await self._call(request, codec.Service.GET_KEY_RESPONSE)
            assert isinstance(answer, codec.GetKeyResponse)
            if answer.status == Status.SUCCESSFUL:
                return self._checked(answer, stream, index)
            where = f"{self._where()}: GET_KEY {stream.key_id(index)}"
            if answer.status == Status.METADATA_TOO_SMALL:
                needed = answer.required_metadata_size
                if not capacity < needed <= codec.MAX_METADATA:
                    raise SourceError(f"{where}: status 8 asks for {needed} metadata bytes")
                # headroom: metadata such as the key's age may grow between the two calls
                capacity = min(codec.MAX_METADATA, needed + 64)
                continue
            if answer.status == Status.GET_KEY_PEER_NOT_CONNECTED:
                raise _Gone(f"{where}: status 3 (stream unknown or peer not connected)")
            if answer.status in (Status.INSUFFICIENT_KEY, Status.TIMEOUT):
                raise SourceUnavailable(f"{where}: status {answer.status} (try again later)")
            raise SourceError(f"{where}: status {answer.status} is not a GET_KEY answer")
        raise SourceError(f"{self._where()}: status 8 again after resizing the metadata buffer")

    def _checked(self, answer: codec.GetKeyResponse, s: KeyStream, index: int) -> bytes:
        if answer.index == index and len(answer.key) == s.qos.key_chunk_size and any(answer.key):
            return answer.key
        where = f"{self._where()}: GET_KEY {s.key_id(index)}"
        if answer.index != index:
            raise SourceError(f"{where}: answer is for index {answer.index}; key not used")
        if len(answer.key) != s.qos.key_chunk_size:
            raise SourceError(
                f"{where}: key of {len(answer.key)} bytes, {s.qos.key_chunk_size} negotiated; "
                "key not used"
            )
        raise SourceError(f"{where}: key of all zero bytes refused")

    def _expired(self, stream: KeyStream) -> bool:
        return trio.current_time() - stream.opened >= stream.qos.ttl

    def _usable(self, stream: KeyStream) -> bool:
        """An initiator stream that may hand out its next index."""
        return not self._expired(stream) and stream.next_index <= codec.UINT32_MAX

    async def _rest_get(self, stream: KeyStream, index: int) -> tuple[bytes, int]:
        """qkd-module GET_KEY (`index` -1: the first available); the key checked like binary's."""
        assert self.rest is not None
        answer = await self.rest.get_key(stream.text, index)
        where = f"{self._where()}: GET_KEY {stream.text}:{index}"
        if answer.key is None:
            if answer.index == -1 and index != -1:
                raise _Gone(f"{where}: status 1 for no index (stream unknown?)")
            if answer.index == -1:
                self._strikes += 1
                if self._strikes >= REST_STRIKES:
                    raise _Gone(f"{where}: status 1 for no index {self._strikes} times")
            raise SourceUnavailable(f"{where}: status 1, insufficient key (try again later)")
        self._strikes = 0
        got = answer.index
        if index == -1 and not stream.next_index <= got <= codec.UINT32_MAX:
            raise SourceError(f"{where}: answer is for index {got}, not a fresh one; key not used")
        if index != -1 and got != index:
            raise SourceError(f"{where}: answer is for index {got}; key not used")
        if len(answer.key) != stream.qos.key_chunk_size:
            raise SourceError(
                f"{where}: key of {len(answer.key)} bytes, {stream.qos.key_chunk_size} asked; "
                "key not used"
            )
        if not any(answer.key):
            raise SourceError(f"{where}: key of all zero bytes refused")
        return answer.key, got

    async def _rest_new_key(self, link: Link) -> Key:
        async with self._open_lock:
            stream = self._streams.get(link.peer)
            if stream is None or self._expired(stream):
                self._streams.pop(link.peer, None)
                stream = self._streams[link.peer] = await self._open(link, codec.NULL_KSID)
            try:
                key, index = await self._rest_get(stream, -1)
            except _Gone as exc:
                self._strikes = 0
                del self._streams[link.peer]  # re-opened on the next call
                raise SourceUnavailable(str(exc)) from None
            stream.next_index = index + 1  # the module's indices only grow: never one twice
        return Key(stream.key_id(index), Secret(key))

    async def new_key(self, link: Link) -> Key:
        if self.rest is not None:
            return await self._rest_new_key(link)
        for attempt in range(2):
            stream = self._streams.get(link.peer)
            if stream is None or not self._usable(stream):  # the lock only to (re-)open
                async with self._open_lock:
                    stream = self._streams.get(link.peer)
                    if stream is None or not self._usable(stream):
                        self._streams.pop(link.peer, None)
                        stream = self._streams[link.peer] = await self._open(link, codec.NULL_KSID)
            # no checkpoint between the check above and this: an index is handed out once
            index = stream.next_index
            stream.next_index += 1  # before the call: an index is never handed out twice
            try:
                key = await self._get(stream, index)
            except _Gone as exc:
                if self._streams.get(link.peer) is stream:
                    del self._streams[link.peer]  # re-opened at once (module restarted?)
                if attempt:
                    raise SourceUnavailable(str(exc)) from None
                continue
            return Key(stream.key_id(index), Secret(key))
        raise AssertionError("unreachable")

    async def key_by_id(self, link: Link, key_id: str) -> Key:
        parsed = codec.parse_key_id(key_id)
        if parsed is None:
            await trio.lowlevel.checkpoint()
            raise KeyNotFound(f"{self._where()}: key ID is not KSID:index")
        ksid, index = parsed
        async with self._open_lock:
            stream = self._joined.get(ksid)
            if stream is not None and self._expired(stream):
                del self._joined[ksid]
                stream = None
            if stream is None:
                stream = await self._open(link, ksid)
                self._joined[ksid] = stream
                while len(self._joined) > RESPONDER_STREAMS:
                    _, old = self._joined.popitem(last=False)
                    await self._close_quietly(old)
            self._joined.move_to_end(ksid)
            if index in stream.read:
                raise KeyNotFound(f"{self._where()}: index {index} of this stream was read before")
            if len(stream.read) >= MAX_INDICES:
                raise KeyNotFound(f"{self._where()}: stream has served its {MAX_INDICES} keys")
            if index in stream.asking:
                raise KeyNotFound(f"{self._where()}: index {index} is being read by another call")
            stream.asking.add(index)  # before the lock is let go: one GET_KEY per index at once
        try:
            if self.rest is not None:
                key, _ = await self._rest_get(stream, index)
            else:
                key = await self._get(stream, index)
        except _Gone as exc:
            self._joined.pop(ksid, None)
            raise KeyNotFound(str(exc)) from None
        finally:
            stream.asking.discard(index)
        stream.read.add(index)
        return Key(key_id, Secret(key))

    async def _close_quietly(self, stream: KeyStream) -> None:
        try:
            if self.rest is not None:
                await self.rest.close(stream.text)
                return
            await self._call(codec.CloseRequest(stream.ksid), codec.Service.CLOSE_RESPONSE)
        except SourceError as exc:
            log.info("%s: CLOSE of an old stream failed: %s", self._where(), exc)


class _Gone(SourceError):
    """Status 3: the module does not know the stream (any more)."""
