"""Sink type `tls-psk`: a PSK secrets file for stunnel, nghttpx, GnuTLS, OpenSSL or patched nginx.

One sink owns one file (it may hold several links). An install validates the new entry against
the consumer's rules, rewrites the file atomically (0600), tells the consumer to reload and then
confirms the consumer took it: a PSK handshake with the new key (`probe`) and/or the consumer's
log line (`log_file`). Anything short of that is an install failure. After an erase or a grace
expiry the probe must instead see each removed key refused (fail closed, proven). The sink's
background task (`run`) removes previous identities when their grace period ends.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from pathlib import Path

import trio

from qkdagent import (
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
    decimal,
    write_secret_file,
)

from . import identity as ident
from . import probe, reload, slots
from .formats import FORMATS, Entry, FormatError

log = logging.getLogger(__name__)

_EXAMPLE_LINK = Link("example-link", "alice", "bob", True)
EXPIRY_POLL = 1.0
"""Longest sleep of the expiry task: grace ends on the wall clock (`clock`), which may jump,
not on trio's clock; also the wait before retrying a failed removal."""


def _check_line(value: str) -> str | None:
    """A log verdict is a line's message: printable text, not empty, no outer spaces."""
    if not value.strip() or value != value.strip() or not value.isprintable():
        return "must be a non-empty line of printable text, without outer spaces"
    return None


def _check_hostport(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    number = decimal(port, 5)
    if not sep or not host or number is None or not 0 < number < 65536:
        return "must be HOST:PORT"
    return None


class TlsPskSink(Sink):
    """Sink type `tls-psk`."""

    type_name = "tls-psk"

    def __init__(self, name: str, options: Options, context: PluginContext) -> None:
        super().__init__(name, options, context)
        self.format = FORMATS[options.string("format", "stunnel", choices=sorted(FORMATS))]
        self.path: Path = options.path("path")
        self.role: str = options.string("role", "server", choices=("server", "client"))
        style = options.string("identity_style", "template", choices=("template", "cqptoolkit"))
        if style == "cqptoolkit" and options.has("identity"):
            options.fail("identity", "is fixed by identity_style = 'cqptoolkit'; remove one")
        default = ident.DEFAULT_TEMPLATE if style == "template" else ident.CQPTOOLKIT_TEMPLATE
        self.identity_template: str = options.string(
            "identity", default, check=ident.check_template, max_len=1024
        )
        self.object_template: str = options.string(
            "pkcs_object",
            "{client}",
            check=lambda t: ident.check_template(t, ident.FIELDS[:-1]),
            max_len=512,
        )
        try:
            self.format.check_identity(self._render(_EXAMPLE_LINK, 123456, self.type_name))
        except FormatError as exc:
            options.fail("identity", str(exc))

        grace_default = 0.0 if self.format.single_key else 30.0
        self.grace: float = options.number("grace_period", grace_default, min=0, max=86400)
        if self.grace and self.format.single_key:
            options.fail("grace_period", "must be 0: format 'openssl' holds a single key")
        if self.grace and not ident.uses_epoch(self.identity_template):
            options.fail(
                "grace_period",
                "needs an identity with {epoch} or {epoch_hex}, so the previous key keeps its "
                "own identity (or set grace_period = 0)",
            )

        self.pid_file: Path | None = options.path("pid_file", None)
        signame = options.string(
            "reload_signal",
            "HUP",
            check=lambda s: None if reload.parse_signal(s) else "is not a signal name",
        )
        self.reload_signal = reload.parse_signal(signame)
        if options.has("reload_signal") and self.pid_file is None:
            options.fail("reload_signal", "needs pid_file")
        self.reload_command: list[str] | None = options.strings(
            "reload_command", None, allow_empty=False
        )
        if self.pid_file is not None and self.reload_command is not None:
            options.fail("reload_command", "set either pid_file or reload_command, not both")

        log_file = options.path("log_file", None)
        self.log_watch = (
            reload.LogWatch(
                log_file,
                options.string(
                    "log_success", "Configuration successful", check=_check_line, max_len=200
                ),
                options.string(
                    "log_failure", "Configuration failed", check=_check_line, max_len=200
                ),
            )
            if log_file is not None
            else None
        )
        target = options.string("probe", None, check=_check_hostport, max_len=300)
        self.probe_target: tuple[str, int] | None = None
        if target is not None:
            if self.role == "client":
                options.fail("probe", "only a server-side sink can be probed; use log_file")
            host, _, port = target.rpartition(":")
            self.probe_target = (host.strip("[]"), int(port))
        self.probe_tls: str = options.string("probe_tls", "1.2", choices=("1.2", "1.3"))
        self.probe_ciphers: str | None = options.string("probe_ciphers", None, max_len=500)
        self.confirm_timeout: float = options.number("confirm_timeout", 5.0, positive=True, max=300)
        self._check_confirmation(options)

        self.clock: Callable[[], float] = time.time
        """Wall clock for grace expiry (persisted across restarts); tests replace it."""
        self._lock = trio.Lock()
        self._next_expiry: float | None = None

    def _check_confirmation(self, options: Options) -> None:
        """Refuse reloads nobody confirms where a rejected file would go unnoticed.

        stunnel answers a bad PSK file only with a log line and keeps its old keys, so a bare
        SIGHUP would report success for a key the consumer never took.
        """
        mode = options.string("confirm", "auto", choices=("auto", "none"))
        confirmed = self.log_watch is not None or self.probe_target is not None
        if mode == "none":
            if confirmed:
                options.fail("confirm", "'none' contradicts log_file/probe; remove one")
            return
        reloads = self.pid_file is not None or self.reload_command is not None
        if reloads and not confirmed and self.format.silent_reload_failure:
            options.fail(
                "log_file",
                f"is required with format '{self.format.name}' and a reload: "
                f"{self.format.name} reports a rejected PSK file only in its log and keeps "
                "its old keys. Set log_file (its `output`), probe = 'HOST:PORT' (server "
                "role), or confirm = 'none' to accept unconfirmed reloads",
            )

    # -- identities -------------------------------------------------------------------------

    def _render(self, link: Link, epoch: int, label: str) -> str:
        return ident.render(
            self.identity_template,
            link,
            epoch,
            label,
            server_side=self.role == "server",
            object_template=self.object_template,
        )

    def identity_for(self, link: Link, meta: KeyMeta) -> str:
        """The PSK identity this sink writes for `link` at `meta.epoch` (same on both agents)."""
        return self._render(link, meta.epoch, meta.label)

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def _state_file(self) -> Path:
        return self.context.private_dir(f"tls-psk-{self.name}") / "slots.json"

    async def prepare(self) -> None:
        if self.format.experimental:
            log.warning(
                "%s: format %r is experimental: its line format is not verified against the "
                "consumer (see the README)",
                self.name,
                self.format.name,
            )
        if not self.path.parent.is_dir():
            raise Misconfigured(f"{self.name}: directory {self.path.parent} does not exist")
        if self.reload_command is not None:
            from shutil import which

            if which(self.reload_command[0]) is None:
                raise NotInstalled(
                    f"{self.name}: reload command {self.reload_command[0]!r} not found"
                )
        if self.probe_target is not None and not probe.available():
            raise NotInstalled(f"{self.name}: probe needs libssl (OpenSSL 3) with PSK support")
        await trio.to_thread.run_sync(self._refresh_expiry)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Remove previous identities once their grace period is over, until cancelled.

        Installs come once per rotation interval, the grace period is usually shorter: the
        previous key must leave the file (and the consumer) on its own schedule.
        """
        task_status.started()
        while True:
            wait = EXPIRY_POLL
            due = self._next_expiry
            if due is not None and due <= self.clock():
                try:
                    await self.expire()
                except QkdAgentError as exc:
                    log.warning("%s: removing an expired PSK identity failed: %s", self.name, exc)
                    due = None  # retry after EXPIRY_POLL, not at once
                else:
                    due = self._next_expiry
            if due is not None:
                wait = min(wait, max(due - self.clock(), 0.01))
            await trio.sleep(wait)

    # -- file and bookkeeping (blocking; run in a worker thread) ----------------------------

    def _load(self) -> tuple[list[slots.Slot], dict[str, bytes]]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        except OSError as exc:
            raise SinkError(f"{self.name}: cannot read {self.path}: {exc.strerror}") from None
        try:
            keys = {e.identity: e.key for e in self.format.parse(data)}
        except FormatError as exc:
            log.warning("%s: ignoring unreadable %s (%s); rewriting it", self.name, self.path, exc)
            keys = {}
        try:
            known = slots.loads(self._state_file.read_bytes())
        except FileNotFoundError:
            known = []
        except (OSError, ValueError) as exc:
            log.warning("%s: ignoring damaged bookkeeping (%s)", self.name, exc)
            known = []
        if self.format.single_key and len(known) == 1:
            # The file stores no identity: its one key belongs to the one slot.
            keys = {known[0].identity: next(iter(keys.values()))} if keys else {}
        return [s for s in known if s.identity in keys], keys

    def _store(self, new: list[slots.Slot], keys: dict[str, bytes]) -> bool:
        """Write file and bookkeeping; return whether the file content changed."""
        new = [s for s in new if s.identity in keys]
        if not new:
            filler, filler_key = slots.placeholder()
            new, keys = [filler], {**keys, filler.identity: filler_key}
        try:
            data = self.format.render(slots.entries(new, keys))
        except FormatError as exc:
            raise SinkError(f"{self.name}: refusing to write {self.path}: {exc}") from None
        try:
            old = self.path.read_bytes()
        except OSError:
            old = None
        try:
            if old != data:
                write_secret_file(self.path, data)
            write_secret_file(self._state_file, slots.dumps(new))
        except OSError as exc:
            raise SinkError(f"{self.name}: cannot write {self.path}: {exc.strerror}") from None
        self._next_expiry = slots.next_expiry(new)
        return old != data

    def _install_sync(self, link: str, identity: str, epoch: int, key: bytes) -> bool:
        known, keys = self._load()
        new = slots.after_install(known, link, identity, epoch, self.clock(), self.grace)
        keys[identity] = key
        return self._store(new, keys)

    def _erase_sync(self, link: str) -> tuple[bool, list[Entry]]:
        """Drop the link's entries; return whether the file changed and what left it."""
        known, keys = self._load()
        if not self.path.exists():
            return self._store([], keys), []
        kept = slots.after_erase(known, link, self.clock())
        return self._store(kept, keys), slots.removed(known, kept, keys)

    def _expire_sync(self) -> tuple[bool, list[Entry]]:
        known, keys = self._load()
        kept = slots.expire(known, self.clock())
        if kept == known:
            self._next_expiry = slots.next_expiry(known)
            return False, []
        return self._store(kept, keys), slots.removed(known, kept, keys)

    def _refresh_expiry(self) -> None:
        self._next_expiry = slots.next_expiry(self._load()[0])

    def _holds(self, link: str, identity: str, key: bytes) -> bool:
        known, keys = self._load()
        current = slots.current_slot(known, link)
        if current is None or current.identity != identity:
            return False
        return hmac.compare_digest(keys.get(identity, b""), key)

    def current_key(self, link: Link) -> bytes | None:
        """The link's current key as written in the file (for tests and read-back)."""
        known, keys = self._load()
        current = slots.current_slot(known, link.name)
        return None if current is None else keys.get(current.identity)

    # -- Sink API ---------------------------------------------------------------------------

    async def install(self, link: Link, secret: Secret, meta: KeyMeta) -> None:
        identity = self.identity_for(link, meta)
        try:
            self.format.check_identity(identity)
            self.format.check_key(secret.reveal())
        except FormatError as exc:
            raise SinkError(f"{self.name}: refusing to write {self.path}: {exc}") from None
        async with self._lock:
            key = secret.reveal()
            await trio.to_thread.run_sync(self._install_sync, link.name, identity, meta.epoch, key)
            await self._reload_and_confirm(identity, secret)
        log.info(
            "%s: installed link %s epoch %d as identity %r",
            self.name,
            link.name,
            meta.epoch,
            identity,
        )

    async def verify(self, link: Link, secret: Secret, meta: KeyMeta) -> bool | None:
        identity = self.identity_for(link, meta)
        held = await trio.to_thread.run_sync(self._holds, link.name, identity, secret.reveal())
        if not held or self.probe_target is None:
            return held
        result = await self._probe_once(identity, secret, self.confirm_timeout)
        return result.ok

    async def erase(self, link: Link, reason: str) -> None:
        async with self._lock:
            changed, removed = await trio.to_thread.run_sync(self._erase_sync, link.name)
            if changed:
                await self._reload_and_confirm(None, None, removed=removed, consumer_optional=True)
        log.info("%s: erased link %s (%s)", self.name, link.name, reason)

    async def expire(self) -> bool:
        """Drop previous identities whose grace period ended; reload if the file changed."""
        async with self._lock:
            changed, removed = await trio.to_thread.run_sync(self._expire_sync)
            if changed:
                await self._reload_and_confirm(None, None, removed=removed, consumer_optional=True)
        return changed

    def next_expiry(self) -> float | None:
        """Wall-clock time of the next grace expiry, if any (cached; no I/O)."""
        return self._next_expiry

    # -- reload and confirmation ------------------------------------------------------------

    async def _reload_and_confirm(
        self,
        identity: str | None,
        secret: Secret | None,
        *,
        removed: list[Entry] | None = None,
        consumer_optional: bool = False,
    ) -> None:
        """Reload, then confirm: the log line, the new key accepted, removed keys refused."""
        deadline = trio.current_time() + self.confirm_timeout
        log_pos = await trio.to_thread.run_sync(reload.log_offset, self.log_watch)
        if self.pid_file is not None:
            assert self.reload_signal is not None
            if consumer_optional and not await trio.to_thread.run_sync(self._consumer_running):
                # Nothing runs: the consumer reads the (safe) file when it starts.
                return
            await reload.send_signal(self.pid_file, self.reload_signal)
        elif self.reload_command is not None:
            await reload.run_command(self.reload_command, deadline)
        if self.log_watch is not None and (self.pid_file or self.reload_command):
            await reload.wait_for_log(self.log_watch, log_pos, deadline)
        if self.probe_target is None:
            return
        if identity is not None and secret is not None:
            await self._confirm_probe(identity, secret, max(deadline, trio.current_time() + 0.5))
        for entry in removed or ():
            await self._confirm_refused(entry, max(deadline, trio.current_time() + 0.5))

    def _consumer_running(self) -> bool:
        assert self.pid_file is not None
        try:
            return reload.process_alive(reload.read_pid(self.pid_file))
        except SinkError:
            return False

    async def _probe_once(
        self, identity: str, secret: Secret, socket_timeout: float
    ) -> probe.ProbeResult:
        """One handshake in a worker thread (not cancellable; bounded by `socket_timeout`)."""
        assert self.probe_target is not None
        host, port = self.probe_target
        return await trio.to_thread.run_sync(
            lambda: probe.handshake(
                host,
                port,
                identity,
                secret,
                tls=self.probe_tls,
                ciphers=self.probe_ciphers,
                timeout=socket_timeout,
            )
        )

    async def _poll_probe(
        self,
        identity: str,
        secret: Secret,
        deadline: float,
        until: Callable[[probe.ProbeResult], bool],
    ) -> tuple[probe.ProbeResult, bool]:
        """Repeat the handshake until `until(result)` or `deadline` (a reload takes 10-85 ms).

        Returns the last result and whether any handshake completed.
        """
        delay, completed = 0.005, False
        while True:
            remaining = deadline - trio.current_time()
            result = await self._probe_once(identity, secret, max(min(remaining, 2.0), 0.1))
            completed = completed or result.ok
            if until(result) or trio.current_time() + delay >= deadline:
                return result, completed
            await trio.sleep(delay)
            delay = min(delay * 1.5, 0.02)  # keep polling the reload closely

    async def _confirm_probe(self, identity: str, secret: Secret, deadline: float) -> None:
        result, _ = await self._poll_probe(identity, secret, deadline, lambda r: r.ok)
        if not result.ok:
            raise SinkError(
                f"{self.name}: consumer at {self._target_text} did not accept the new key for "
                f"identity {identity!r} within {self.confirm_timeout:g} s: {result.detail}"
            )

    async def _confirm_refused(self, entry: Entry, deadline: float) -> None:
        """Fail unless the consumer refuses a removed identity/key with a TLS alert.

        Only an alert proves the refusal: a refused connect (stunnel re-binding), a reset or a
        timeout proves nothing, so those are retried until `deadline`.
        """
        secret = Secret(entry.key)
        try:
            result, completed = await self._poll_probe(
                entry.identity, secret, deadline, lambda r: r.alert
            )
        finally:
            secret.wipe()
        if result.alert:
            return
        if completed:
            raise SinkError(
                f"{self.name}: consumer at {self._target_text} still accepts the removed "
                f"identity {entry.identity!r} {self.confirm_timeout:g} s after the reload"
            )
        raise SinkError(
            f"{self.name}: could not confirm that the consumer at {self._target_text} refuses "
            f"the removed identity {entry.identity!r}: {result.detail}"
        )

    @property
    def _target_text(self) -> str:
        assert self.probe_target is not None
        host, port = self.probe_target
        return f"{host}:{port}"
