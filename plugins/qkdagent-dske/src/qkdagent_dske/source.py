"""Source `dske`: keys established through n security hubs (dske-python's protocol).

Initiator (`new_key`): a random secret, split k-of-n in dske-python's Shamir layout, one share
per hub, each one-time-pad encrypted and signed with PSRD shared with that hub, posted to all
hubs in parallel; the key stands once k hubs have taken their share. Responder (`key_by_id`):
the shares fetched from all hubs in parallel, each answer's signature checked, decrypted, and
the secret rebuilt from any k that agree with the digest share; a hub whose share disagrees is
reported as lying. Shares received for a key that could not be rebuilt yet are kept (in memory)
for the retry, because a hub deletes a share once it has delivered it.

Batching (our extension, `batchwire.py`): a hub that answers the probe (sent with the first
refill, and again after a hub stopped serving batches) gets concurrent keys' posts and fetches
coalesced into batches (`batcher.py`: one queued item per key, one request per hub per batch),
each one signed request and one signed answer; a hub that answers 404 (dske-python) gets one
request per share, as do hubs not probed yet.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

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
    SourceUnavailable,
)

from . import batchwire, shamir, wire
from .batcher import BatchFailed, Coalescer
from .clientstore import BadReply, ClientPsrd
from .hubclient import HubClient, HubDown, HubReply, client_ssl_context
from .pool import Change, PsrdExhausted
from .store import StoreError

log = logging.getLogger("qkdagent.dske")

SIG = wire.SIGNING_KEY_SIZE
PENDING_KEYS = 64
"""Keys whose shares are kept for a retry (each at most n shares of key_size bytes)."""


@dataclass(frozen=True, repr=False)
class Fetched:
    """One key's share from a batch fetch: its index and value (decrypted), or why not."""

    status: int
    detail: str = ""
    share_index: int = -1
    value: bytes = b""

    def __repr__(self) -> str:
        return f"<Fetched {self.status} index={self.share_index}>"


PostOutcome = batchwire.ItemResult | str
"""A share's result in a batch post, or why its batch failed at that hub."""
FetchOutcome = Fetched | str


@dataclass(frozen=True)
class HubConfig:
    name: str
    url: str
    ca: Path | None
    cert: Path | None
    key: Path | None


def _hub_name(url: str) -> str | None:
    match = re.fullmatch(r"(https?)://[^/?#]+(/[^?#]*)?", url)
    if not match:
        return None
    last = (match.group(2) or "").rstrip("/").rsplit("/", 1)[-1]
    return last if wire.NAME.fullmatch(last) else None


class DskeSource(Source):
    type_name = "dske"
    fetch_ahead = True  # key_by_id asks k hubs for shares: announce ahead

    def __init__(self, name: str, options: Options, context: PluginContext) -> None:
        super().__init__(name, options, context)
        self.client_name: str = options.string(
            "client_name", context.agent_name, check=_name_problem
        )
        self.peer_client: str | None = options.string("peer_client_name", None, check=_name_problem)
        self.key_size: int = options.integer("key_size", 32, min=16, max=wire.MAX_SHARE)
        self.timeout: float = options.number("request_timeout", 5.0, positive=True, max=120)
        self.block_size: int = options.integer("psrd_block_size", 1 << 20, min=4096, max=1 << 26)
        self.low_water: int = options.integer(
            "psrd_low_water", self.block_size // 4, min=0, max=1 << 30
        )
        self.refill_every: float = options.number("refill_every", 5.0, positive=True, max=3600)
        self.batch: bool = options.boolean("batch", True)
        allow_http: bool = options.boolean("allow_plain_http", False)
        table = options.sub("hubs")
        hubs = []
        for hub in table.names():
            sub = table.sub(hub)
            url = sub.string("url")
            scheme = url.split(":", 1)[0]
            if _hub_name(url) != hub:
                sub.fail(
                    "url", f"must end in the hub's name /{hub} (dske-python takes it from there)"
                )
            if scheme == "http" and not allow_http:
                sub.fail("url", "plain HTTP needs allow_plain_http = true (labs, interop)")
            tls = scheme == "https"
            hubs.append(
                HubConfig(
                    hub,
                    url,
                    sub.path("ca", None) if tls else None,
                    sub.path("cert", None) if tls else None,
                    sub.path("key", None) if tls else None,
                )
            )
            sub.finish()
        if not 2 <= len(hubs) <= shamir.MAX_SHARES:
            options.fail("hubs", f"needs 2..{shamir.MAX_SHARES} hubs, not {len(hubs)}")
        self.hubs: tuple[HubConfig, ...] = tuple(hubs)
        self.k: int = options.integer("k", min(3, len(hubs)), min=2, max=len(hubs))
        self.psrd = ClientPsrd(context.state_dir / "plugins" / name / "psrd.sqlite")
        self.clients: dict[str, HubClient] = {}
        self.registered: set[str] = set()
        self._pending: OrderedDict[str, dict[int, bytes]] = OrderedDict()
        self.batching: dict[str, int] = {}
        """Hubs known to serve batches, and their largest batch."""
        self.unbatched: set[str] = set()
        """Hubs that answered the probe with 404 (dske-python): one request per share."""
        # a batch item's size on the wire (post, or fetch answer), so a batch stays in MAX_BODY
        self._per_body = max(1, (wire.MAX_BODY * 3 // 4) // (400 + 2 * self.key_size))
        # one item per key (its shares for every batching hub), one batch per hub per send:
        # a key costs one wait, not one task and one wait per hub; a hub that takes smaller
        # batches gets each batch in several requests (`_per_hub`), the other hubs in one
        most = min(batchwire.MAX_ITEMS, self._per_body)
        self.poster: Coalescer[dict[str, bytes], dict[str, PostOutcome]] = Coalescer(
            self._post_all, max_items=most
        )
        self.fetcher: Coalescer[tuple[str, frozenset[str]], dict[str, FetchOutcome]] = Coalescer(
            self._fetch_all, max_items=most, orphan=self._orphaned_fetch
        )
        self.batches_sent: Counter[tuple[str, str]] = Counter()
        """Batch requests sent, by ("post" or "fetch", hub)."""

    # -- lifecycle --------------------------------------------------------------------------------

    async def prepare(self) -> None:
        self.context.private_dir(self.name)
        await self.psrd.open()
        for hub in self.hubs:
            if hub.url.startswith("http:"):
                log.warning(
                    "source %s: hub %s: INSECURE plain HTTP (allow_plain_http = true): "
                    "anyone on the path can read and alter its traffic",
                    self.name,
                    hub.name,
                )
            if hub.name not in self.clients:
                context = None
                if hub.url.startswith("https:"):
                    what = f"source {self.name!r}: hub {hub.name}"
                    try:
                        context = await trio.to_thread.run_sync(
                            partial(client_ssl_context, hub.ca, hub.cert, hub.key, what=what)
                        )
                    except (ssl.SSLError, OSError) as exc:  # the CA file
                        raise Misconfigured(f"{what}: cannot load TLS files: {exc}") from None
                self.clients[hub.name] = HubClient(
                    hub.name, hub.url, ssl_context=context, timeout=self.timeout
                )
        await self.refill()

    async def aclose(self) -> None:
        for client in self.clients.values():
            with trio.CancelScope(shield=True):
                await client.aclose()
        self.clients.clear()
        self.psrd.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send the batches (in tasks of this one, so that no caller's timeout cuts one short),
        register with hubs that were down and keep every PSRD pool above `psrd_low_water`."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.poster.serve)
            await nursery.start(self.fetcher.serve)
            task_status.started()
            while True:
                await trio.sleep(self.refill_every)
                await self.refill()

    async def refill(self) -> None:
        """Register where needed and fetch PSRD blocks for pools below the low-water mark;
        a hub that fails is skipped (logged) and tried again on the next call."""
        async with trio.open_nursery() as nursery:
            for hub in self.hubs:
                nursery.start_soon(self._refill_hub, hub.name)

    async def _refill_hub(self, hub: str) -> None:
        client = self.clients[hub]
        try:
            if hub not in self.registered:
                body = wire.Registration(self.client_name, (self.client_name,)).encode()
                reply = await client.call("PUT", "oob/v1/registration", body=body)
                if reply.status != 200:
                    raise BadReply(f"registration refused ({reply.status})")
                if wire.parse_hub_name(reply.body) != hub:
                    raise BadReply("the hub answered with another name")
                self.registered.add(hub)
                log.info(
                    "source %s: registered as %s with hub %s", self.name, self.client_name, hub
                )
            for owner in ("client", "hub"):
                if self.psrd.free(hub, owner) > self.low_water:
                    continue
                query = f"client_name={self.client_name}&pool_owner={owner}&size={self.block_size}"
                reply = await client.call(
                    "GET", "oob/v1/psrd", query=query.encode(), limit=self.block_size * 2
                )
                if reply.status != 200:
                    raise BadReply(f"PSRD request refused ({reply.status})")
                block = wire.parse_psrd_block(reply.body, limit=self.block_size)
                await self.psrd.add_block(hub, owner, block)
                log.info(
                    "source %s: %d bytes of %s-owned PSRD from hub %s",
                    self.name,
                    len(block.data),
                    owner,
                    hub,
                )
            if self.batch and hub not in self.batching and hub not in self.unbatched:
                await self._probe(hub)
        except (HubDown, BadReply, wire.WireError) as exc:
            log.warning("source %s: hub %s: %s", self.name, hub, exc)

    async def _probe(self, hub: str) -> None:
        """Does the hub serve batches? 200 with its limit: yes; 404 or 405 (dske-python's
        answer to an unknown route): no, one request per share until a restart; anything
        else: not known yet (asked again at the next refill)."""
        reply = await self.clients[hub].call("GET", batchwire.POST_PATH)
        if reply.status == 200:
            most = min(batchwire.parse_capabilities(reply.body), self._per_body)
            self.batching[hub] = most
            log.info("source %s: hub %s takes batches of up to %d shares", self.name, hub, most)
        elif reply.status in (404, 405):
            self.unbatched.add(hub)
            log.info(
                "source %s: hub %s serves no batches (%d): one request per share",
                self.name,
                hub,
                reply.status,
            )

    async def _batch_call(self, hub: str, path: str, body: bytes) -> HubReply:
        """One signed batch request; `BatchFailed` unless the hub answered 200."""
        try:
            sig_alloc, sig_key = await self.psrd.signing_key(hub)
        except PsrdExhausted:
            raise BatchFailed("PSRD exhausted") from None
        header = wire.signature_header(sig_alloc, sig_key, b"", body)
        try:
            reply = await self.clients[hub].call("POST", path, body=body, signature=header)
        except HubDown as exc:
            raise BatchFailed(str(exc)) from None
        # a hub replaced by one without batches (logged once: later batches queued already)
        if reply.status in (404, 405) and self.batching.pop(hub, None) is not None:
            log.warning(
                "source %s: hub %s no longer serves batches: one request per share "
                "until it is probed again",
                self.name,
                hub,
            )
        if reply.status != 200:
            raise BatchFailed(f"batch refused ({reply.status})")
        return reply

    async def _per_hub(
        self,
        wanted: Sequence[Iterable[str]],
        send: Callable[[str, list[int]], Awaitable[Sequence[object]]],
    ) -> list[dict[str, Any]]:
        """For items each wanting some hubs: one `send(hub, item indices)` per hub (or per part of
        at most the hub's largest batch), all in parallel; per item, each hub's result or why
        that hub's batch failed."""
        results: list[dict[str, Any]] = [{} for _ in wanted]
        hubs: dict[str, list[int]] = {}
        for i, item in enumerate(wanted):
            for hub in item:
                hubs.setdefault(hub, []).append(i)

        async def one(hub: str, indices: list[int]) -> None:
            try:
                got = await send(hub, indices)
            except (BatchFailed, StoreError) as exc:  # a failed record: the answers are unused
                got = [str(exc)] * len(indices)
            for i, result in zip(indices, got, strict=True):
                results[i][hub] = result

        async with trio.open_nursery() as nursery:
            for hub, indices in hubs.items():
                most = self.batching.get(hub, len(indices))
                for start in range(0, len(indices), most):
                    nursery.start_soon(one, hub, indices[start : start + most])
        return results

    async def _post_all(self, items: list[dict[str, bytes]]) -> list[dict[str, PostOutcome]]:
        async def send(hub: str, indices: list[int]) -> Sequence[object]:
            return await self._send_posts(hub, [items[i][hub] for i in indices])

        return await self._per_hub(items, send)

    async def _fetch_all(
        self, items: list[tuple[str, frozenset[str]]]
    ) -> list[dict[str, FetchOutcome]]:
        async def send(hub: str, indices: list[int]) -> Sequence[object]:
            return await self._send_fetches(hub, [items[i][0] for i in indices])

        return await self._per_hub([hubs for _, hubs in items], send)

    async def _send_posts(self, hub: str, bodies: list[bytes]) -> list[batchwire.ItemResult]:
        body = batchwire.encode_post_batch(self.client_name, bodies)
        self.batches_sent["post", hub] += 1
        reply = await self._batch_call(hub, batchwire.POST_PATH, body)
        try:
            _, change = self.psrd.check_reply(hub, reply.signature, reply.body, [])
        except BadReply as exc:
            raise BatchFailed(str(exc)) from None
        await self.psrd.record(change)
        try:
            return batchwire.parse_post_results(reply.body, len(bodies))
        except wire.WireError as exc:
            raise BatchFailed(f"a signed but malformed answer: {exc}") from None

    async def _send_fetches(self, hub: str, key_ids: list[str]) -> list[Fetched]:
        body = batchwire.encode_fetch_batch(self.client_name, key_ids)
        self.batches_sent["fetch", hub] += 1
        reply = await self._batch_call(hub, batchwire.FETCH_PATH, body)
        try:
            results = batchwire.parse_fetch_results(reply.body, key_ids)
            pads = [r.share.encryption_key_allocation for r in results if r.share is not None]
            values, change = self.psrd.check_reply(hub, reply.signature, reply.body, pads)
        except (wire.WireError, BadReply) as exc:
            raise BatchFailed(str(exc)) from None
        await self.psrd.record(change)  # before the shares are used (shielded)
        out = []
        pad = iter(values)
        for r in results:
            if r.share is None:
                out.append(Fetched(r.result.status, r.result.detail))
            else:
                value = wire.xor(r.share.encrypted_share_value, next(pad))
                out.append(Fetched(200, "", r.share.share_index, value))
        return out

    # -- initiator --------------------------------------------------------------------------------

    async def new_key(self, link: Link) -> Key:
        await self.psrd.open()
        key_id = str(uuid.uuid4())
        secret = os.urandom(self.key_size)
        shares = shamir.split(secret, self.k, len(self.hubs))
        # batches are sent by the run() task: without it (not started yet, or being restarted)
        # every share goes in a request of its own
        batched = {h.name for h in self.hubs if h.name in self.batching and self.poster.serving}
        wanted = {
            hub.name: [self.key_size] if hub.name in batched else [SIG, self.key_size]
            for hub in self.hubs
        }
        allocated = await self.psrd.allocate(wanted)
        slave = self.peer_client or link.peer
        taken: list[str] = []
        used = Change()  # the hub-owned PSRD of the verified answers

        bodies: dict[str, bytes] = {}
        for (x, value), config in zip(shares, self.hubs, strict=True):
            if config.name in allocated:
                pad_alloc, pad = allocated[config.name][-1]
                bodies[config.name] = wire.SharePost(
                    self.client_name,
                    self.client_name,
                    slave,
                    key_id,
                    x,
                    pad_alloc,
                    wire.xor(value, pad),
                ).encode()
        in_batch = {h: b for h, b in bodies.items() if h in batched}

        async def post_batched() -> None:
            try:
                results = await self.poster.submit(in_batch)
            except BatchFailed as exc:
                results = dict.fromkeys(in_batch, str(exc))
            for hub, result in results.items():
                if isinstance(result, str):
                    log.warning("source %s: hub %s: key %s: %s", self.name, hub, key_id, result)
                elif result.status != 200:
                    log.warning(
                        "source %s: hub %s: key %s: share refused (%d): %s",
                        self.name,
                        hub,
                        key_id,
                        result.status,
                        result.detail,
                    )
                else:
                    taken.append(hub)

        async def post(hub: str) -> None:
            body = bodies[hub]
            ((sig_alloc, sig_key), _) = allocated[hub]
            header = wire.signature_header(sig_alloc, sig_key, b"", body)
            try:
                reply = await self.clients[hub].call(
                    "POST", "api/v1/key-share", body=body, signature=header
                )
                if reply.status != 200:
                    raise BadReply(f"share refused ({reply.status})")
                _, change = self.psrd.check_reply(hub, reply.signature, reply.body, [])
                used.merge(change)
            except (HubDown, BadReply) as exc:
                log.warning("source %s: hub %s: key %s: %s", self.name, hub, key_id, exc)
                return
            taken.append(hub)

        single = [h for h in bodies if h not in batched]
        if not single:  # every share in a batch: no task of its own
            if in_batch:
                await post_batched()
        else:
            try:
                async with trio.open_nursery() as nursery:
                    if in_batch:
                        nursery.start_soon(post_batched)
                    for hub in single:
                        nursery.start_soon(post, hub)
            finally:
                await self.psrd.record(used)  # before the answers count (shielded)
        if len(taken) < self.k:
            low = [h.name for h in self.hubs if h.name not in allocated]
            detail = f"; PSRD exhausted for {', '.join(low)}" if low else ""
            raise SourceUnavailable(
                f"source {self.name!r}: only {len(taken)} of {len(self.hubs)} hubs took a share "
                f"of key {key_id}, {self.k} needed{detail}"
            )
        return Key(key_id, Secret(secret))

    # -- responder --------------------------------------------------------------------------------

    async def key_by_id(self, link: Link, key_id: str) -> Key:
        if not wire.KEY_ID.fullmatch(key_id):
            raise KeyNotFound(f"source {self.name!r}: not a DSKE key ID")
        await self.psrd.open()
        have = self._pending.get(key_id, {})
        missing = [h.name for i, h in enumerate(self.hubs) if i not in have]
        batched = {h for h in missing if h in self.batching and self.fetcher.serving}
        allocated = await self.psrd.allocate({h: [SIG] for h in missing if h not in batched})
        query = f"client_name={self.client_name}&key_id={key_id}".encode()
        got: dict[int, bytes] = dict(have)
        outcome: dict[str, str] = {}
        used = Change()  # the hub-owned PSRD of the verified answers and pads

        async def fetch_batched() -> None:
            try:
                results = await self.fetcher.submit((key_id, frozenset(batched)))
            except BatchFailed as exc:
                results = dict.fromkeys(batched, str(exc))
            for hub, fetched in results.items():
                if isinstance(fetched, str):
                    outcome[hub] = fetched
                elif fetched.status == 404:
                    outcome[hub] = "no share"
                    continue
                elif fetched.status != 200:
                    outcome[hub] = f"share request refused ({fetched.status}): {fetched.detail}"
                else:
                    keep(hub, fetched.share_index, fetched.value)
                    continue
                log.warning("source %s: hub %s: key %s: %s", self.name, hub, key_id, outcome[hub])

        async def fetch(hub: str) -> None:
            ((sig_alloc, sig_key),) = allocated[hub]
            header = wire.signature_header(sig_alloc, sig_key, query, b"")
            try:
                reply = await self.clients[hub].call(
                    "GET", "api/v1/key-share", query=query, signature=header
                )
                if reply.status == 404:
                    outcome[hub] = "no share"
                    return
                if reply.status != 200:
                    raise BadReply(f"share request refused ({reply.status})")
                try:
                    share = wire.parse_share_reply(reply.body)
                except wire.WireError as exc:
                    raise BadReply(str(exc)) from None
                (pad,), change = self.psrd.check_reply(
                    hub, reply.signature, reply.body, [share.encryption_key_allocation]
                )
                used.merge(change)
            except (HubDown, BadReply) as exc:
                outcome[hub] = str(exc)
                log.warning("source %s: hub %s: key %s: %s", self.name, hub, key_id, exc)
                return
            keep(hub, share.share_index, wire.xor(share.encrypted_share_value, pad))

        def keep(hub: str, index: int, value: bytes) -> None:
            if index in got or len(value) != self.key_size:
                outcome[hub] = "a duplicate or misshapen share"
                return
            got[index] = value
            outcome[hub] = "ok"

        single = [h for h in missing if h not in batched]
        for hub in single:
            if hub not in allocated:
                outcome[hub] = "PSRD exhausted"
        if not single:  # every share in a batch: no task of its own
            if batched:
                await fetch_batched()
        else:
            try:
                async with trio.open_nursery() as nursery:
                    if batched:
                        nursery.start_soon(fetch_batched)
                    for hub in single:
                        if hub in allocated:
                            nursery.start_soon(fetch, hub)
            except BaseException:  # the caller left: keep what arrived (the hubs deleted it)
                await self.psrd.record(used)
                self._stash(key_id, got)
                raise
            await self.psrd.record(used)  # before the shares are used (shielded)
        return self._rebuild(key_id, got, outcome)

    def _orphaned_fetch(
        self, item: tuple[str, frozenset[str]], results: dict[str, FetchOutcome]
    ) -> None:
        """A batch fetch returned after its caller left: keep the shares for the retry (the hubs
        have deleted them; their PSRD was recorded before they were decrypted)."""
        key_id = item[0]
        shares = {
            r.share_index: r.value
            for r in results.values()
            if isinstance(r, Fetched) and r.status == 200 and len(r.value) == self.key_size
        }
        if shares:
            self._stash(key_id, shares)

    def _stash(self, key_id: str, shares: dict[int, bytes]) -> None:
        """Add shares of a key not rebuilt yet to those kept for its retry (`PENDING_KEYS`)."""
        kept = self._pending.setdefault(key_id, {})
        for index, value in shares.items():
            kept.setdefault(index, value)
        self._pending.move_to_end(key_id)
        while len(self._pending) > PENDING_KEYS:
            self._pending.popitem(last=False)

    def _rebuild(self, key_id: str, got: dict[int, bytes], outcome: dict[str, str]) -> Key:
        if not got and outcome and all(v == "no share" for v in outcome.values()):
            raise KeyNotFound(f"source {self.name!r}: no hub holds a share of key {key_id}")
        problem = f"{len(got)} shares, {self.k} needed"
        if len(got) >= self.k:
            try:
                secret, liars = shamir.recover_robust(sorted(got.items()), self.k)
            except shamir.ShamirError as exc:
                problem = str(exc)
            else:
                self._pending.pop(key_id, None)
                for x in liars:
                    hub = self.hubs[x].name if x < len(self.hubs) else f"index {x}"
                    detail = f"hub {hub} returned a share of key {key_id} that breaks the digest"
                    self.context.report(ComponentEvent(self.name, "lying_hub", detail))
                return Key(key_id, Secret(secret))
        self._stash(key_id, got)
        failures = "; ".join(f"{h}: {v}" for h, v in sorted(outcome.items()) if v != "ok")
        raise SourceUnavailable(
            f"source {self.name!r}: key {key_id} not rebuilt ({problem}); {failures}; "
            "the shares received are kept for a retry"
        )


def _name_problem(value: str) -> str | None:
    if not wire.NAME.fullmatch(value):
        return "must be 1..64 letters, digits, '.', '_' or '-'"
    return None
