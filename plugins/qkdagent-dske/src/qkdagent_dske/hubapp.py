"""The security hub's request handling: dske-python's hub API over a durable store.

Transport-free: `Hub.handle(Request)` returns a `Response`; `hubserver.py` carries it over
HTTP. Every request is checked completely before anything changes: a refused request (bad
input, bad signature, reused PSRD, wrong client, unknown key ID) leaves the store as it was,
except that an authentic request always consumes its own signing PSRD (so it cannot be
replayed later, e.g. to make the hub hand out and delete a share that has arrived since).
Each accepted request's change is durable (`store.PsrdStore`, group commit) before the answer
is sent. The checks and the in-memory change run without an await in between, so concurrent
requests need no lock and cannot both pass a check.

A share in transit is stored as it arrived, encrypted under the sender's pad, and that pad
(held in the PSRD block file, never in SQLite) is zeroed when the share is delivered or purged:
the ciphertext left in SQLite's file or journal is then undecryptable.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

from qkdagent import decimal

from . import batchwire, wire
from .batchwire import ItemResult
from .pool import Change, PoolBook, PsrdError, PsrdExhausted
from .store import PsrdStore
from .wire import WireError

log = logging.getLogger("qkdagent.dske.hub")

HUB_SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (name TEXT PRIMARY KEY, encryptors TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shares (
    slave TEXT NOT NULL, key_id TEXT NOT NULL, master TEXT NOT NULL, master_sae TEXT NOT NULL,
    share_index INTEGER NOT NULL, pad TEXT NOT NULL, value BLOB NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (slave, key_id)
);
"""


ROUTES = (
    ("oob", "registration"),
    ("oob", "psrd"),
    ("api", "key-share"),
    ("api", "key-shares"),  # the batch extension (batchwire.py)
    ("api", "key-shares-fetch"),
)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: bytes
    """The raw query string, as sent (signatures cover these bytes)."""
    body: bytes = field(repr=False)
    signature: str | None = None
    peer_name: str | None = None
    """The client certificate's name under mutual TLS; None over plain HTTP."""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = field(repr=False)
    """Hidden from reprs: a PSRD refill answer carries the block's bytes."""
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(repr=False)
class StoredShare:
    master: str
    master_sae: str
    share_index: int
    pad: wire.Allocation
    """The sender's pad, held in the client-owned pool until delivery."""
    value: bytes
    """The share encrypted under `pad`, as it arrived."""
    created: float


@dataclass(frozen=True)
class HubSettings:
    name: str
    max_block: int = 1 << 20
    share_ttl: float = 3600.0
    require_tls_identity: bool = True


class Refused(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


DISPUTED = ""
"""The owner of a name that several clients claimed (a store written before claims were
exclusive): shares addressed to it go to nobody but a client of that name."""


def _owners(clients: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Who receives shares addressed to each name: a client its own name; an encryptor name
    (an SAE) the one client that claimed it, never another client's own name."""
    owners = {name: name for name in clients}
    for client, names in sorted(clients.items()):
        for name in names:
            if name != client and name not in clients:
                held = owners.get(name)
                owners[name] = client if held in (None, client) else DISPUTED
    return owners


def _error(status: int, detail: str) -> Response:
    return Response(status, wire.dump_json({"detail": detail}))


def _query(raw: bytes, keys: set[str]) -> dict[str, str]:
    if len(raw) > 1024:
        raise Refused(414, "query string too long")
    try:
        pairs = parse_qsl(raw.decode("ascii"), keep_blank_values=True, strict_parsing=True)
    except (UnicodeDecodeError, ValueError):
        raise Refused(400, "malformed query string") from None
    found = dict(pairs)
    if len(found) != len(pairs) or set(found) != keys:
        raise Refused(400, f"the query must hold exactly {', '.join(sorted(keys))}")
    return found


class Hub:
    """One security hub: its clients, their PSRD pools and the shares in transit."""

    def __init__(self, settings: HubSettings, db_path: Path, *, inline: bool = False) -> None:
        self.settings = settings
        self.db = PsrdStore(db_path, "hub", HUB_SCHEMA, inline=inline)
        try:
            self.clients: dict[str, tuple[str, ...]] = {
                str(n): tuple(json.loads(str(e))) for n, e in self.db.query("SELECT * FROM clients")
            }
            self.shares: dict[tuple[str, str], StoredShare] = {
                (str(r[0]), str(r[1])): StoredShare(
                    str(r[2]),
                    str(r[3]),
                    int(r[4]),  # type: ignore[call-overload]  # sqlite3 rows are untyped
                    wire.parse_allocation_text(str(r[5])),
                    bytes(r[6]),  # type: ignore[call-overload]
                    float(r[7]),  # type: ignore[arg-type]
                )
                for r in self.db.query("SELECT * FROM shares")
            }
            self.book: PoolBook = self.db.load(s.pad for s in self.shares.values())
            self.owners: dict[str, str] = _owners(self.clients)
            """Name (a client's, or an encryptor it claimed) -> the client its shares go to."""
        except BaseException:
            self.db.close()
            raise

    def close(self) -> None:
        self.db.close()

    def __repr__(self) -> str:
        return f"<Hub {self.settings.name!r} clients={len(self.clients)}>"

    async def _durable(self, change: Change) -> None:
        """Durable before the answer (the store shields it: memory has changed already)."""
        await self.db.durable(change)

    # -- dispatch -------------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        try:
            route = self._route(request.path)
            if route == ("oob", "registration"):
                return await self._register(request)
            if route == ("oob", "psrd"):
                return await self._psrd(request)
            if route == ("api", "key-shares"):
                return await self._post_batch(request)
            if route == ("api", "key-shares-fetch"):
                return await self._fetch_batch(request)
            if request.method == "POST":
                return await self._post_share(request)
            return await self._get_share(request)
        except Refused as exc:
            return _error(exc.status, exc.detail)
        except WireError as exc:
            return _error(400, str(exc))

    def _route(self, path: str) -> tuple[str, str]:
        parts = path.split("/")
        if len(parts) < 6 or parts[-4:-2] not in (["dske", "oob"], ["dske", "api"]):
            raise Refused(404, "no such resource")
        if parts[-5] != self.settings.name or parts[-2] != "v1":
            raise Refused(404, "no such hub here")
        route = (parts[-3], parts[-1])
        if route not in ROUTES:
            raise Refused(404, "no such resource")
        return route

    def _identity(self, request: Request, client: str) -> None:
        """Under mutual TLS the certificate must name the client it acts for."""
        if request.peer_name is None:
            if self.settings.require_tls_identity:
                raise Refused(403, "a client certificate is required")
            return
        if request.peer_name != client:
            raise Refused(403, "the client certificate does not name this client")

    def _registered(self, client: str) -> None:
        if client not in self.clients:
            raise Refused(403, "client not registered")

    # -- out of band ------------------------------------------------------------------------------

    async def _register(self, request: Request) -> Response:
        if request.method != "PUT":
            raise Refused(405, "registration is PUT")
        registration = wire.parse_registration(request.body)
        client = registration.client_name
        self._identity(request, client)
        claimed = set(registration.encryptor_names) - {client}
        self._check_claims(client, claimed)
        for name in set(self.clients.get(client, ())) - claimed:  # names it no longer claims
            if self.owners.get(name) == client and name != client:
                del self.owners[name]
        self.owners.update(dict.fromkeys([client, *claimed], client))
        self.clients[client] = registration.encryptor_names
        names = json.dumps(list(registration.encryptor_names))
        sql = ("INSERT OR REPLACE INTO clients VALUES (?, ?)", (client, names))
        await self._durable(Change(sql=[sql]))
        log.info("hub %s: client %s registered", self.settings.name, client)
        return Response(200, wire.dump_json({"hub_name": self.settings.name}))

    def _check_claims(self, client: str, claimed: set[str]) -> None:
        """Shares addressed to a name go to the client that owns it: a client may not take a
        name another client owns (its own name or an encryptor it claimed), nor register under
        a name another client claimed as an encryptor. Changes nothing."""
        problem = None
        if self.owners.get(client, client) != client:
            problem = f"the name {client} is claimed as an encryptor by another client"
        for name in sorted(claimed):
            if self.owners.get(name, client) != client:
                problem = f"the encryptor name {name} belongs to another client"
        if problem is not None:
            log.warning(
                "hub %s: registration of %s refused: %s", self.settings.name, client, problem
            )
            raise Refused(409, problem)

    async def _psrd(self, request: Request) -> Response:
        if request.method != "GET":
            raise Refused(405, "psrd is GET")
        query = _query(request.query, {"client_name", "pool_owner", "size"})
        client = wire.name(query["client_name"], "client_name")
        self._identity(request, client)
        self._registered(client)
        owner = query["pool_owner"]
        if owner not in ("client", "hub"):
            raise Refused(400, "pool_owner is client or hub")
        size = decimal(query["size"], 10)
        if size is None:
            raise Refused(400, "size must be a positive integer")
        if not 64 <= size <= self.settings.max_block:
            raise Refused(400, f"size must be in 64..{self.settings.max_block}")
        block = wire.PsrdBlock(str(uuid.uuid4()), os.urandom(size))
        await self._durable(self.book.add(client, owner, block.block_uuid, block.data))
        log.info(
            "hub %s: %d bytes of %s-owned PSRD for %s", self.settings.name, size, owner, client
        )
        return Response(200, block.encode())

    # -- key shares -------------------------------------------------------------------------------

    def _verify(
        self, request: Request, client: str, others: Sequence[wire.Allocation] = ()
    ) -> tuple[wire.Allocation, list[bytes]]:
        """The request's signature against the client-owned pool; the bytes of `others`.
        Changes nothing (`consume` records them)."""
        signature = wire.parse_signature(request.signature)
        try:
            key, *rest = self.book.peek(client, "client", [signature.allocation, *others])
        except PsrdError as exc:
            raise Refused(409 if "reuses" in str(exc) else 400, str(exc)) from None
        if not signature.verify(key, request.query, request.body):
            raise Refused(401, "bad DSKE-Signature")
        return signature.allocation, rest

    def _forget(self, key: tuple[str, str]) -> tuple[bytes, Change]:
        """Drop a share in transit: its row deleted, its pad zeroed; the share in clear."""
        share = self.shares.pop(key)
        pad, change = self.book.release(share.pad)
        change.sql.append(("DELETE FROM shares WHERE slave = ? AND key_id = ?", key))
        return wire.xor(share.value, pad), change

    def _purge(self, now: float) -> Change:
        cutoff = now - self.settings.share_ttl
        change = Change()
        for key in [k for k, s in self.shares.items() if s.created < cutoff]:
            change.merge(self._forget(key)[1])
        return change

    async def _post_share(self, request: Request) -> Response:
        if request.query:
            raise Refused(400, "a key-share POST takes no query string")
        post = wire.parse_share_post(request.body)
        client = post.master_client_name
        self._registered(client)
        self._identity(request, client)
        sig_alloc, _ = self._verify(request, client, [post.encryption_key_allocation])
        self._check_post(client, post)
        body = b"null"
        (signed, _), change = self._allocate_reply(client, body)
        now = time.time()
        change.merge(self.book.consume([sig_alloc]))
        change.merge(self._store_post(client, post, now))
        await self._durable(self._purge(now).merge(change))
        log.info(
            "hub %s: share %d of key %s from %s for %s stored",
            self.settings.name,
            post.share_index,
            post.user_key_id,
            client,
            post.slave_sae_id,
        )
        return Response(200, body, ((wire.SIGNATURE_HEADER, signed),))

    def _check_post(self, client: str, post: wire.SharePost) -> None:
        """Refuse a share another client's PSRD would sign, that is held already, or whose pad
        is unknown or used (also by an earlier item of the same batch). Changes nothing."""
        if post.master_client_name != client:
            raise Refused(403, "the share names another master client")
        if (post.slave_sae_id, post.user_key_id) in self.shares:
            raise Refused(409, "a share for this key ID is already held")
        try:
            self.book.peek(client, "client", [post.encryption_key_allocation])
        except PsrdError as exc:
            raise Refused(409 if "reuses" in str(exc) else 400, str(exc)) from None

    def _store_post(self, client: str, post: wire.SharePost, now: float) -> Change:
        """Hold a checked share, encrypted under its pad (kept until delivery)."""
        key = (post.slave_sae_id, post.user_key_id)
        change = self.book.consume([post.encryption_key_allocation], hold=True)
        pad_text = post.encryption_key_allocation.header_text()
        value = post.encrypted_share_value
        change.sql.append(
            (
                "INSERT INTO shares VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (*key, client, post.master_sae_id, post.share_index, pad_text, value, now),
            )
        )
        self.shares[key] = StoredShare(
            client, post.master_sae_id, post.share_index, post.encryption_key_allocation, value, now
        )
        return change

    def _allocate_reply(
        self, client: str, body: bytes, pad_size: int = 0
    ) -> tuple[tuple[str, bytes], Change]:
        """A hub-owned allocation for the answer's signature (and a pad): header, pad, change."""
        sizes = [wire.SIGNING_KEY_SIZE] + ([pad_size] if pad_size else [])
        try:
            allocated, change = self.book.allocate(client, "hub", sizes)
        except PsrdExhausted:
            raise Refused(503, "hub-owned PSRD for this client is exhausted") from None
        sig_alloc, sig_key = allocated[0]
        pad = allocated[1][1] if pad_size else b""
        return (wire.signature_header(sig_alloc, sig_key, b"", body), pad), change

    def _find(self, client: str, key_id: str) -> tuple[str, str] | None:
        """The share of `key_id` for `client` or one of the encryptors it owns (the sender named
        it)."""
        if (client, key_id) in self.shares:
            return (client, key_id)
        for name in self.clients[client]:
            if (name, key_id) in self.shares and self.owners.get(name) == client:
                return (name, key_id)
        return None

    async def _get_share(self, request: Request) -> Response:
        if request.method != "GET":
            raise Refused(405, "key-share is GET or POST")
        query = _query(request.query, {"client_name", "key_id"})
        client = wire.name(query["client_name"], "client_name")
        key_id = wire.key_id(query["key_id"])
        self._registered(client)
        self._identity(request, client)
        sig_alloc, _ = self._verify(request, client)
        found = self._find(client, key_id)
        if found is None:
            await self._durable(self.book.consume([sig_alloc]))
            raise Refused(404, "no share for this key ID and client")
        share = self.shares[found]
        try:
            allocated, change = self.book.allocate(
                client, "hub", [len(share.value), wire.SIGNING_KEY_SIZE]
            )
        except PsrdExhausted:
            raise Refused(503, "hub-owned PSRD for this client is exhausted") from None
        (pad_alloc, pad), (reply_sig_alloc, reply_key) = allocated
        clear, forget = self._forget(found)
        reply = wire.ShareReply(share.share_index, pad_alloc, wire.xor(clear, pad))
        body = reply.encode()
        header = wire.signature_header(reply_sig_alloc, reply_key, b"", body)
        change.merge(self.book.consume([sig_alloc])).merge(forget)
        await self._durable(change)
        log.info(
            "hub %s: share %d of key %s delivered to %s",
            self.settings.name,
            share.share_index,
            key_id,
            client,
        )
        return Response(200, body, ((wire.SIGNATURE_HEADER, header),))

    # -- batches (our extension, batchwire.py) ---------------------------------------------

    def _batch_open(self, request: Request, client: str) -> wire.Allocation:
        """A batch's client: registered, named by the certificate, and its signature good; the
        signing allocation (consumed by the caller once nothing can refuse the batch)."""
        if request.query:
            raise Refused(400, "a batch takes no query string")
        self._registered(client)
        self._identity(request, client)
        return self._verify(request, client)[0]

    async def _post_batch(self, request: Request) -> Response:
        if request.method == "GET":  # the probe: this hub serves batches
            return Response(200, batchwire.encode_capabilities(batchwire.MAX_ITEMS))
        if request.method != "POST":
            raise Refused(405, "key-shares is GET (probe) or POST")
        batch = batchwire.parse_post_batch(request.body)
        client = batch.client_name
        sig_alloc = self._batch_open(request, client)
        try:
            ((reply_alloc, reply_key),), change = self.book.allocate(
                client, "hub", [wire.SIGNING_KEY_SIZE]
            )
        except PsrdExhausted:
            raise Refused(503, "hub-owned PSRD for this client is exhausted") from None
        change.merge(self.book.consume([sig_alloc]))
        now = time.time()
        results = []
        events: list[str] = []  # one log line per batch, naming each share
        for post in batch.shares:
            try:
                if isinstance(post, WireError):
                    raise Refused(400, str(post))
                self._check_post(client, post)
            except Refused as exc:
                results.append(ItemResult(exc.status, exc.detail))
                continue
            change.merge(self._store_post(client, post, now))
            results.append(ItemResult(200))
            events.append(
                f"share {post.share_index} of key {post.user_key_id} from {client} "
                f"for {post.slave_sae_id} stored"
            )
        body = batchwire.encode_post_results(results)
        header = wire.signature_header(reply_alloc, reply_key, b"", body)
        await self._durable(self._purge(now).merge(change))
        refused = len(results) - len(events)
        log.info(
            "hub %s: batch from %s, %d refused: %s",
            self.settings.name,
            client,
            refused,
            "; ".join(events),
        )
        return Response(200, body, ((wire.SIGNATURE_HEADER, header),))

    async def _fetch_batch(self, request: Request) -> Response:
        if request.method != "POST":
            raise Refused(405, "key-shares-fetch is POST")
        batch = batchwire.parse_fetch_batch(request.body)
        client = batch.client_name
        sig_alloc = self._batch_open(request, client)
        found: dict[str, tuple[str, str]] = {}
        for key_id in batch.key_ids:
            if isinstance(key_id, str) and key_id not in found:
                slot = self._find(client, key_id)
                if slot is not None:
                    found[key_id] = slot
        sizes = [wire.SIGNING_KEY_SIZE] + [len(self.shares[s].value) for s in found.values()]
        try:
            allocated, change = self.book.allocate(client, "hub", sizes)
        except PsrdExhausted:
            raise Refused(503, "hub-owned PSRD for this client is exhausted") from None
        (reply_alloc, reply_key), pads = allocated[0], iter(allocated[1:])
        change.merge(self.book.consume([sig_alloc]))
        results = []
        events: list[str] = []
        for key_id in batch.key_ids:
            if isinstance(key_id, WireError):
                results.append(batchwire.FetchResult("", ItemResult(400, str(key_id))))
                continue
            slot = found.pop(key_id, None)
            if slot is None:
                missing = ItemResult(404, "no share for this key ID and client")
                results.append(batchwire.FetchResult(key_id, missing))
                continue
            share = self.shares[slot]
            pad_alloc, pad = next(pads)
            clear, forget = self._forget(slot)
            change.merge(forget)
            reply = wire.ShareReply(share.share_index, pad_alloc, wire.xor(clear, pad))
            results.append(batchwire.FetchResult(key_id, ItemResult(200), reply))
            events.append(f"share {share.share_index} of key {key_id} delivered to {client}")
        body = batchwire.encode_fetch_results(results)
        header = wire.signature_header(reply_alloc, reply_key, b"", body)
        await self._durable(change)
        log.info(
            "hub %s: batch for %s, %d not found: %s",
            self.settings.name,
            client,
            len(results) - len(events),
            "; ".join(events),
        )
        return Response(200, body, ((wire.SIGNATURE_HEADER, header),))


__all__ = ["Hub", "HubSettings", "Request", "Response"]
