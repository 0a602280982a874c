"""Link protocol `qupskd`: quPSKd's peer protocol, both roles, on qkdagent's link machinery.

The side that receives `/new` or `/rotate` takes a fresh key from its source (014 `enc_keys`)
and answers its key ID; the caller takes that key by ID (`dec_keys`) and calls `/ack`, on which
the receiver derives the next chain value and commits it; the caller then does the same. Each
chain value is committed with `link.commit` (durable before any sink sees it) together with the
chain state, so a restart continues the chain. Nothing a peer says changes state unless the
whole exchange completed: a bad answer is `link.report_failure` and one failed attempt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import trio

from qkdagent import (
    ForeignLink,
    Key,
    LinkProtocol,
    Options,
    PluginContext,
    QkdAgentError,
    Secret,
)

from . import chain, http, settings, timers, wire
from .chain import ChainError, ChainState
from .net import network

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 8
"""Peer connections served at once; more are closed unanswered (quPSKd makes one at a time)."""
PENDING_TTL = 60.0
"""How long an offered key waits for the peer's `/ack`."""


@dataclass
class _Pending:
    """A key this side offered (`/new`, `/rotate`) and the chain value it extends."""

    base: str
    key: Key
    generation: int
    at: float


class QupskdProtocol(LinkProtocol):
    """One link to one quPSKd daemon (or to another qkdagent speaking its protocol)."""

    protocol_name = "qupskd"
    authenticated = False

    def __init__(self, name: str, options: Options, context: PluginContext) -> None:
        super().__init__(name, options, context)
        self.settings = settings.read(options)
        self._link: ForeignLink | None = None
        self._waits = timers.Waits()
        self._psk = chain.random_psk()
        self._synced = False
        self._caller = True
        self._since = 0.0
        self._generation = 0
        self._pending: _Pending | None = None
        self._lock = trio.Lock()
        self._changed = trio.Event()
        self._failures = 0
        self._retry_at: float | None = None
        self._connections = trio.Semaphore(MAX_CONNECTIONS)
        self.counts = {"called": 0, "served": 0, "failed": 0, "expired": 0, "refused": 0}

    # -- lifecycle -----------------------------------------------------------------------

    async def run(
        self, link: ForeignLink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._link = link
        self._waits = self.settings.waits(link.interval, link.reject_after)
        if self._waits.maximum > link.reject_after:
            log.warning(
                "link %s: max_wait (%g s) is longer than reject_after (%g s): the agent erases "
                "the sinks first; the chain is randomised only at max_wait",
                self.name, self._waits.maximum, link.reject_after,
            )  # fmt: skip
        self._restore(link)
        self._since = trio.current_time()
        async with trio.open_nursery() as nursery:
            await nursery.start(
                self._serve_peer, name=f"qupskd {self.settings.host}:{self.settings.port}"
            )
            log.info(
                "link %s: quPSKd protocol on http://%s:%d, peer %s (%s)",
                self.name, self.settings.host, self.settings.port, self.settings.peer_url,
                "chain restored" if self._synced else "will resynchronise with /new",
            )  # fmt: skip
            task_status.started()
            await self._drive()

    def _restore(self, link: ForeignLink) -> None:
        """The committed chain, unless the sinks were erased since (the peer has moved on to a
        random PSK then) or the state is unusable: then the next call is `/new`."""
        self._synced = False
        self._caller = True
        state = link.state
        if state is None or link.erased:
            return
        try:
            restored = ChainState.decode(state)
        except ChainError as exc:
            log.warning("link %s: %s; resynchronising with /new", self.name, exc)
            return
        self._psk, self._caller, self._synced = restored.psk, restored.caller, True

    def describe(self) -> dict[str, Any]:
        return {
            "qupskd_listen": f"{self.settings.host}:{self.settings.port}",
            "qupskd_peer": self.settings.peer_url,
            "qupskd_synced": self._synced,
            "qupskd_last_role": "caller" if self._caller else "receiver",
            "qupskd_waits": [self._waits.initiator, self._waits.responder, self._waits.maximum],
            **{f"qupskd_{k}": v for k, v in self.counts.items()},
        }

    # -- the caller side -----------------------------------------------------------------

    async def _drive(self) -> None:
        while True:
            now = trio.current_time()
            decision = timers.decide(
                now,
                since=self._since,
                caller=self._caller,
                synced=self._synced,
                waits=self._waits,
                retry_at=self._retry_at,
            )
            if decision.action is timers.Action.WAIT:
                changed = self._changed
                with trio.move_on_at(decision.at):
                    await changed.wait()
            elif decision.action is timers.Action.EXPIRE:
                await self._expire()
            elif await self._call(decision.new):
                self._failures, self._retry_at = 0, None
            else:
                self._failures += 1
                self._retry_at = trio.current_time() + timers.retry_delay(self._failures)

    def _moved(self) -> None:
        self._generation += 1
        self._wake()

    def _wake(self) -> None:
        """Make the caller loop decide again now."""
        self._changed.set()
        self._changed = trio.Event()

    async def _expire(self) -> None:
        link = self._require_link()
        async with self._lock:
            self._psk, self._synced = chain.random_psk(), False
            self._since = trio.current_time()
            self._drop_pending()
            self.counts["expired"] += 1
            self._moved()
        message = f"no rotation within max_wait ({self._waits.maximum:g} s)"
        link.report_failure("expiry", f"{message}; random PSK, resynchronising with /new")
        await link.erase("qupskd max_wait")

    async def _call(self, new: bool) -> bool:
        link = self._require_link()
        path = "/new" if new else "/rotate"
        async with self._lock:
            started = trio.current_time()
            base = chain.initial(self.settings.psk_text()) if new else self._psk
            stage = "peer"
            key: Key | None = None
            try:
                status, body = await self._get(path)
                if status != 200:
                    raise wire.WireError(f"peer answered {status} to {path}")
                key_id = wire.parse_key_answer(body)
                stage = "source"
                key = await link.key_by_id(key_id)
                stage = "peer"
                status, body = await self._get("/ack")
                if status != 200:
                    raise wire.WireError(f"peer answered {status} to /ack")
                wire.parse_ack(body)
                stage = "commit"
                psk = chain.advance(base, key.value.reveal(), key_id)
                await self._commit(link, psk, key_id, caller=True, started=started)
            except (wire.WireError, http.HttpError, QkdAgentError) as exc:
                self.counts["failed"] += 1
                link.report_failure(stage, f"{path}: {type(exc).__name__}: {exc}"[:300])
                return False
            finally:
                if key is not None:
                    key.value.wipe()
            self.counts["called"] += 1
            return True

    async def _get(self, path: str) -> tuple[int, bytes]:
        s = self.settings
        return await http.get(
            network(),
            s.peer_host,
            s.peer_port,
            path,
            within=s.request_timeout,
            max_body=wire.MAX_ANSWER_BYTES,
        )

    async def _commit(
        self, link: ForeignLink, psk: str, key_id: str, *, caller: bool, started: float
    ) -> None:
        """Durable first (the core's commit), then this side's view of the chain."""
        state = ChainState(psk, caller)
        await link.commit(
            Secret(chain.secret_bytes(psk)), [key_id], state=state.encode(), started=started
        )
        self._psk, self._caller, self._synced = psk, caller, True
        self._since = trio.current_time()
        self._failures, self._retry_at = 0, None
        self._drop_pending()
        self._moved()

    # -- the receiver side ---------------------------------------------------------------

    async def _serve_peer(self, *, task_status: trio.TaskStatus[None]) -> None:
        s = self.settings
        await network().serve(s.host, s.port, self._connection, task_status=task_status)

    async def _connection(self, stream: trio.abc.Stream) -> None:
        try:
            self._connections.acquire_nowait()
        except trio.WouldBlock:
            await trio.aclose_forcefully(stream)
            return
        try:
            await http.serve_one(stream, self._respond, within=self.settings.request_timeout * 3)
        finally:
            self._connections.release()

    async def _respond(self, method: str, target: str) -> tuple[int, bytes]:
        name = wire.route(method, target)
        if name is None:
            return 404, wire.error_answer("not found")
        if self._lock.locked():
            self.counts["refused"] += 1
            return 503, wire.error_answer("busy: an exchange is in progress")
        async with self._lock:
            if name == "ack":
                return await self._acknowledged()
            return await self._offer(new=name == "new")

    async def _offer(self, *, new: bool) -> tuple[int, bytes]:
        link = self._require_link()
        if not new and not self._synced:
            # our chain is random or unknown: deriving would silently disagree with the peer
            self.counts["refused"] += 1
            self._retry_at = None
            self._wake()  # call /new now
            return 409, wire.error_answer("chain not synchronised: expecting /new")
        try:
            with trio.fail_after(self.settings.request_timeout):
                key = await link.new_key()
        except (QkdAgentError, trio.TooSlowError) as exc:
            self.counts["failed"] += 1
            link.report_failure("source", f"/{'new' if new else 'rotate'}: {exc}"[:300])
            return 503, wire.error_answer("no key available")
        self._drop_pending()
        base = chain.initial(self.settings.psk_text()) if new else self._psk
        self._pending = _Pending(base, key, self._generation, trio.current_time())
        return 200, wire.key_answer(key.key_id)

    async def _acknowledged(self) -> tuple[int, bytes]:
        link = self._require_link()
        pending, self._pending = self._pending, None
        if pending is None:
            self.counts["refused"] += 1
            return 409, wire.error_answer("no key offered")
        try:
            fresh = trio.current_time() - pending.at <= PENDING_TTL
            if pending.generation != self._generation or not fresh:
                self.counts["refused"] += 1
                return 409, wire.error_answer("the offered key is stale")
            psk = chain.advance(pending.base, pending.key.value.reveal(), pending.key.key_id)
            try:
                await self._commit(link, psk, pending.key.key_id, caller=False, started=pending.at)
            except QkdAgentError as exc:
                self.counts["failed"] += 1
                link.report_failure("commit", f"/ack: {type(exc).__name__}: {exc}"[:300])
                return 500, wire.error_answer("not committed")
        finally:
            pending.key.value.wipe()
        self.counts["served"] += 1
        return 200, wire.ack_answer()

    def _drop_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.key.value.wipe()

    def _require_link(self) -> ForeignLink:
        if self._link is None:
            raise RuntimeError("the protocol is not running")
        return self._link
