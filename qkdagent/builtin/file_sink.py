"""Built-in sink `file`: the link's secret in a file, written atomically with mode 0600.

`format = "base64"` without a trailing newline is the format quPSKd writes and `wg set ...
preshared-key FILE` reads; `hex` suits stunnel-style tools, `raw` the bytes as they are.
A relative `path` resolves against the config file's directory. The directory must exist,
unless `create_dirs = true`: then the missing directories are created with mode 0700 (at
start-up, or at the first install for a path templated with `{link}`/`{peer}`), as quPSKd does
for its key folder.

Durability: the agent's state store is the durable record of the key (committed before any
install), and at start-up every sink is rewritten from it (the current key, or erased), so a
rotation's file need not be on disk before the rotation ends. While the sink's task runs, an
install renames the file into place and returns (on the event loop while that is fast: a
thread hop cost more than the write); the task fsyncs the files and their directory once
installs pause, within SYNC_DELAY, off the rotation's path (a failure is logged). An erase
(fail-closed) is durable before it returns, as is every write made while the task is not
running. While the task runs, an install also writes into a spare made ahead and holds the
file it replaces for the task to close (`file_spares`): creating and freeing files is most
of an atomic write's cost.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import trio

from ..errors import Misconfigured, SinkError
from ..fileutil import (
    Spare,
    sync_directory,
    sync_written,
    write_secret_file,
    write_via_spare,
)
from ..hookspecs import hookimpl
from ..inline import CACHE, loop_gate
from ..interfaces import KeyMeta, Link, PluginContext, Sink
from ..options import Options, check_template
from ..secret import Secret
from ..settle import Settle
from . import file_spares

FORMATS = ("base64", "hex", "raw")
SYNC_DELAY = 1.0
"""Seconds from an install to its fsync, at most: installs within it share one."""
SYNC_QUIET = 0.02
"""...sooner once installs have paused this long (between rotations, not in the next one)."""
FINAL_SYNC_TIMEOUT = 10.0
"""Seconds the task, when cancelled, may spend making the last installs durable."""

log = logging.getLogger("qkdagent.sink")


def encode(secret: bytes, fmt: str, newline: bool) -> bytes:
    if fmt == "raw":
        return secret
    text = base64.b64encode(secret) if fmt == "base64" else secret.hex().encode()
    return text + (b"\n" if newline else b"")


def decode(data: bytes, fmt: str) -> bytes | None:
    if fmt == "raw":
        return data
    try:
        text = data.strip()
        return (
            base64.b64decode(text, validate=True)
            if fmt == "base64"
            else bytes.fromhex(text.decode())
        )
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None


def make_private_dirs(directory: Path) -> None:
    """Create `directory` and any missing parents with mode 0700 (whatever the umask); the
    directories that already exist are left as they are."""
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:  # created meanwhile by someone else: leave it alone
            continue
        os.chmod(path, 0o700)


class FileSink(Sink):
    type_name = "file"

    def __init__(self, name: str, options: Options, context: PluginContext) -> None:
        super().__init__(name, options, context)
        self.path_template = str(options.path("path"))
        self.format = options.string("format", "base64", choices=FORMATS)
        self.newline = options.boolean("newline", False)
        if self.format == "raw" and self.newline:
            options.fail("newline", 'cannot be used with format = "raw"')
        self.on_erase = options.string("on_erase", "random", choices=("random", "remove"))
        problem = check_template(self.path_template, ("link", "peer"))
        if problem:
            options.fail("path", problem)
        self.create_dirs = options.boolean("create_dirs", False)
        self._unsynced: dict[Path, int] = {}
        """Files renamed into place whose fsync the task still owes, with their install's
        number (a file installed again while being synced stays owed)."""
        self._installs = 0
        self._owed = Settle(bound=SYNC_DELAY, quiet=SYNC_QUIET, min_gap=SYNC_QUIET)
        self._syncing = False
        """Whether the task runs: only then may an install leave its fsync to it."""
        self._spares = file_spares.SparePool()
        self._templated_dir = "{" in str(Path(self.path_template).parent)

    def path(self, link: Link) -> Path:
        return Path(self.path_template.format(link=link.name, peer=link.peer))

    async def prepare(self) -> None:
        directory = Path(self.path_template).parent
        if "{" in str(directory):
            return
        if self.create_dirs:
            await self._make_dirs(directory)
        if not directory.is_dir():
            raise Misconfigured(f"sink {self.name!r}: directory {directory} does not exist")
        if not os.access(directory, os.W_OK):
            raise Misconfigured(f"sink {self.name!r}: directory {directory} is not writable")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Make installed files durable just after their install (see the module docstring)."""
        self._syncing = True
        try:
            task_status.started()
            while True:
                await self._owed.due()
                await self._sync_unsynced()
                self._owed.ran()
        finally:
            self._syncing = False
            with trio.move_on_after(FINAL_SYNC_TIMEOUT, shield=True):
                await self._sync_unsynced(final=True)

    async def _sync_unsynced(self, *, final: bool = False) -> None:
        """One pass: the files installs replaced closed (here, with no await between taking
        and closing them, so an erase never finds them in between), then in one thread call,
        off the rotation's path (a stalled fsync blocks nothing there): the installed files
        made durable and the next spares made (`final`: every spare removed instead).
        Shielded: what the thread opens is registered, never lost to a cancellation. The
        final pass opens nothing, so the task's FINAL_SYNC_TIMEOUT may leave it running."""
        file_spares.close_all(self._spares.release())
        owed = dict(self._unsynced)
        spares = self._spares.drain() if final else []
        work = self._spares.work() if not final and self._spares.has_work() else None
        if not owed and work is None and not spares:
            return
        if final:
            # Makes nothing to register, so it may be left to finish on its own: a stalled
            # fsync does not hold up the agent's stop past FINAL_SYNC_TIMEOUT.
            try:
                _, error = await trio.to_thread.run_sync(
                    _task_pass, list(owed), None, spares, abandon_on_cancel=True
                )
            except trio.Cancelled:
                log.warning(
                    "sink %s: the last installed key files were not made durable within %g s "
                    "(left to the system; the agent rewrites them from its state at start-up)",
                    self.name,
                    FINAL_SYNC_TIMEOUT,
                )
                raise
        else:
            with trio.CancelScope(shield=True):
                made, error = await trio.to_thread.run_sync(_task_pass, list(owed), work, spares)
                self._spares.add(made)
        if error is not None:
            log.warning(
                "sink %s: installed key files are in place but could not be made durable: %s "
                "(the agent rewrites them from its state at start-up)",
                self.name,
                error.strerror or type(error).__name__,
            )
        for path, number in owed.items():  # done with, well or not (a failure is not retried)
            if self._unsynced.get(path) == number:
                del self._unsynced[path]

    async def install(self, link: Link, secret: Secret, meta: KeyMeta) -> None:
        deferred = self._syncing
        path = await self._write(
            link, encode(secret.reveal(), self.format, self.newline), durable=not deferred
        )
        if not deferred:
            return
        if not self._syncing:  # the task stopped while we wrote: nobody is left to owe it to
            await self._sync_now(path)
            return
        self._installs += 1
        self._unsynced.pop(path, None)  # re-inserted last: the dict keeps install order
        self._unsynced[path] = self._installs
        self._owed.changed()

    async def _sync_now(self, path: Path) -> None:
        try:
            await trio.to_thread.run_sync(sync_written, [path])
        except OSError as exc:
            raise SinkError(f"sink {self.name!r}: cannot sync {path}: {exc.strerror}") from None

    async def _make_dirs(self, directory: Path) -> None:
        try:
            await trio.to_thread.run_sync(make_private_dirs, directory)
        except OSError as exc:
            raise Misconfigured(
                f"sink {self.name!r}: cannot create directory {directory}: {exc.strerror}"
            ) from None

    async def _write(self, link: Link, data: bytes, *, durable: bool) -> Path:
        path = self.path(link)
        if self.create_dirs and "{" in str(Path(self.path_template).parent):
            try:
                await trio.to_thread.run_sync(make_private_dirs, path.parent)
            except OSError as exc:
                message = f"sink {self.name!r}: cannot create {path.parent}: {exc.strerror}"
                raise SinkError(message) from None
        write = partial(write_secret_file, path, data, durable=durable)
        try:
            if durable:
                await trio.to_thread.run_sync(write)
            elif not await self._write_via_spare(path, data):
                await loop_gate(CACHE).run(write)
        except OSError as exc:
            raise SinkError(f"sink {self.name!r}: cannot write {path}: {exc.strerror}") from None
        return path

    async def _write_via_spare(self, path: Path, data: bytes) -> bool:
        """Write through a spare, if the task runs, the directory is not templated (no
        spares are left in a directory a link of its own may lose) and a spare is ready;
        False: write as before (none ready, or it failed: the spare is gone then)."""
        if not self._syncing or self._templated_dir:
            return False
        spare = self._spares.take(path.parent)
        if spare is None:
            return False
        write = _Once(partial(write_via_spare, spare, path, data))
        try:
            await loop_gate(CACHE).run(write)
        except OSError as exc:
            log.debug("sink %s: write through a spare failed (%s)", self.name, exc.strerror)
            return False
        except BaseException:  # cancelled: before the write (the spare is unused) or after it
            if not write.started:
                if self._syncing:
                    self._spares.put_back(path.parent, spare)
                else:  # the task's last pass is over: nobody would remove it
                    file_spares.discard([spare])
            self._keep(write.result)
            raise
        self._keep(write.result)
        return True

    def _keep(self, held: int | None) -> None:
        """A replaced file, for the task to close; closed now if the task has stopped."""
        if held is None:
            return
        if self._syncing:
            self._spares.hold(held)
        else:
            file_spares.close_all([held])

    async def verify(self, link: Link, secret: Secret, meta: KeyMeta) -> bool | None:
        try:
            data = await trio.Path(self.path(link)).read_bytes()
        except OSError:
            return False
        held = decode(data, self.format)
        return held is not None and Secret(held) == secret

    async def erase(self, link: Link, reason: str) -> None:
        """Fail closed, durably: the old key is gone from the file before this returns, and
        no file an install replaced is held any more."""
        file_spares.close_all(self._spares.release())  # here: no await between the two
        if self.on_erase == "remove":
            path = self.path(link)
            try:
                await trio.to_thread.run_sync(_remove_durably, path)
            except OSError as exc:
                raise SinkError(f"sink {self.name!r}: cannot remove: {exc.strerror}") from None
            return
        data = encode(Secret.random(32).reveal(), self.format, self.newline)
        await self._write(link, data, durable=True)


class _Once:
    """A call run by the event loop's gate, telling afterwards whether it started and what
    it returned, even when the caller was cancelled around it."""

    def __init__(self, call: Callable[[], int | None]) -> None:
        self.call = call
        self.started = False
        self.result: int | None = None

    def __call__(self) -> None:
        self.started = True
        self.result = self.call()


def _task_pass(
    owed: list[Path], work: file_spares.Work | None, spares: list[Spare]
) -> tuple[dict[Path, list[Spare]], OSError | None]:
    """The sink task's file work (see `FileSink._sync_unsynced`): fsyncs first, then the
    next spares (`spares`: to remove). Returns the spares made and the fsyncs' error."""
    error = None
    if owed:
        try:
            sync_written(owed)
        except OSError as exc:
            error = exc
    made = file_spares.do_work(work) if work is not None else {}
    file_spares.discard(spares)
    return made, error


def _remove_durably(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        return
    sync_directory(path.parent)


@hookimpl
def qkdagent_register_sinks(register: Callable[[type[Sink]], None]) -> None:
    register(FileSink)
