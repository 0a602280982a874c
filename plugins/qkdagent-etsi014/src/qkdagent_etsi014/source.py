"""Source type `etsi014`: keys from a KME over ETSI GS QKD 014 (HTTPS with mutual TLS).

Plain HTTP only with `insecure_http = true` (simulators such as quPSKd's, during a migration):
the keys then cross the network in clear, which is logged at `check` and `prepare` and reported.

The initiator calls Get key (`enc_keys`) naming the peer's SAE as slave; the responder calls Get
key with key IDs (`dec_keys`) naming the peer's SAE as master. Every answer is validated
(`wire.parse_key_container`) before a key is used. Keys are single-use on the KME, so:

- only calls that certainly delivered nothing are retried (`retry.classify`);
- with `kme_id` set, every answer must come over a connection whose server certificate names that
  KME (`kme_identity` rule, REFERENCE §1.1); the JSON `source_KME_ID` alone proves nothing;
- every HTTP exchange (the core's `HttpClient`: kept-alive HTTP/1.1, llhttp) has a total deadline
  (`connect_timeout + request_timeout`), not only per-read timeouts, which a KME trickling one
  byte at a time never trips;
- the caller's cancellation (the agent's per-call timeout, shutdown) is honoured at once: key
  fetches run in the background (`inflight`), and a key that arrives for a caller that has left
  is held: the next `new_key` for that peer, or a repeated `key_by_id` for that ID, gets it
  instead of a fresh KME round trip;
- calls for the same peer SAE made together share one request (`batching`): one `enc_keys` for
  several keys, one `dec_keys` naming several key IDs, at most `max_keys_per_call` and the KME's
  `max_key_per_request`, taking turns (`turns`); a shared call answered without keys sends its
  callers back to one key per call (`batching.after_no_keys`), so one unknown key ID fails only
  its own caller;
- every answer body is read with a bound while streaming (`MAX_RESPONSE_BYTES`, no compression).
"""

from __future__ import annotations

import json
import logging
import math
import ssl
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlencode, urlsplit

import trio

from qkdagent import (
    ComponentEvent,
    ConnectFailed,
    EncodedReply,
    HttpClient,
    HttpReply,
    Key,
    KeyNotFound,
    Link,
    Misconfigured,
    Options,
    PluginContext,
    ReplyTooLarge,
    Secret,
    Source,
    SourceError,
    SourceUnavailable,
    TransportError,
    client_ssl_context,
)

from . import wire
from .batching import (
    SPLITS_BEFORE_PAUSE,
    Shared,
    after_no_keys,
    counts_toward_pause,
    keys_per_call,
    pauses_at_once,
)
from .identity import MODES, IdentityRule, mismatch
from .inflight import Fetch, Fetches
from .retry import Backoff, Outcome, classify, settle_no_route
from .turns import Turns

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 1024 * 1024
"""Largest KME answer read (then a SourceError). One key of the largest `key_size` (65536 bits) is
~11 KiB of base64; a call asks for no more keys than fit (`batching.keys_per_call`), with room
for KMEs that add extensions, far below what could hurt the agent's memory."""
HELD_KEYS_MAX = 256
MAX_WARNED = 16
"""Kinds of non-standard key container a source reports, at most (each once)."""
SHARING_PAUSE = 600.0
"""Seconds a KME that refused a call for several keys is asked for one key per call."""
CLOSE_GRACE = 2.0
"""Seconds aclose() gives cancelled fetches to unwind, and then the connections to close."""


INSECURE_HTTP_WARNING = (
    "plain HTTP to the KME (insecure_http = true): the keys cross the network in clear and the "
    "KME is not authenticated; use it only with a simulator while migrating"
)


def _check_url(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme == "http":
        return None  # allowed only with insecure_http (checked by the caller)
    if parts.scheme != "https":
        return "must be an https:// URL (ETSI GS QKD 014 requires HTTPS)"
    if not parts.hostname:
        return "has no host name"
    if parts.query or parts.fragment or parts.username or parts.password:
        return "must not have a query, fragment or user info"
    return None


def _wipe_all(keys: list[Key]) -> None:
    for key in keys:
        key.value.wipe()


class _Split(SourceError):
    """A shared call got no keys and ends (`batching.after_no_keys`): each of its callers calls
    for its own key."""


def _other(method: str) -> str:
    return "POST" if method == "GET" else "GET"


def _kme_identity(options: Options) -> IdentityRule:
    """How the KME's server certificate names the KME (the simulator's SAE rules, reused)."""
    mode = options.string("kme_identity", "cn", choices=MODES)
    table = options.table("kme_fingerprints", {})
    for fp, kme in table.items():
        if not isinstance(kme, str) or not kme:
            options.fail("kme_fingerprints", f"entry {fp!r} must be a non-empty KME ID string")
    try:
        return IdentityRule(mode, table if mode == "fingerprint" else {})
    except ValueError as exc:
        options.fail("kme_fingerprints" if mode == "fingerprint" else "kme_identity", str(exc))


_NO_WAIT: AbstractAsyncContextManager[None] = nullcontext()


def _any(fetch: Fetch[list[Key]]) -> bool:
    return True


def _has_room(cap: int, fetch: Fetch[list[Key]]) -> bool:
    """A `new_key` caller that wants at most `cap` keys per call may join `fetch`: one with a
    key to spare, and for a caller back from a shared call (`cap` 1), one that cannot grow into
    another shared call (for one key, or already sent)."""
    return fetch.waiters < fetch.limit and (cap > 1 or fetch.limit == 1 or fetch.sealed)


def _names(key_id: str, fetch: Fetch[list[Key]]) -> bool:
    return key_id in fetch.claims


def _has_room_for_id(cap: int, fetch: Fetch[list[Key]]) -> bool:
    return cap > 1 and not fetch.sealed and len(fetch.claims) < fetch.limit


class KmeHttp(Protocol):
    """What the source needs of an HTTP client (`qkdagent.HttpClient`; tests give a fake)."""

    async def request(
        self,
        method: str,
        base_url: str,
        target: str,
        body: bytes | None = None,
        *,
        headers: Sequence[tuple[str, str]] = (),
        limit: int,
        exchange_timeout: float | None = None,
        wait_timeout: float | None = None,
    ) -> HttpReply: ...

    async def aclose(self) -> None: ...


class Etsi014Source(Source):
    """An SAE's view of its KME. See the package README for every option."""

    fetch_ahead = True  # key_by_id is a round trip to the module: announce ahead

    type_name = "etsi014"

    def __init__(self, name: str, options: Options, context: PluginContext) -> None:
        super().__init__(name, options, context)
        self.kme_url: str = options.string("kme_url", check=_check_url).rstrip("/")
        self.insecure_http: bool = options.boolean("insecure_http", False)
        self.plain: bool = urlsplit(self.kme_url).scheme == "http"
        """Plain HTTP: no TLS identity (cert/key/ca are then unknown options)."""
        if self.plain and not self.insecure_http:
            options.fail(
                "kme_url",
                "must be an https:// URL (ETSI GS QKD 014 requires HTTPS); plain http:// only "
                "with insecure_http = true in this source (keys in clear; simulators only)",
            )
        if self.insecure_http:
            options.warn("insecure_http", INSECURE_HTTP_WARNING)
        self.cert: Path = Path() if self.plain else options.path("cert")
        self.key_file: Path = Path() if self.plain else options.path("key")
        self.ca: Path = Path() if self.plain else options.path("ca")
        self.sae_id: str | None = options.string("sae_id", None, max_len=256)
        self.kme_id: str | None = options.string("kme_id", None, max_len=256)
        if self.plain and self.kme_id is not None:
            options.fail("kme_id", "needs an https:// KME: plain HTTP cannot confirm its identity")
        self.kme_identity: IdentityRule = _kme_identity(options)
        peers = options.table("peer_sae_ids", {})
        for agent, sae in peers.items():
            if not isinstance(sae, str) or not sae or len(sae) > 256:
                options.fail("peer_sae_ids", f"entry {agent!r} must be a non-empty SAE ID string")
        self.peer_sae_ids: dict[str, str] = dict(peers)
        self.key_size: int = options.integer("key_size", 256, min=128, max=65536)
        if self.key_size % 8:
            options.fail("key_size", "must be a multiple of 8 bits")
        self.enc_method: str = options.string("enc_method", "auto", choices=("auto", "get", "post"))
        self.dec_method: str = options.string("dec_method", "auto", choices=("auto", "post", "get"))
        self.strict_key_ids: bool = options.boolean("strict_key_ids", True)
        self.request_timeout: float = options.number("request_timeout", 5.0, positive=True)
        self.connect_timeout: float = options.number("connect_timeout", 3.0, positive=True)
        self.retries: int = options.integer("retries", 3, min=0, max=20)
        self.not_found_retries: int = options.integer("not_found_retries", 6, min=0, max=50)
        self.retry_backoff: float = options.number("retry_backoff", 0.05, positive=True, max=60)
        self.max_backoff: float = options.number("max_backoff", 1.0, positive=True, max=600)
        self.keepalive_expiry: float = options.number("keepalive_expiry", 4.0, min=0, max=3600)
        self.max_connections: int = options.integer("max_connections", 16, min=1, max=256)
        """Most connections to the KME at once (calls past it wait for one), all kept alive."""
        self.max_keys_per_call: int = options.integer(
            "max_keys_per_call", 64, min=1, max=HELD_KEYS_MAX
        )
        """Most keys one call shared by links asking together carries (1: one key per call)."""
        self.limits: dict[str, wire.KmeStatus] = {}
        """Get status answers per peer SAE ID (filled by prepare())."""
        self._client: KmeHttp | None = None
        self._spare: dict[str, deque[Key]] = {}
        self._held: OrderedDict[tuple[str, str], Key] = OrderedDict()
        self._warned: set[str] = set()
        self._connect_error = ""
        self._kme_der: bytes | None = None
        """The last server certificate found to name `kme_id` (saves parsing it per answer)."""
        self._fetches: Fetches[list[Key]] = Fetches(f"source {name!r}: KME {self.kme_url}")
        self._turns: dict[tuple[str, str], Turns] = {}
        """(operation, SAE) -> the turns of its shared calls."""
        self._splits: dict[tuple[str, str], int] = {}
        """(operation, SAE) -> its shared calls in a row that ended one by one."""
        self._sharing_paused: dict[tuple[str, str], float] = {}
        """(operation, SAE) -> when calls for several keys may resume (a KME refused one)."""

    def __repr__(self) -> str:
        insecure = " INSECURE plain HTTP" if self.plain else ""
        return f"<Etsi014Source {self.name!r} kme={self.kme_url!r} sae={self.sae_id!r}{insecure}>"

    # -- lifecycle ------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Load the TLS identity, then Get status for the peer SAE of every link (and every
        `peer_sae_ids` entry) and check the KME's identity and limits before the first rotation."""
        if self.insecure_http:
            log.warning("source %s: %s %s", self.name, self.kme_url, INSECURE_HTTP_WARNING)
            self.context.report(
                ComponentEvent(self.name, "insecure_transport", INSECURE_HTTP_WARNING)
            )
        await self._open()
        targets = self._status_targets()
        if not targets:
            await self._probe()
        for sae, users in targets.items():
            try:
                status = await self.status(sae)
            except SourceUnavailable:
                raise
            except (Misconfigured, SourceError) as exc:
                if self.insecure_http:
                    self._status_unusable(sae, users, exc)
                    continue
                if isinstance(exc, Misconfigured):
                    raise Misconfigured(f"{exc} (peer SAE of {users})") from None
                raise
            problem = status.mismatch(self.key_size, self.kme_id, self.sae_id)
            if problem is not None:
                raise Misconfigured(
                    f"source {self.name!r}: {self.kme_url}, peer SAE {sae!r} of {users}: {problem}"
                )
            log.info("source %s: %s (%s)", self.name, status.describe(), users)

    def _status_unusable(self, sae: str, users: str, exc: Exception) -> None:
        """insecure_http: a simulator without a usable Get status (quPSKd's answers it with a
        key container) is accepted; key size and limits are then checked per answer only."""
        detail = (
            f"{self.kme_url}: Get status for peer SAE {sae!r} ({users}) is unusable "
            f"({type(exc).__name__}: {str(exc)[:200]}); accepted because of insecure_http, "
            "key size and limits are not checked up front"
        )
        log.warning("source %s: %s", self.name, detail)
        self.context.report(ComponentEvent(self.name, "status_unusable", detail))

    def _status_targets(self) -> dict[str, str]:
        """Peer SAE ID -> what needs it (for messages): `peer_sae_ids` entries, then links."""
        users: dict[str, list[str]] = {}
        for agent, sae in self.peer_sae_ids.items():
            users.setdefault(sae, []).append(f"peer_sae_ids.{agent}")
        for link in self.links:
            users.setdefault(self.peer_sae(link), []).append(f"link {link.name!r}")
        return {sae: ", ".join(names) for sae, names in users.items()}

    async def _probe(self) -> None:
        """Without known peers: prove TLS and routing work (any answer but 401 will do)."""
        probe = self.sae_id or "qkdagent-probe"
        status_code, body = await self._request("status", "GET", probe, prepare=True)
        outcome = classify("status", status_code, wire.error_message(body))
        if outcome in (Outcome.UNAVAILABLE, Outcome.UNAUTHORIZED):
            raise self._failure("status", probe, status_code, body, outcome, prepare=True)
        log.info(
            "source %s: KME %s reachable (peer SAEs are learned per link)", self.name, self.kme_url
        )

    async def aclose(self) -> None:
        """Cancel the fetches in flight, close the connections, wipe held keys: bounded (a few
        seconds at most) even against a KME that stopped reading."""
        await self._fetches.close(grace=CLOSE_GRACE)
        client, self._client = self._client, None
        if client is not None:
            with trio.move_on_after(CLOSE_GRACE, shield=True):
                await client.aclose()
        for key in [*self._held.values(), *(k for q in self._spare.values() for k in q)]:
            key.value.wipe()
        self._held.clear()
        self._spare.clear()

    async def _open(self) -> KmeHttp:
        if self._client is None:
            context = None if self.plain else await trio.to_thread.run_sync(self._ssl_context)
            self._client = HttpClient(
                context,
                plain_http=self.plain,
                headers=(("user-agent", "qkdagent-etsi014"),),
                idle_expiry=self.keepalive_expiry,
                # as many kept as may be open: a burst of calls reuses them, no handshakes
                max_idle_per_origin=self.max_connections,
                max_per_origin=self.max_connections,
                connect_timeout=self.connect_timeout,
                # each call bounds its wait and its exchange itself (`_request`): no backstop
                # that could end a call already sent, its key then lost
                timeout=None,
                # a KME call takes a key: one that may have been executed is never resent
                resend_unanswered=False,
            )
        return self._client

    def _ssl_context(self) -> ssl.SSLContext:
        return client_ssl_context(self.cert, self.key_file, self.ca, what=f"source {self.name!r}")

    # -- the three ETSI 014 calls ---------------------------------------------------------

    def peer_sae(self, link: Link) -> str:
        return self.peer_sae_ids.get(link.peer, link.peer)

    async def status(self, slave_sae: str) -> wire.KmeStatus:
        """Get status for the link to `slave_sae`; remembered in `self.limits`."""
        status_code, body = await self._request("status", "GET", slave_sae, prepare=True)
        outcome = classify("status", status_code, wire.error_message(body))
        if outcome is not Outcome.OK:
            raise self._failure("status", slave_sae, status_code, body, outcome, prepare=True)
        try:
            status = wire.parse_status(wire.loads(body))
        except wire.WireError as exc:
            raise SourceError(f"{self._where('status', slave_sae)}: {exc}") from None
        self.limits[slave_sae] = status
        return status

    async def new_key(self, link: Link) -> Key:
        slave = self.peer_sae(link)
        tag = ("enc_keys", slave)
        single = False  # a shared call this caller was in ended: a call of its own now
        while True:
            await trio.lowlevel.checkpoint()
            spare = self._spare.setdefault(slave, deque())
            if spare:
                return spare.popleft()
            cap = 1 if single else self._keys_per_call("enc_keys", slave)
            # a fetch with a key to spare: one whose caller was cancelled (it may still deliver:
            # wait for it, not a new one), or one not yet sent that can ask for one more key
            fetch = self._fetches.find(tag, partial(_has_room, cap)) or self._fetches.start(
                tag,
                partial(self._fetch_new, slave),
                partial(self._park_spare, slave),
                _wipe_all,
                limit=cap,
            )
            try:
                keys = await self._fetches.wait(fetch)  # cancelled: the key is parked as spare
            except _Split:
                single = True
                continue
            except BaseException:
                if fetch.result:  # cancelled as the keys came, counted among the waiters: its
                    self._park_spare(slave, fetch)  # share (none of a short answer's) is kept
                raise
            if keys:
                return keys.pop()
            # a short answer (fewer keys than asked for): get another

    def _park_spare(self, slave: str, fetch: Fetch[list[Key]], count: int | None = None) -> None:
        """Keep `count` keys of the fetch's (by default those beyond its waiters') for the next
        call to `slave`."""
        keys = fetch.result or []
        if count is None:
            count = max(0, len(keys) - fetch.waiters)
        spare = self._spare.setdefault(slave, deque())
        for _ in range(min(count, len(keys))):
            spare.append(keys.pop())
        while len(spare) > HELD_KEYS_MAX:
            spare.popleft().value.wipe()

    async def _fetch_new(self, slave: str, fetch: Fetch[list[Key]]) -> list[Key]:
        if fetch.limit > 1:  # the calls made together with the first one join it first
            await trio.lowlevel.checkpoint()

        def compose() -> tuple[int, dict[str, str], dict[str, Any]]:
            # as many keys as callers wait (a retry asks for fewer if some left meanwhile)
            fetch.sealed = True
            fetch.limit = number = max(1, min(fetch.limit, fetch.waiters))
            query = {"number": str(number), "size": str(self.key_size)}
            return number, query, {"number": number, "size": self.key_size}

        number, data = await self._with_retries(
            "enc_keys",
            slave,
            "POST" if self.enc_method == "post" else "GET",
            compose,
            switch=self.enc_method == "auto",
            fetch=fetch,
        )
        keys = self._parse("enc_keys", slave, data, number, expected=None)
        return self._short("enc_keys", slave, keys, number)

    async def key_by_id(self, link: Link, key_id: str) -> Key:
        master = self.peer_sae(link)
        await trio.lowlevel.checkpoint()
        held = self._held.pop((master, key_id), None)
        if held is not None:
            return held
        if (
            wire.utf8_length(key_id) > wire.MAX_KEY_ID_BYTES
            or not key_id.isprintable()
            or (self.strict_key_ids and not wire.UUID_RE.match(key_id))
        ):
            # (an answer holding it would be refused: asking would only waste the call)
            raise KeyNotFound(f"{self._where('dec_keys', master)}: key ID is not acceptable")
        single = False  # a shared call this caller was in ended: a call of its own now
        while True:
            cap = 1 if single else self._keys_per_call("dec_keys", master)
            fetch = self._dec_fetch(master, key_id, cap)
            fetch.claims[key_id] = fetch.claims.get(key_id, 0) + 1
            try:
                try:
                    keys = await self._fetches.wait(fetch)  # cancelled: its key is held
                finally:
                    fetch.claims[key_id] -= 1
            except _Split:
                single = True
                continue
            except BaseException:
                if fetch.result:  # cancelled as the keys came, counted among the waiters
                    self._hold(master, fetch)
                raise
            for index, key in enumerate(keys):
                if key.key_id == key_id:
                    return keys.pop(index)
            if key_id not in fetch.answered:
                # a short answer without it (fewer keys than named): a call of its own
                single = True
                continue
            # a concurrent call for the same ID was handed the key (single use)
            raise KeyNotFound(f"{self._where('dec_keys', master)}: key {key_id!r} already taken")

    def _dec_fetch(self, master: str, key_id: str, cap: int) -> Fetch[list[Key]]:
        """A call under way naming `key_id` (or one left by a cancelled caller): share it; else
        join a shared call not yet sent, naming one more ID; else a new one."""
        single_tag, shared_tag = ("dec_keys", master, key_id), ("dec_keys", master)
        fetch = self._fetches.find(single_tag, _any) or self._fetches.find(
            shared_tag, partial(_names, key_id)
        )
        if fetch is None and cap > 1:
            fetch = self._fetches.find(shared_tag, partial(_has_room_for_id, cap))
        if fetch is None:
            fetch = self._fetches.start(
                shared_tag if cap > 1 else single_tag,
                partial(self._fetch_by_ids, master),
                partial(self._hold, master),
                _wipe_all,
                limit=cap,
            )
        return fetch

    def _hold(self, master: str, fetch: Fetch[list[Key]]) -> None:
        """Hold the fetch's keys that no waiting caller named, for a repeated call."""
        keys = fetch.result or []
        kept = []
        for key in keys:
            if fetch.claims.get(key.key_id, 0) > 0:
                kept.append(key)
            else:
                self._held[(master, key.key_id)] = key
        keys[:] = kept
        while len(self._held) > HELD_KEYS_MAX:
            self._held.popitem(last=False)[1].value.wipe()

    async def _fetch_by_ids(self, master: str, fetch: Fetch[list[Key]]) -> list[Key]:
        if fetch.limit > 1:  # the calls made together with the first one join it first
            await trio.lowlevel.checkpoint()
        ids: list[str] = []

        def compose() -> tuple[int, dict[str, str], dict[str, Any]]:
            if not fetch.sealed:  # fixed at the first attempt: a retry names the same IDs
                fetch.sealed = True
                fetch.limit = max(1, sum(1 for waiting in fetch.claims.values() if waiting > 0))
                # an ID whose callers all left before the call is not asked for (the KME would
                # delete a key nobody waits for); a repeated call for it makes a call of its own
                for key_id, waiting in list(fetch.claims.items()):
                    if waiting > 0:
                        ids.append(key_id)
                    else:
                        del fetch.claims[key_id]
            if not ids:  # (every caller left: `wanted` is checked just before)
                raise SourceUnavailable(f"{self._where('dec_keys', master)}: abandoned")
            return len(ids), {"key_ID": ids[0]}, {"key_IDs": [{"key_ID": i} for i in ids]}

        # several IDs only by POST (GET names one): `_keys_per_call` is 1 once GET is chosen
        method = "GET" if self.dec_method == "get" and fetch.limit == 1 else "POST"
        # POST although GET is the method: GET was learned while this call waited its turn
        switch = self.dec_method == "auto" or method != self.dec_method.upper()
        number, data = await self._with_retries(
            "dec_keys", master, method, compose, switch=switch, fetch=fetch
        )
        keys = self._parse("dec_keys", master, data, number, expected=ids)
        fetch.answered.update(key.key_id for key in keys)
        return self._short("dec_keys", master, keys, number)

    def _keys_per_call(self, operation: str, sae: str) -> int:
        status = self.limits.get(sae)
        paused = self._sharing_paused.get((operation, sae), -math.inf) > trio.current_time()
        return keys_per_call(
            self.max_keys_per_call,
            None if status is None else status.max_key_per_request,
            key_size=self.key_size,
            response_limit=MAX_RESPONSE_BYTES,
            one_id_only=operation == "dec_keys" and self.dec_method == "get",
            paused=paused,
        )

    def _turn(
        self, operation: str, sae: str, fetch: Fetch[list[Key]]
    ) -> AbstractAsyncContextManager[None]:
        """A shared call waits for its turn (`turns`); a call for one key only (shared calls
        paused, or `max_keys_per_call = 1`) goes at once, as before."""
        if fetch.limit == 1:
            return _NO_WAIT
        turns = self._turns.get((operation, sae))
        if turns is None:
            turns = self._turns[(operation, sae)] = Turns()
        return turns.turn()

    def _shared_served(self, operation: str, sae: str) -> None:
        self._splits.pop((operation, sae), None)

    def _shared_split(self, operation: str, sae: str, outcome: Outcome, why: str) -> None:
        """A shared call ended with its callers going on one by one: pause sharing with this
        SAE at once if the KME refused our own Get key, or after `SPLITS_BEFORE_PAUSE` such
        ends in a row (a shortage of key does not count)."""
        key = (operation, sae)
        if counts_toward_pause(outcome):
            self._splits[key] = self._splits.get(key, 0) + 1
        if pauses_at_once(operation, outcome):
            self._pause_sharing(operation, sae, why)
        elif self._splits.get(key, 0) >= SPLITS_BEFORE_PAUSE:
            self._pause_sharing(
                operation, sae, f"{SPLITS_BEFORE_PAUSE} calls for several keys in a row ended"
            )

    def _pause_sharing(self, operation: str, sae: str, why: str) -> None:
        key = (operation, sae)
        self._splits.pop(key, None)
        if self._sharing_paused.get(key, -math.inf) <= trio.current_time():
            log.warning(
                "source %s: %s %s (%s %s): one key per call for %g s",
                self.name,
                self.kme_url,
                why,
                operation,
                sae,
                SHARING_PAUSE,
            )
        self._sharing_paused[key] = trio.current_time() + SHARING_PAUSE

    # -- plumbing -------------------------------------------------------------------------

    async def _with_retries(
        self,
        operation: str,
        sae: str,
        method: str,
        compose: Callable[[], tuple[int, dict[str, str], dict[str, Any]]],
        *,
        switch: bool,
        fetch: Fetch[list[Key]],
    ) -> tuple[int, bytes]:
        """The call's answer and how many keys it asked for; `compose` gives them and the
        request's query and body, per attempt. A shared call (one that may carry several keys)
        waits for its turn first (`turns`), and the callers that come meanwhile join it; one
        for several keys that must end (`batching.after_no_keys`) raises `_Split`."""
        unavailable = Backoff(self.retries, self.retry_backoff, self.max_backoff)
        not_found = Backoff(self.not_found_retries, self.retry_backoff, self.max_backoff)
        tentative: str | None = None  # the method that got a bare 404: the other one is on trial
        asked_again = False  # a call for several keys was made again whole (`Shared.AGAIN`)
        while True:
            if not fetch.wanted:  # every caller left: no new request (the last one is answered)
                raise SourceUnavailable(f"{self._where(operation, sae)}: abandoned by its caller")
            async with self._turn(operation, sae, fetch):
                if not fetch.wanted or fetch.scope.cancel_called:  # they left during the wait
                    raise SourceUnavailable(
                        f"{self._where(operation, sae)}: abandoned (callers gone or source closed)"
                    )
                count, query, body = compose()
                fetch.on_wire = True
                try:
                    status_code, data = await self._request(
                        operation,
                        method,
                        sae,
                        query=query if method == "GET" else None,
                        body=body if method == "POST" else None,
                    )
                finally:
                    fetch.on_wire = False
            outcome = classify(operation, status_code, wire.error_message(data))
            if outcome is not Outcome.OK:
                shared = after_no_keys(
                    operation, count, outcome, status=status_code, asked_again=asked_again
                )
                if shared is Shared.AGAIN:
                    asked_again = True
                    backoff = unavailable if outcome is Outcome.UNAVAILABLE else not_found
                    pause = backoff.next()
                    if pause is not None:
                        await trio.sleep(pause)
                        continue
                    shared = Shared.SPLIT
                if shared is Shared.SPLIT:
                    why = f"answered {status_code} ({outcome.value}) to a call for {count} keys"
                    self._shared_split(operation, sae, outcome, why)
                    raise _Split(f"{self._where(operation, sae)}: {why}")
            if outcome is Outcome.NO_ROUTE:
                if switch:  # nothing was delivered: try the other method once
                    switch, tentative, method = False, method, _other(method)
                    continue
                outcome = settle_no_route(operation)
            elif outcome is Outcome.METHOD and tentative is not None:
                # the other method is refused outright, so that 404 was about the resource: ask
                # again the original way and take its answer as it is
                method, tentative = tentative, None
                continue
            if outcome is Outcome.OK:
                if tentative is not None:
                    self._remember_method(operation, method, f"answers 404 to {tentative}")
                if count > 1:
                    self._shared_served(operation, sae)
                return count, data
            delay: float | None = None
            if outcome is Outcome.METHOD and switch:
                switch = False
                refused, method = method, _other(method)
                self._remember_method(operation, method, f"refuses {refused} ({status_code})")
                continue
            if outcome is Outcome.UNAVAILABLE:
                delay = unavailable.next()
            elif outcome is Outcome.NOT_FOUND:
                delay = not_found.next()
            if delay is None:
                key_id = next(iter(fetch.claims)) if len(fetch.claims) == 1 else None
                raise self._failure(operation, sae, status_code, data, outcome, key_id=key_id)
            log.debug(
                "source %s: %s via %s: %s, retrying in %.2fs",
                self.name,
                operation,
                self.kme_url,
                outcome.value,
                delay,
            )
            await trio.sleep(delay)

    def _remember_method(self, operation: str, method: str, why: str) -> None:
        """Stop trying the refused method (so this warning is logged once per operation)."""
        log.warning(
            "source %s: %s %s for %s; using %s from now on",
            self.name,
            self.kme_url,
            why,
            operation,
            method,
        )
        if operation == "enc_keys":
            self.enc_method = method.lower()
        else:
            self.dec_method = method.lower()

    async def _request(
        self,
        operation: str,
        method: str,
        sae: str,
        *,
        query: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        prepare: bool = False,
    ) -> tuple[int | None, bytes]:
        """One exchange within its total deadline; status None = not connected.

        Not shielded: the caller's cancellation ends it at once (key fetches run in the
        background, see `inflight`, so a cancelled caller loses no key it could have had)."""
        client = await self._open()
        path = f"/api/v1/keys/{quote(sae, safe='')}/{operation}"
        if query:
            path += "?" + urlencode(query)
        payload = None if body is None else json.dumps(body).encode()
        headers = (("content-type", "application/json"),) if payload is not None else ()
        try:
            # The whole exchange is bounded, not each read: a KME trickling a byte at a time
            # would otherwise hold the call for ever. Its deadline starts once the call may
            # have a connection (`max_connections`): one that waited behind a burst is not
            # sent with too little time left to get its key. A wait past `request_timeout` is
            # a ConnectFailed: nothing was sent, so the call is retried like a refused connect.
            reply = await client.request(
                method,
                self.kme_url,
                path,
                payload,
                headers=headers,
                limit=MAX_RESPONSE_BYTES,
                exchange_timeout=self.connect_timeout + self.request_timeout,
                wait_timeout=self.request_timeout,
            )
        except ConnectFailed as exc:
            self._connect_error = str(exc) or type(exc).__name__
            return None, b""
        except trio.TooSlowError:
            raise SourceUnavailable(
                f"{self._where(operation, sae)}: no answer within the timeout "
                "(keys handed out meanwhile are lost)"
            ) from None
        except EncodedReply as exc:
            raise SourceError(f"KME {self.kme_url}: answer refused: {exc}") from None
        except ReplyTooLarge:
            raise SourceError(
                f"KME {self.kme_url}: answer is larger than {MAX_RESPONSE_BYTES} bytes"
            ) from None
        except TransportError as exc:
            raise SourceUnavailable(
                f"{self._where(operation, sae)}: {type(exc).__name__}: {exc}"
            ) from None
        status_code, data = reply.status, reply.body
        der = reply.certificate if self.kme_id is not None else None
        if self.kme_id is not None and (der is None or der != self._kme_der):
            self._confirm_kme(operation, sae, der, prepare=prepare)
        return status_code, data

    def _confirm_kme(self, operation: str, sae: str, der: bytes | None, *, prepare: bool) -> None:
        """REFERENCE §1.1: the KME's ID must come from its TLS certificate, else the answer
        (possibly a key, now lost) is not used."""
        assert self.kme_id is not None
        problem = mismatch(self.kme_identity, der, self.kme_id)
        if problem is None:
            self._kme_der = der
            return
        text = (
            f"{self._where(operation, sae)}: the KME's TLS certificate does not confirm kme_id "
            f"{self.kme_id!r} ({self.kme_identity.mode} rule): {problem}; answer discarded"
        )
        raise Misconfigured(text) if prepare else SourceError(text)

    def _parse(
        self, operation: str, sae: str, data: bytes, number: int, expected: list[str] | None
    ) -> list[Key]:
        """The answer's keys; to a call for several, fewer are taken too (a KME that ignores
        `number` or some of the IDs: `_short`)."""
        try:
            pairs = wire.parse_key_container(
                wire.loads(data),
                number=number,
                size_bits=self.key_size,
                strict_uuid=self.strict_key_ids,
                expected_ids=expected,
                on_variant=self._warn_variant,
                at_most=number > 1,
            )
        except wire.WireError as exc:
            keys = "key" if number == 1 else f"{number} keys"
            raise SourceError(
                f"{self._where(operation, sae)}: answer rejected, {keys} not used: {exc}"
            ) from None
        return [Key(key_id, Secret(raw)) for key_id, raw in pairs]

    def _short(self, operation: str, sae: str, keys: list[Key], number: int) -> list[Key]:
        """Fewer keys than asked for: the callers left without one call on their own, and
        shared calls with this SAE pause."""
        if len(keys) < number:
            self._pause_sharing(operation, sae, f"answered {len(keys)} keys to a call for {number}")
        return keys

    def _warn_variant(self, variant: str) -> None:
        """Say once per kind of variant that the KME strays from the standard (at most
        `MAX_WARNED` kinds are remembered: a KME sending a new one each time is told of once
        more, then no longer)."""
        if variant in self._warned or len(self._warned) > MAX_WARNED:
            return
        self._warned.add(variant)
        if len(self._warned) > MAX_WARNED:
            log.warning(
                "source %s: KME %s uses more than %d non-standard forms of the key container; "
                "no more are reported",
                self.name,
                self.kme_url,
                MAX_WARNED,
            )
            return
        log.warning(
            "source %s: KME %s uses a non-standard key container (%s); accepted",
            self.name,
            self.kme_url,
            variant,
        )

    def _where(self, operation: str, sae: str) -> str:
        role = {"enc_keys": "slave", "dec_keys": "master"}.get(operation, "slave")
        return f"KME {self.kme_url} {operation} ({role} SAE {sae!r})"

    def _failure(
        self,
        operation: str,
        sae: str,
        status: int | None,
        data: bytes,
        outcome: Outcome,
        *,
        key_id: str | None = None,
        prepare: bool = False,
    ) -> Exception:
        where = self._where(operation, sae)
        message = wire.error_message(data)
        said = f": {message}" if message else ""
        if outcome is Outcome.UNAVAILABLE:
            if status is None:
                return SourceUnavailable(f"{where}: cannot connect: {self._connect_error}")
            return SourceUnavailable(f"{where}: KME unavailable (503{said})")
        if outcome is Outcome.NOT_FOUND:
            return KeyNotFound(f"{where}: KME holds no key {key_id!r} ({status}{said})")
        if outcome is Outcome.UNAUTHORIZED:
            text = (
                f"{where}: 401 unauthorized: the KME does not accept this certificate's SAE for "
                "this request"
            )
            return Misconfigured(text) if prepare else SourceError(text)
        if outcome is Outcome.METHOD:
            return SourceError(f"{where}: KME refuses {operation} with this method ({status})")
        text = f"{where}: KME answered {status}{said}"
        return Misconfigured(text) if prepare else SourceError(text)
