"""Sink `strongswan-ppk`: the link's secret as an IKEv2 Postquantum Preshared Key (RFC 8784).

The secret is loaded into a running charon over VICI (`load-shared`, type PPK, owners = the
PPK_ID, a unique id per link so a new epoch replaces the old one). A new PPK only applies to the
next IKE_AUTH, so after both agents hold it the link's responder side reauthenticates the
configured IKE SA (see `logic.should_reauth`). The sink's background task (`run`, started by the
agent) calls `check_once` every `check_interval` to re-push PPKs that an operator's
`swanctl --load-creds` silently unloaded; the check has its own VICI client so that a rotation's
blocking `initiate` never delays a repair.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from qkdagent import (
    ComponentEvent,
    KeyMeta,
    Link,
    Misconfigured,
    NotInstalled,
    Options,
    PluginContext,
    QkdAgentError,
    Secret,
    Sink,
    SinkError,
)

from . import logic
from .config import PpkConfig, is_template
from .vici_events import LogEvents
from .vici_io import ViciClient, request

log = logging.getLogger(__name__)
MIN_PPK_BYTES = 16
POLL = 0.25
"""Seconds between `list-sas` polls while a reauthentication runs, unless a log event about the
new IKE SA (established, failed) calls for a look sooner."""


@dataclass
class _LinkState:
    """What this sink last put into charon for one link (the bytes stay in a redacted Secret)."""

    link: Link
    names: logic.Names
    epoch: int
    secret: Secret | None
    """What charon should hold under `names.secret_id`; None after an erase by unloading."""
    erased: bool = False
    reauthed: bool = False
    need_uid: int | None = None
    """Set once a reauthentication was requested for this PPK: the lowest unique id of an IKE SA
    that runs on it (the new SA's id once it is up); see `logic.ppk_in_effect`."""


class _Rejected(SinkError):
    """A reauthentication attempt failed authentication (worth one more try)."""


@dataclass(frozen=True)
class PpkRepair:
    """Event: charon had lost a PPK (or a connection's PPK_ID) and the sink re-pushed it."""

    link: str
    secret_id: str
    """The VICI id re-loaded, or `conn:<name>` for a connection re-sent from `conn_file`."""
    time: float


class StrongswanPpkSink(Sink):
    """Installs the link secret as a strongSwan PPK and makes it take effect by reauthentication."""

    type_name = "strongswan-ppk"

    def __init__(self, name: str, options: Options, context: PluginContext) -> None:
        super().__init__(name, options, context)
        self.config = PpkConfig.read(options)
        self._vici = ViciClient(self.config.socket, self.config.vici_timeout)
        self._check_vici = ViciClient(self.config.socket, self.config.vici_timeout)
        """The background check's own session: rotations may block `_vici` for seconds."""
        self._locks: dict[str, trio.Lock] = {}
        """Per link: held while install/erase change what charon holds, so that a concurrent
        repair never re-pushes a PPK that was just replaced."""
        self._links: dict[str, _LinkState] = {}
        self._conn_message: dict[str, object] | None = None
        self._warned_gap = False
        self.repairs: deque[PpkRepair] = deque(maxlen=100)
        """The latest repairs (each is also reported to the agent as a `ComponentEvent`)."""
        self._check_failing = False
        self.make_before_break: bool | None = None
        """What prepare() found about charon.make_before_break (None: could not tell)."""
        self.daemon_version: str | None = None

    def __repr__(self) -> str:
        return f"<StrongswanPpkSink {self.name!r} socket={str(self.config.socket)!r}>"

    # -- lifecycle ---------------------------------------------------------------------------

    async def prepare(self) -> None:
        cfg = self.config
        if not await trio.Path(cfg.socket).exists():
            raise NotInstalled(
                f"charon's VICI socket {cfg.socket} does not exist: is charon running with the "
                "vici plugin, and is `socket` right?"
            )
        try:
            version = await self._vici.call("version", request("version"))
        except SinkError as exc:
            raise NotInstalled(str(exc)) from None
        self.daemon_version = str(logic.decode(version.get("version", b"")))
        if cfg.conn_file is not None and cfg.ike is not None:
            try:
                text = await trio.Path(cfg.conn_file).read_text()
            except OSError as exc:
                raise Misconfigured(
                    f"cannot read conn_file {cfg.conn_file}: {exc.strerror}"
                ) from None
            try:
                self._conn_message = logic.parse_conn_message(text, cfg.ike)
            except ValueError as exc:
                raise Misconfigured(f"conn_file {cfg.conn_file}: {exc}") from None
        if cfg.ike is not None and not is_template(cfg.ike):
            await self._check_connection(cfg.ike)
        if cfg.reauth != "off":
            self.make_before_break = await self._make_before_break()
            if self.make_before_break is not True:
                log.warning(
                    "sink %s: charon.make_before_break is %s; with it off a failed "
                    "reauthentication drops the tunnel until the next good one. Set "
                    "`charon { make_before_break = yes }` in strongswan.conf",
                    self.name,
                    "off" if self.make_before_break is False else "not known to be on",
                )

    async def _check_connection(self, ike: str) -> None:
        conn = await self._conn(ike)
        if conn is None:
            raise Misconfigured(f"charon has no connection {ike!r} (option `ike`)")
        cfg = self.config
        sent = conn.get("ppk_id")
        if cfg.versioned and sent is not None and cfg.conn_file is None:
            raise Misconfigured(
                f"connection {ike!r} sends the fixed ppk_id {sent!r}, which never matches a "
                "versioned PPK_ID: remove its ppk_id (responder) or set `conn_file`"
            )
        if sent is not None and not cfg.versioned and not is_template(cfg.ppk_id):
            if sent != cfg.ppk_id:
                raise Misconfigured(
                    f"connection {ike!r} uses ppk_id {sent!r} but this sink loads the PPK for "
                    f"{cfg.ppk_id!r}; set `ppk_id` to the connection's ppk_id"
                )
        if conn.get("ppk_required") not in ("yes", "1", "true"):
            log.warning(
                "sink %s: connection %r lacks `ppk_required = yes`: a peer without the PPK "
                "falls back to authentication without it",
                self.name,
                ike,
            )

    async def _make_before_break(self) -> bool | None:
        texts = await trio.to_thread.run_sync(_read_confs, self.config.strongswan_conf)
        setting = logic.make_before_break_setting(texts)
        if setting is not None:
            return setting
        if self.daemon_version and logic.version_at_least(self.daemon_version, (6, 0)):
            return True  # the default since 6.0.0
        return False if self.daemon_version else None

    async def aclose(self) -> None:
        await self._vici.aclose()
        await self._check_vici.aclose()

    def _lock(self, link: str) -> trio.Lock:
        return self._locks.setdefault(link, trio.Lock())

    # -- the Sink contract -------------------------------------------------------------------

    async def install(self, link: Link, secret: Secret, meta: KeyMeta) -> None:
        if len(secret) < MIN_PPK_BYTES:
            raise SinkError(f"a PPK must be at least {MIN_PPK_BYTES} bytes, got {len(secret)}")
        names = logic.names(self.config, link, self.name, meta.epoch)
        async with self._lock(link.name):
            previous = self._links.get(link.name)
            await self._load(self._vici, names, secret)
            # no checkpoint between the load and this record: a cancelled install either did
            # not start the load or recorded what charon now holds
            if (
                previous is not None
                and previous.epoch == meta.epoch
                and not previous.erased
                and previous.secret is not None
                and previous.secret == secret
            ):
                state = previous
            else:
                state = _LinkState(link, names, meta.epoch, Secret(secret.reveal()))
                self._links[link.name] = state
            if self.config.versioned:
                await self._load_conn(self._vici, names.ppk_id)
                await self._unload_stale(link, meta.epoch, self.config.keep_versions)
        log.info(
            "sink %s: loaded PPK %s (PPK_ID %s) for link %s epoch %d",
            self.name,
            names.secret_id,
            names.ppk_id,
            link.name,
            meta.epoch,
        )
        if logic.should_reauth(self.config, link) and not state.reauthed:
            await self.reauthenticate(link)
            state.reauthed = True

    async def verify(self, link: Link, secret: Secret, meta: KeyMeta) -> bool | None:
        """True when charon holds this secret and, after a reauthentication was requested for
        it, an IKE SA created since then is up (an older SA still runs on the previous PPK)."""
        state = self._links.get(link.name)
        if state is None or state.erased or state.secret is None or state.secret != secret:
            return False
        if state.names.secret_id not in await self.loaded_ids():
            return False
        if state.names.ike is not None:
            return logic.ppk_in_effect(await self.ike_sas(state.names.ike), state.need_uid)
        return True

    async def erase(self, link: Link, reason: str) -> None:
        async with self._lock(link.name):
            replaced = await self._erase(link)
        log.warning(
            "sink %s: erased the PPK of link %s (%s): %s",
            self.name,
            link.name,
            reason,
            "replaced by a random one" if replaced else "unloaded",
        )

    async def _erase(self, link: Link) -> bool:
        cfg = self.config
        state = self._links.get(link.name)
        epoch = state.epoch if state is not None else 0
        names = logic.names(cfg, link, self.name, epoch)
        loaded = await self.loaded_ids()
        if cfg.versioned:
            targets = logic.link_versions(loaded, logic.version_prefix(cfg, link, self.name))
        else:
            targets = [names.secret_id] if names.secret_id in loaded else []
        replacement: Secret | None = None
        if cfg.erase == "random" and (state is not None or not cfg.versioned):
            replacement = Secret.random(32)
            await self._load(self._vici, names, replacement)
            targets = [t for t in targets if t != names.secret_id]
        for secret_id in targets:
            await self._unload(secret_id)
        self._links[link.name] = _LinkState(
            link, names, epoch, replacement, erased=True, reauthed=True
        )
        return replacement is not None

    # -- reauthentication --------------------------------------------------------------------

    async def ike_sas(self, ike: str) -> list[dict[str, object]]:
        """The IKE SAs of connection `ike`, decoded (waits for SAs that are busy)."""
        return await self._vici.call(
            "list-sas", lambda s: logic.flatten_sas(s.list_sas({"ike": ike}))
        )

    async def reauthenticate(self, link: Link) -> None:
        """Reauthenticate the link's IKE SAs and wait until a new one is up with the PPK.

        The agent never terminates the old SA before a new one is up: with make_before_break
        charon keeps it until the new one is established, and a failed reauthentication leaves
        it in place. Raises SinkError when no new SA came up.

        From the request on, `verify()` of the link's current PPK needs an IKE SA newer than
        every SA seen here; once the new SA is up, that SA's unique id.
        """
        ike = logic.names(self.config, link, self.name, 0).ike
        if ike is None:
            return
        state = self._links.get(link.name)
        before = await self.ike_sas(ike)
        if not before:
            log.info(
                "sink %s: no IKE SA of %r is up; the new PPK applies to the next one",
                self.name,
                ike,
            )
            return
        if state is not None:
            state.need_uid = logic.newest_uid(before) + 1
        old = [str(sa.get("uniqueid")) for sa in before]
        uid = None
        if self._conn_message is not None:
            uid = await self._replace_sas(link, ike, old)
        if uid is None:
            uid = await self._reauth_with_retries(link, ike, old)
        if uid is not None and state is not None and self._links.get(link.name) is state:
            state.need_uid = uid

    async def _reauth_with_retries(self, link: Link, ike: str, old: list[str]) -> int | None:
        """`rekey reauth=yes` until a new SA is up: its unique id (None: no SA left to renew)."""
        for attempt in range(self.config.reauth_retries + 1):
            if attempt:
                # the initiator installs while it sends `commit`: its charon may not have had
                # the PPK yet when our first attempt reached it
                await trio.sleep(self.config.reauth_retry_delay)
                old = [str(sa.get("uniqueid")) for sa in await self.ike_sas(ike)]
                if not old:
                    return None
            try:
                return await self._rekey_reauth(link, ike, old)
            except _Rejected as exc:
                if attempt == self.config.reauth_retries:
                    raise SinkError(str(exc)) from None
                log.info("sink %s: %s; retrying", self.name, exc)
        return None

    async def _rekey_reauth(self, link: Link, ike: str, old: list[str]) -> int | None:
        tracker = logic.ReauthTracker(frozenset(old))
        started = time.monotonic()
        outcome = logic.Outcome.PENDING
        wake = trio.Event()
        async with LogEvents.open(self.config.socket) as events, trio.open_nursery() as nursery:

            async def follow_log() -> None:
                nonlocal wake
                needle = ike.encode()
                while True:
                    if tracker.note(await events.next(needle), ike):
                        wake.set()

            nursery.start_soon(follow_log)
            try:
                await self._vici.call("rekey", request("rekey", {"ike": ike, "reauth": "yes"}))
            except SinkError as exc:
                if "no matching" not in str(exc):
                    raise
                log.info("sink %s: IKE SA %r went away before its reauthentication", self.name, ike)
                nursery.cancel_scope.cancel()
                return None
            with trio.move_on_after(self.config.reauth_timeout):
                while outcome is logic.Outcome.PENDING:
                    with trio.move_on_after(POLL):
                        await wake.wait()
                    wake = trio.Event()
                    outcome = tracker.update(await self.ike_sas(ike))
            nursery.cancel_scope.cancel()
        if tracker.gap and not self._warned_gap:
            self._warned_gap = True
            log.warning(
                "sink %s: during reauthentication of %r no IKE SA was up: charon runs "
                "break-before-make; set charon.make_before_break = yes",
                self.name,
                ike,
            )
        if outcome is logic.Outcome.FAILED:
            raise _Rejected(
                f"reauthentication of IKE SA {ike!r} for link {link.name} was rejected (does "
                "the peer hold the same PPK?); the previous SA was left in place"
            )
        if outcome is not logic.Outcome.DONE:
            raise SinkError(
                f"reauthentication of IKE SA {ike!r} for link {link.name} did not complete "
                f"within {self.config.reauth_timeout:g} s; the previous SA was left in place"
            )
        if tracker.ppk == "no":
            raise SinkError(f"the reauthenticated IKE SA {ike!r} does not use a PPK")
        log.info(
            "sink %s: reauthenticated IKE SA %r with the new PPK in %.3f s",
            self.name,
            ike,
            time.monotonic() - started,
        )
        return logic.parse_uid(tracker.established)

    async def _replace_sas(self, link: Link, ike: str, old: list[str]) -> int | None:
        """Make-before-break by hand for a connection re-sent with a new PPK_ID.

        A reauthentication reuses the IKE SA's original connection object, so it would still
        send the previous epoch's PPK_ID. Initiating creates an IKE SA from the reloaded
        connection (with its CHILD SAs); only once it is up are the old IKE SAs deleted.
        Returns the new SA's unique id, or None when charon reuses the existing SA instead (its
        connection is unchanged, so it already sends the current PPK_ID and a plain
        reauthentication is right).
        """
        assert self._conn_message is not None
        conn = self._conn_message[ike]
        children = list(conn.get("children", {})) if isinstance(conn, dict) else []
        started = time.monotonic()
        timeout_ms = str(int(self.config.reauth_timeout * 1000))
        messages: list[str] = []

        def initiate(session: Any) -> None:
            for child in children or [None]:
                message = {"ike": ike, "timeout": timeout_ms}
                if child is not None:
                    message["child"] = child
                for event in session.initiate(message):
                    messages.append(str(logic.decode(event.get("msg", b""))))

        try:
            await self._vici.call(f"initiate {ike!r}", initiate)
        except SinkError as exc:
            if any("existing duplicate" in m for m in messages):
                return None
            raise SinkError(
                f"new IKE SA {ike!r} for link {link.name} failed ({exc}); the previous SA was "
                "left in place"
            ) from None
        fresh = [sa for sa in await self.ike_sas(ike) if str(sa.get("uniqueid")) not in old]
        up = [sa for sa in fresh if sa.get("state") == "ESTABLISHED"]
        if not up:
            raise SinkError(f"no new IKE SA {ike!r} came up; the previous SA was left in place")
        if any(logic.sa_uses_ppk(sa) is False for sa in fresh):
            raise SinkError(f"the new IKE SA {ike!r} does not use a PPK")
        for uid in old:
            terminate = partial(_terminate, {"ike-id": uid, "timeout": "-1"})
            await self._vici.call(f"terminate IKE SA {uid}", terminate)
        log.info(
            "sink %s: replaced IKE SA %r by one sending the new PPK_ID in %.3f s",
            self.name,
            ike,
            time.monotonic() - started,
        )
        return logic.newest_uid(up)

    # -- repair after operator reloads -------------------------------------------------------

    async def check_once(self) -> list[PpkRepair]:
        """Re-push every PPK (and conn_file connection) charon lost; return the repairs.

        Uses its own VICI client. A link whose install or erase is changing charon right now
        is skipped (that call loads what is current); a re-push that fails is reported and the
        other links are still checked. A check that cannot reach charon raises SinkError and is
        reported once until a check succeeds again.
        """
        wanted = [s for s in self._links.values() if s.secret is not None]
        if not wanted:
            return []
        try:
            loaded = await self.loaded_ids(self._check_vici)
        except SinkError as exc:
            if not self._check_failing:
                self._check_failing = True
                self._report("check_failed", f"cannot list charon's PPKs: {exc}")
            raise
        self._check_failing = False
        repaired = []
        for state in wanted:
            if state.names.secret_id not in loaded:
                repaired += await self._repair_ppk(state)
        current = wanted[-1]
        if self._conn_message is not None and not current.erased and self.config.ike:
            repaired += await self._repair_conn(current, self.config.ike)
        return repaired

    async def _repair_ppk(self, state: _LinkState) -> list[PpkRepair]:
        with _unless_busy(self._lock(state.link.name)) as free:
            if not free or self._links.get(state.link.name) is not state or state.secret is None:
                return []
            try:
                await self._load(self._check_vici, state.names, state.secret)
            except SinkError as exc:
                self._failed_repair(state, f"re-installing PPK {state.names.secret_id}", exc)
                return []
            return [
                self._repaired(
                    state,
                    state.names.secret_id,
                    f"charon no longer held PPK {state.names.secret_id} (swanctl --load-creds "
                    "or --load-all, or a daemon restart?); re-installed it",
                )
            ]

    async def _repair_conn(self, state: _LinkState, ike: str) -> list[PpkRepair]:
        with _unless_busy(self._lock(state.link.name)) as free:
            if not free or self._links.get(state.link.name) is not state:
                return []
            try:
                conn = await self._conn(ike, self._check_vici)
                if conn is not None and conn.get("ppk_id") == state.names.ppk_id:
                    return []
                await self._load_conn(self._check_vici, state.names.ppk_id)
            except SinkError as exc:
                self._failed_repair(state, f"re-loading connection {ike!r}", exc)
                return []
            return [
                self._repaired(
                    state,
                    f"conn:{ike}",
                    f"connection {ike!r} no longer sent PPK_ID {state.names.ppk_id} "
                    "(swanctl --load-conns?); re-loaded it from conn_file",
                )
            ]

    def _repaired(self, state: _LinkState, what: str, detail: str) -> PpkRepair:
        event = PpkRepair(state.link.name, what, time.time())
        self.repairs.append(event)
        self._report("repaired", detail, state.link.name)
        return event

    def _failed_repair(self, state: _LinkState, what: str, exc: SinkError) -> None:
        self._report("reinstall_failed", f"{what} failed: {exc}", state.link.name)

    def _report(self, kind: str, detail: str, link: str | None = None) -> None:
        """To the agent (a hook call, a metric and a log line); details never hold key bytes."""
        self.context.report(ComponentEvent(self.name, kind, detail, link))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The agent runs this after `prepare()`: `check_once()` every `check_interval` seconds
        (the first one interval from now: the agent has just installed or erased), until the
        agent cancels it. A failed check is logged and the next one runs on schedule."""
        task_status.started()
        next_check = trio.current_time() + self.config.check_interval
        while True:
            await trio.sleep_until(next_check)
            next_check = trio.current_time() + self.config.check_interval  # from its start
            try:
                await self.check_once()
            except QkdAgentError as exc:
                log.warning("sink %s: PPK check failed: %s", self.name, exc)

    # -- VICI helpers ------------------------------------------------------------------------

    async def _load(self, client: ViciClient, names: logic.Names, secret: Secret) -> None:
        def load(session: Any) -> None:
            session.request(
                "load-shared",
                {
                    "id": names.secret_id,
                    "type": "PPK",
                    "data": secret.reveal(),
                    "owners": [names.ppk_id],
                },
            )

        await client.call(f"load-shared {names.secret_id!r}", load)

    async def _load_conn(self, client: ViciClient, ppk_id: str) -> None:
        """Re-send the connection from `conn_file` so that it sends this epoch's PPK_ID.

        `load-conn` replaces the definition; established SAs stay up until replaced.
        """
        if self._conn_message is None or self.config.ike is None:
            return
        message = logic.with_ppk_id(self._conn_message, self.config.ike, ppk_id)
        await client.call(f"load-conn {self.config.ike!r}", request("load-conn", message))

    async def _conn(self, ike: str, client: ViciClient | None = None) -> dict[str, Any] | None:
        conns = await (client or self._vici).call(
            "list-conns", lambda s: [logic.decode(c) for c in s.list_conns({"ike": ike})]
        )
        for entry in conns:
            if isinstance(entry, dict) and isinstance(entry.get(ike), dict):
                return entry[ike]
        return None

    async def _unload(self, secret_id: str) -> None:
        try:
            await self._vici.call(
                f"unload-shared {secret_id!r}", request("unload-shared", {"id": secret_id})
            )
        except SinkError:
            if secret_id in await self.loaded_ids():
                raise

    async def _unload_stale(self, link: Link, epoch: int, keep: int) -> None:
        prefix = logic.version_prefix(self.config, link, self.name)
        for secret_id in logic.stale_versions(await self.loaded_ids(), prefix, epoch, keep):
            await self._unload(secret_id)

    async def loaded_ids(self, client: ViciClient | None = None) -> set[str]:
        """Ids of every secret loaded over VICI (`get-shared`)."""
        answer = await (client or self._vici).call("get-shared", request("get-shared"))
        keys = logic.decode(answer.get("keys", []))
        return {k for k in keys if isinstance(k, str)} if isinstance(keys, list) else set()


@contextmanager
def _unless_busy(lock: trio.Lock) -> Iterator[bool]:
    """Hold `lock` if it is free (yields True); never waits for it (yields False)."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _terminate(message: dict[str, str], session: Any) -> list[Any]:
    return list(session.terminate(message))


def _read_confs(path: Path | None) -> list[str]:
    """strongswan.conf and the files it usually includes (strongswan.d beside it)."""
    if path is None:
        return []
    files = [path]
    included = path.parent / "strongswan.d"
    if included.is_dir():
        files += sorted(included.rglob("*.conf"))
    texts = []
    for file in files:
        try:
            texts.append(file.read_text(errors="replace"))
        except OSError:
            continue
    return texts
