"""What simulated QKD modules answer (ETSI GS QKD 004 semantics, REFERENCE §2.1-2.3). Pure.

Modules come in pairs joined by one simulated QKD link and its key supply. A key stream (KSID) is
allocated by the first side's OPEN_CONNECT (status 1 until the peer joins) and joined by the
peer's OPEN_CONNECT with the same KSID. Chunk `index` of a stream is drawn from the link's supply
the first time either side asks for it and handed to both sides alike, so both applications get
the same key for the same index, whichever asks first. None of the traps of REFERENCE §2.5: an
index not yet available is status 2 (never zeros), QoS answers state what was granted, CLOSE
really closes, a stream lives at most its TTL.

The server layer (`server.py`) does the I/O; `get_key` may answer `Wait(seconds)` when the
stream's rate limit (`max_bps`) frees enough key within the QoS timeout.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

from qkdagent import CsprngSupply, KeySupply, SupplyExhausted, SupplyFactory

from .codec import (
    NULL_KSID,
    CloseRequest,
    CloseResponse,
    GetKeyRequest,
    GetKeyResponse,
    OpenConnectRequest,
    OpenConnectResponse,
    QoS,
    Status,
)

MIMETYPES = ("application/json",)


@dataclass(frozen=True)
class Limits:
    """What a simulated module grants; requests beyond get status 7 and these values."""

    min_chunk: int = 16
    max_chunk: int = 1024
    max_timeout_ms: int = 60_000
    default_timeout_ms: int = 5_000
    max_ttl: int = 86_400
    default_ttl: int = 3_600
    max_stored_chunks: int = 65_536
    """Chunks a stream keeps (read by one side only) before GET_KEY of a new index is status 2."""
    lookahead: int = 65_536
    """How far past the highest index drawn so far a GET_KEY may reach (else status 2)."""


@dataclass(frozen=True)
class Wait:
    """Rate limited: ask again after `seconds` (within the QoS timeout)."""

    seconds: float


@dataclass
class Chunk:
    key: bytes = field(repr=False)
    created: float
    readers: set[str] = field(default_factory=set)


@dataclass
class Stream:
    ksid: bytes
    qos: QoS
    link: tuple[str, str]
    opened: float
    allocator: str | None
    """The module whose application allocated the KSID (None: registered by KSID, unknown)."""
    apps: dict[str, str] = field(default_factory=dict)
    """module -> the application identity that opened the stream there."""
    uris: dict[str, tuple[str, str]] = field(default_factory=dict)
    chunks: dict[int, Chunk] = field(default_factory=dict)
    highest: int = -1
    tokens: float = 0.0
    tokens_at: float = 0.0

    def expired(self, now: float) -> bool:
        return now - self.opened > self.qos.ttl

    @property
    def usable(self) -> bool:
        """Keys are drawn only for an allocated stream or once both sides have joined."""
        return self.allocator is not None or len(self.apps) == 2


def _uri_ok(uri: str) -> bool:
    parts = urlsplit(uri)
    return bool(parts.scheme) and bool(parts.netloc)


def negotiate(asked: QoS, limits: Limits, link_bps: int) -> tuple[QoS, bool]:
    """The QoS granted and whether it is what was asked (False: status 7 counter-proposal)."""
    ok = True
    chunk = min(max(asked.key_chunk_size, limits.min_chunk), limits.max_chunk)
    ok &= chunk == asked.key_chunk_size
    max_bps = link_bps if asked.max_bps == 0 else min(asked.max_bps, link_bps)
    ok &= asked.max_bps in (0, max_bps)
    min_bps = min(asked.min_bps, link_bps)
    ok &= min_bps == asked.min_bps
    timeout = asked.timeout or limits.default_timeout_ms
    timeout = min(timeout, limits.max_timeout_ms)
    ok &= asked.timeout in (0, timeout)
    ttl = min(asked.ttl or limits.default_ttl, limits.max_ttl)
    ok &= asked.ttl in (0, ttl)
    mimetype = asked.metadata_mimetype
    if mimetype not in MIMETYPES:
        mimetype, ok = MIMETYPES[0], False
    granted = QoS(chunk, max_bps, min_bps, asked.jitter, asked.priority, timeout, ttl, mimetype)
    return granted, ok


class ModuleNetwork:
    """Every simulated module's state: streams, per-link supplies, who may use which module."""

    def __init__(
        self,
        modules: dict[str, list[str]],
        pairs: list[tuple[str, str]],
        *,
        limits: Limits | None = None,
        rate_bps: float = 10_000_000.0,
        supply_factory: SupplyFactory | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.modules = {m: set(apps) for m, apps in modules.items()}
        self.peer: dict[str, str] = {}
        self.supplies: dict[tuple[str, str], KeySupply] = {}
        self.rate_bps = rate_bps
        for a, b in pairs:
            if a in self.peer or b in self.peer or a == b:
                raise ValueError(f"module {a if a in self.peer else b!r} is in two links")
            self.peer[a], self.peer[b] = b, a
            self.supplies[(a, b)] = (
                supply_factory(*sorted((a, b)))  # the seam's contract: names sorted
                if supply_factory
                else CsprngSupply(
                    rate_bps=rate_bps, capacity_bits=max(1 << 20, int(rate_bps)), clock=clock
                )
            )
        self.limits = limits or Limits()
        self.clock = clock
        self.streams: dict[bytes, Stream] = {}
        self.require_peer = False
        """True: GET_KEY before the peer joined is status 3 (the strict reading of 004)."""
        self.stats = {"open": 0, "get_key": 0, "keys": 0, "close": 0}

    def link_of(self, module: str) -> tuple[str, str] | None:
        peer = self.peer.get(module)
        if peer is None:
            return None
        return (module, peer) if (module, peer) in self.supplies else (peer, module)

    def _stream(self, module: str, app: str, ksid: bytes) -> Stream | None:
        stream = self.streams.get(ksid)
        if stream is None:
            return None
        if stream.expired(self.clock()):
            del self.streams[ksid]
            return None
        return stream if stream.apps.get(module) == app else None

    # -- OPEN_CONNECT ---------------------------------------------------------------------

    def open_connect(self, module: str, app: str, req: OpenConnectRequest) -> OpenConnectResponse:
        self.stats["open"] += 1
        link = self.link_of(module)
        if link is None or app not in self.modules.get(module, ()):
            return OpenConnectResponse(Status.NO_QKD_CONNECTION, req.qos, req.ksid)
        if not (_uri_ok(req.source) and _uri_ok(req.destination)):
            return OpenConnectResponse(Status.NO_QKD_CONNECTION, req.qos, req.ksid)
        granted, exact = negotiate(req.qos, self.limits, int(self.rate_bps))
        now = self.clock()
        if req.ksid == NULL_KSID:
            ksid = os.urandom(16)
            stream = Stream(ksid, granted, link, now, module, tokens_at=now)
            stream.tokens = self._burst(stream)
            stream.apps[module] = app
            stream.uris[module] = (req.source, req.destination)
            self.streams[ksid] = stream
            status = Status.PEER_NOT_CONNECTED if exact else Status.QOS_NOT_SATISFIABLE
            return OpenConnectResponse(status, granted, ksid)
        found = self.streams.get(req.ksid)
        if found is not None and found.expired(now):
            del self.streams[req.ksid]
            found = None
        if found is None:  # a KSID this network never allocated (or forgot): wait for the peer
            stream = Stream(req.ksid, granted, link, now, None, tokens_at=now)
            stream.tokens = self._burst(stream)
            stream.apps[module] = app
            stream.uris[module] = (req.source, req.destination)
            self.streams[req.ksid] = stream
            status = Status.PEER_NOT_CONNECTED if exact else Status.QOS_NOT_SATISFIABLE
            return OpenConnectResponse(status, granted, req.ksid)
        stream = found
        if stream.link != link:
            return OpenConnectResponse(Status.NO_QKD_CONNECTION, req.qos, req.ksid)
        holder = stream.apps.get(module)
        if holder is not None and holder != app:
            return OpenConnectResponse(Status.KSID_IN_USE, req.qos, req.ksid)
        other = next((uris for m, uris in stream.uris.items() if m != module), None)
        if other is not None and (req.source, req.destination) != (other[1], other[0]):
            return OpenConnectResponse(Status.NO_QKD_CONNECTION, req.qos, req.ksid)
        if req.qos.key_chunk_size != stream.qos.key_chunk_size:
            return OpenConnectResponse(Status.QOS_NOT_SATISFIABLE, stream.qos, req.ksid)
        stream.apps[module] = app
        stream.uris[module] = (req.source, req.destination)
        return OpenConnectResponse(Status.SUCCESSFUL, stream.qos, req.ksid)

    def _burst(self, stream: Stream) -> float:
        return float(max(stream.qos.key_chunk_size * 8, stream.qos.max_bps))

    # -- GET_KEY --------------------------------------------------------------------------

    def get_key(self, module: str, app: str, req: GetKeyRequest) -> GetKeyResponse | Wait:
        self.stats["get_key"] += 1
        stream = self._stream(module, app, req.ksid)
        if stream is None:
            return GetKeyResponse(Status.GET_KEY_PEER_NOT_CONNECTED, req.index)
        now = self.clock()
        chunk = stream.chunks.get(req.index)
        if chunk is None:  # a new chunk is drawn only while both ends can still read it
            if not stream.usable or (self.require_peer and len(stream.apps) < 2):
                return GetKeyResponse(Status.GET_KEY_PEER_NOT_CONNECTED, req.index)
            made = self._draw(stream, req.index, now)
            if not isinstance(made, Chunk):
                return made
            chunk = made
        metadata = self._metadata(chunk, now)
        if len(metadata) > req.metadata_size:
            return GetKeyResponse(
                Status.METADATA_TOO_SMALL, req.index, required_metadata_size=len(metadata)
            )
        chunk.readers.add(module)
        if len(chunk.readers) == 2:
            del stream.chunks[req.index]
        self.stats["keys"] += 1
        return GetKeyResponse(Status.SUCCESSFUL, req.index, chunk.key, metadata)

    def _draw(self, stream: Stream, index: int, now: float) -> Chunk | GetKeyResponse | Wait:
        limits = self.limits
        if (
            index > stream.highest + limits.lookahead
            or len(stream.chunks) >= limits.max_stored_chunks
        ):
            return GetKeyResponse(Status.INSUFFICIENT_KEY, index)
        if index <= stream.highest:  # drawn before and read by both sides since: gone
            return GetKeyResponse(Status.INSUFFICIENT_KEY, index)
        bits = stream.qos.key_chunk_size * 8
        rate = max(stream.qos.max_bps, 1)
        stream.tokens = min(self._burst(stream), stream.tokens + (now - stream.tokens_at) * rate)
        stream.tokens_at = now
        if stream.tokens < bits:
            wait = (bits - stream.tokens) / rate
            if wait * 1000 > stream.qos.timeout:
                return GetKeyResponse(Status.TIMEOUT, index)
            return Wait(wait)
        try:
            key = self.supplies[stream.link].take(bits)
        except SupplyExhausted:
            return GetKeyResponse(Status.INSUFFICIENT_KEY, index)
        stream.tokens -= bits
        # indices below a newly drawn one can no longer be drawn (they would be fresh bits the
        # peer never saw): a stream's chunks are drawn in index order, gaps are skipped for good
        stream.highest = index
        chunk = stream.chunks[index] = Chunk(key, now)
        return chunk

    def _metadata(self, chunk: Chunk, now: float) -> bytes:
        """JSON `{"age": ms, "hops": 0}`, formatted directly (json.dumps per key showed up)."""
        return b'{"age":%d,"hops":0}' % int((now - chunk.created) * 1000)

    # -- CLOSE ----------------------------------------------------------------------------

    def close(self, module: str, app: str, req: CloseRequest) -> CloseResponse:
        self.stats["close"] += 1
        stream = self._stream(module, app, req.ksid)
        if stream is None:
            return CloseResponse(Status.GET_KEY_PEER_NOT_CONNECTED)
        del stream.apps[module]
        stream.uris.pop(module, None)
        if not stream.apps:
            del self.streams[req.ksid]
        elif stream.allocator == module:
            stream.allocator = None  # no new chunks; the peer may still read drawn ones
        return CloseResponse(Status.SUCCESSFUL)

    def restart(self, module: str) -> None:
        """A module restart: every stream it was part of is gone (keys included)."""
        for ksid in [k for k, s in self.streams.items() if module in s.link]:
            del self.streams[ksid]

    def drain(self, module: str) -> None:
        link = self.link_of(module)
        supply = self.supplies[link] if link else None
        if supply is not None and hasattr(supply, "drain"):
            supply.drain()


def with_qos(request: OpenConnectRequest, qos: QoS) -> OpenConnectRequest:
    return replace(request, qos=qos)
