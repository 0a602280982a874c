"""Which peer-API connections the server keeps when descriptors run short. Pure, no I/O.

Connections come in three kinds:

- *handshaking*: accepted, mutual TLS not finished yet. Anyone who can reach the port can open
  these, so they are capped on their own; when the cap is hit the OLDEST one is closed, so a
  legitimate peer's fresh handshake always gets its turn however many idle sockets an attacker
  holds open. Silent ones (no byte sent yet) go before those whose handshake is under way
  (*hello*), so an attacker reopening idle sockets in a loop cannot cut a peer's handshake.
- *idle*: an established (mutually authenticated) connection between requests. Kept for the
  keep-alive timeout, but under pressure the one idle longest is closed first (its client just
  opens a new one).
- *busy*: an established connection in the middle of a request; never evicted.

Per source address (IPv4 address, IPv6 /64) there is a cap as well.

Evicting on arrival has a cost: an attacker who reopens every closed socket at once turns it
into a loop (arrive, evict, reopen, evict...) that runs as fast as the two processes can go,
each turn a task, a close and a wake-up here. So, when the server is crowded, a newcomer may
push an unauthenticated connection out only while its address has tokens left (`churn`: a
token bucket per address); beyond that it is refused at accept (cheap: no task, no eviction)
and the connections already held age out on their own deadlines. A peer on its own address
keeps its whole budget, so its fresh handshake still gets in.

A certificate that names no peer (a *stranger*) is reset after its handshake, and a stranger
reopens at once: each turn a full TLS handshake here. So every stranger spends a token of its
address (`strangers`); an address out of them is refused at accept, before any TLS work,
until a token is back. (A peer behind the same address as a stranger waits with it.)

The server applies the verdicts; this module only counts and decides, so every rule is
unit-tested without sockets.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable
from dataclasses import dataclass, field

HANDSHAKING, HELLO, IDLE, BUSY = "handshaking", "hello", "idle", "busy"


def address_key(host: str) -> str:
    """The bucket a source address counts against: the IPv4 address, or the IPv6 /64 (one
    attacker usually holds a whole /64); IPv4-mapped IPv6 addresses count as IPv4."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(frozen=True)
class Verdict:
    """Whether to keep a new connection, and which older ones to close first (with why)."""

    admit: bool
    evict: tuple[tuple[Hashable, str], ...] = ()
    reason: str | None = None
    """Why the new connection is refused (when `admit` is false)."""


@dataclass
class TokenBuckets:
    """A token bucket per key: `rate` tokens a second, at most `burst` held. Only the
    `max_keys` most recently used keys are remembered (a forgotten key starts full again), so
    an attacker with many addresses costs bounded memory."""

    rate: float
    burst: float
    max_keys: int = 4096
    _buckets: dict[Hashable, tuple[float, float]] = field(default_factory=dict)
    """key -> (tokens, when counted), least recently used first."""

    def take(self, key: Hashable, now: float) -> bool:
        """Spend one of `key`'s tokens at time `now`; False (nothing spent) if it has none."""
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
        allowed = tokens >= 1
        self._buckets[key] = (tokens - 1 if allowed else tokens, now)
        if len(self._buckets) > self.max_keys:
            del self._buckets[next(iter(self._buckets))]
        return allowed

    def delay(self, key: Hashable, now: float, cost: float = 1.0) -> float:
        """Reserve `cost` of `key`'s tokens at time `now`: seconds until they are there (0:
        now). Tokens reserved ahead go negative, so waiters queue up at `rate`."""
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
        self._buckets[key] = (tokens - cost, now)
        if len(self._buckets) > self.max_keys:
            del self._buckets[next(iter(self._buckets))]
        return 0.0 if tokens >= cost else (cost - tokens) / self.rate

    def peek(self, key: Hashable, now: float) -> float:
        """The tokens `key` has at time `now` (nothing spent)."""
        if key not in self._buckets:
            return self.burst
        tokens, at = self._buckets[key]
        return min(self.burst, tokens + max(0.0, now - at) * self.rate)

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass
class _Conn:
    bucket: str
    state: str


@dataclass
class Admission:
    """The live connections of one server and the caps they are held to."""

    max_connections: int
    max_per_address: int
    max_handshaking: int
    churn: TokenBuckets | None = None
    """Per-address budget for pushing unauthenticated connections out (None: unlimited)."""
    strangers: TokenBuckets | None = None
    """Per-address budget of handshakes by certificates naming no peer (None: unlimited)."""
    _conns: dict[Hashable, _Conn] = field(default_factory=dict)
    _by_state: dict[str, dict[Hashable, None]] = field(
        default_factory=lambda: {HANDSHAKING: {}, HELLO: {}, IDLE: {}, BUSY: {}}
    )
    """Per state, connections oldest first (dicts keep insertion order)."""
    _per_bucket: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._conns)

    def count(self, state: str) -> int:
        return len(self._by_state[state])

    def admit(self, conn: Hashable, host: str, now: float = 0.0) -> Verdict:
        """Decide on a just-accepted connection from `host` at time `now` (seconds, for the
        churn budget); an admitted one is handshaking.

        Evicted connections are forgotten at once (their slots are free for this decision);
        the caller closes them.
        """
        bucket = address_key(host)
        if self.strangers is not None and self.strangers.peek(bucket, now) < 1:
            return Verdict(False, reason="stranger")
        if self._crowded(bucket) and self.churn is not None and not self.churn.take(bucket, now):
            return Verdict(False, reason="churn")
        evict: list[tuple[Hashable, str]] = []
        if self._per_bucket.get(bucket, 0) >= self.max_per_address:
            victim = self._first((HANDSHAKING, HELLO, IDLE), bucket)
            if victim is None:
                return Verdict(False, reason="per-address")
            evict.append((victim, "per-address"))
            self._forget(victim)
        if self.count(HANDSHAKING) + self.count(HELLO) >= self.max_handshaking:
            victim = self._first((HANDSHAKING, HELLO))
            assert victim is not None
            evict.append((victim, "handshaking-full"))
            self._forget(victim)
        if len(self._conns) >= self.max_connections:
            victim = self._first((HANDSHAKING, HELLO, IDLE))
            if victim is None:
                return Verdict(False, tuple(evict), reason="full")
            evict.append((victim, "full"))
            self._forget(victim)
        self._conns[conn] = _Conn(bucket, HANDSHAKING)
        self._by_state[HANDSHAKING][conn] = None
        self._per_bucket[bucket] = self._per_bucket.get(bucket, 0) + 1
        return Verdict(True, tuple(evict))

    def _crowded(self, bucket: str) -> bool:
        """Whether a newcomer from `bucket` would push an unauthenticated connection out."""
        unauthenticated = self.count(HANDSHAKING) + self.count(HELLO)
        return unauthenticated > 0 and (
            self._per_bucket.get(bucket, 0) >= self.max_per_address
            or unauthenticated >= self.max_handshaking
            or len(self._conns) >= self.max_connections
        )

    def stranger(self, host: str, now: float) -> None:
        """A certificate from `host` named no peer: its address spends a stranger token."""
        if self.strangers is not None:
            self.strangers.take(address_key(host), now)

    def shed(self) -> Hashable | None:
        """The connection to close when the process runs out of descriptors (accept() failed
        with EMFILE): the oldest handshaking one, else the one idle longest. Forgotten."""
        victim = self._first((HANDSHAKING, HELLO, IDLE))
        if victim is not None:
            self._forget(victim)
        return victim

    def hello(self, conn: Hashable) -> bool:
        """The client sent its first bytes: its handshake is under way. False if evicted."""
        return self._move(conn, HELLO)

    def established(self, conn: Hashable) -> bool:
        """Mutual TLS done: the connection becomes idle. False if it was evicted meanwhile."""
        return self._move(conn, IDLE)

    def busy(self, conn: Hashable) -> bool:
        """A request started on an idle connection. False if it was evicted meanwhile."""
        return self._move(conn, BUSY)

    def idle(self, conn: Hashable) -> bool:
        """The request is answered; the connection waits for the next (newest idle)."""
        return self._move(conn, IDLE)

    def closed(self, conn: Hashable) -> None:
        """The connection is gone (a no-op if it was evicted)."""
        if conn in self._conns:
            self._forget(conn)

    def _move(self, conn: Hashable, state: str) -> bool:
        entry = self._conns.get(conn)
        if entry is None:
            return False
        del self._by_state[entry.state][conn]
        entry.state = state
        self._by_state[state][conn] = None
        return True

    def _first(self, states: tuple[str, ...], bucket: str | None = None) -> Hashable | None:
        """The oldest connection of the first of `states` that has one."""
        for state in states:
            victim = self._oldest(state, bucket)
            if victim is not None:
                return victim
        return None

    def _oldest(self, state: str, bucket: str | None = None) -> Hashable | None:
        for conn in self._by_state[state]:
            if bucket is None or self._conns[conn].bucket == bucket:
                return conn
        return None

    def _forget(self, conn: Hashable) -> None:
        entry = self._conns.pop(conn)
        del self._by_state[entry.state][conn]
        left = self._per_bucket[entry.bucket] - 1
        if left:
            self._per_bucket[entry.bucket] = left
        else:
            del self._per_bucket[entry.bucket]


def connection_caps(
    max_connections: int, max_handshaking: int, soft_nofile: int, reserve: int
) -> tuple[int, int]:
    """Caps that fit the descriptor limit: connections stay `reserve` descriptors below it,
    for rotations, the state database, sinks and erases; at least 8 connections, and at most
    half of them handshaking."""
    connections = max(8, min(max_connections, soft_nofile - reserve))
    return connections, max(1, min(max_handshaking, connections // 2))


@dataclass
class Tally:
    """Refused requests and dropped connections since the last summary line, and a small
    budget of individual log lines per period, so a flood never floods the log."""

    lines_per_period: int = 10
    refused: dict[int, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    _lines: int = 0

    def refuse(self, status: int) -> bool:
        """Count a refused request; True if it may still be logged on its own line."""
        self.refused[status] = self.refused.get(status, 0) + 1
        return self._spend()

    def drop(self, reason: str) -> bool:
        """Count a closed connection; True if it may still be logged on its own line."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        return self._spend()

    def _spend(self) -> bool:
        self._lines += 1
        return self._lines <= self.lines_per_period

    def summary(self) -> str | None:
        """The period's summary line (None if nothing happened), and a fresh period."""
        refused, dropped = sum(self.refused.values()), sum(self.dropped.values())
        line = None
        if refused or dropped:
            detail = ", ".join(
                [f"{n} x {s}" for s, n in sorted(self.refused.items())]
                + [f"{n} x {r}" for r, n in sorted(self.dropped.items())]
            )
            line = f"refused {refused} requests, dropped {dropped} connections ({detail})"
        self.refused, self.dropped, self._lines = {}, {}, 0
        return line
