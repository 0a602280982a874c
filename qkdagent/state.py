"""Durable per-link state in an embedded SQLite database (`state_dir/state.db`, mode 0600).

Everything a side needs to converge after a crash is written (fsync'd) before any sink is touched:
the committed epoch with its chain/auth keys and sink outputs, a pending epoch with the exact reply
that was sent for it, and every key ID the link has used. (The responder's commit of a pending
epoch is the one write that is not fsync'd on its own: its keys are on disk with the pending
epoch, and the protocol commits it again after a power loss; see `StateStore.run`.) The methods are
blocking; the agent calls them through `StateStore.run`: on the event loop while commits are
fast, else on a worker thread (`inline.loop_gate`), one caller at a time.

`secure_delete` zeroes freed pages so overwritten chain keys do not linger in the database file.
It does not reach the write-ahead log, which keeps every older page image until a checkpoint:
so `wal_checkpoint(TRUNCATE)` moves the new pages into the database (overwriting the old ones)
and empties the log within `SCRUB_DELAY` of every commit (sooner, once commits pause: see
`settle.Settle`). The agent runs that as a background task (`scrub_log`), so no caller waits for
the checkpoint's fsyncs and a burst of commits shares one, and then starts the emptied log with
a commit of a counter (no key), so the next rotation's commit does not also pay the log
header's fsync, over a log already as long as the next commits need (zeros written into the
emptied file, so they overwrite blocks in place: an fdatasync that extends a file also commits
the filesystem's journal, 0.35 against 0.22 ms on ext4 here); inline stores (virtual-clock
tests) checkpoint right after each commit. The filesystem and storage below may still keep old
blocks, which no user-space program can rule out (see README, "Security properties and
limits").
"""

from __future__ import annotations

import errno
import json
import math
import os
import sqlite3
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import trio

from .errors import KeyReuseError
from .fileutil import FileCheckError, private_dir
from .inline import DISK, InlineGate, loop_gate
from .secret import Secret
from .settle import Settle

T = TypeVar("T")
SCRUB_DELAY = 0.2
"""Seconds from a commit to the checkpoint that removes the keys it superseded from every
state file, at most (commits within it share the checkpoint)."""
SCRUB_QUIET = 0.02
"""The checkpoint comes sooner once the store has had no commit for this long: between
rotations rather than in the middle of the next one (it holds the writer for its fsyncs)."""
SCRUB_MIN_GAP = 0.1
"""...but no sooner than this after the previous checkpoint, so steady traffic shares them."""
ALONE_AFTER = 0.01
"""Seconds after the last batch ended from which a write may commit at once, alone: a lone
rotation's commits are further apart; a busy store's go through the lock, where they group.
A write that needs no fsync may also go at once when the only batch in this time held one
write: the responder's commit, a few milliseconds after its pending epoch."""
PAGE_SIZE = 1024
"""Page size of a new state file. A rotation's commit changes a few hundred bytes in each of
four to seven pages, written to the log and fsynced whole: at 1 KiB instead of SQLite's
4 KiB a durable commit took 0.22-0.26 ms instead of 0.27-0.32 ms on this VM's ext4
(`store_pending` and `commit` alone, alternating), and there are two on every rotation's path
(issue 18)."""
WAL_PAD_MIN = 16 * 1024
WAL_PAD_MAX = 256 * 1024
"""Bytes of zeros the checkpoint writes into the emptied log for the next commits to overwrite:
the log the commits since the previous checkpoint wrote, within these bounds (off the path)."""
WAL_HEADER = 32
WAL_FRAME_HEADER = 24
"""Bytes of SQLite's log header and of each frame's header (https://sqlite.org/fileformat.html)."""
USED_KEY_ID_RETENTION = 100_000
"""Used key IDs remembered per link, at least, by default (`[agent] used_key_ids_kept`); older
ones are pruned (sources delete them anyway)."""
USED_KEY_ID_PRUNE = 64
"""...every this many IDs marked, not on every commit (a statement less on most of them): at
most this many more are kept."""
USED_KEY_ID_PRUNE_MAX = 1024
"""Most IDs one prune deletes, oldest first (with `secure_delete`, 23 ms on this VM's ext4): after
the retention is lowered, a link catches up over its next rotations instead of one commit
deleting up to the old retention's worth (at 100,000, seconds of a blocked store). A commit
marks at most `protocol.MAX_SOURCES` (16) IDs, so a prune always deletes more than was marked
since the last."""
RECENT_USED_IDS = 4096
"""Used key IDs, of every link, the store also keeps in memory (the newest; read back at
start): one that another link used is refused. The table's primary key is per link, so a key
source handing one key to two links (a KME that ignores the SAE it was asked for, a module
giving two destinations one key stream) had it used on both (review finding)."""
USED_KEY_ID_ROW = (34.0, 3.5, 2.4, 2.4)
"""Bytes a used key ID takes in the state file: a constant, and per character of the link's
name, the source's id and the key ID (the row, its primary key and the sequence index).
Measured on 100,000-row tables (a 10-character link, source `kme`, UUID key IDs: 162 bytes);
`used_ids_footprint` estimates from it."""
USED_KEY_ID_REUSE = 1.1
"""...times this once pruning has begun: pages freed by the prune are reused less tightly than
a first fill packs them (7-10% more, measured over five turnovers)."""
UUID_LENGTH = 36
"""Characters of the key IDs most sources hand out (ETSI 014 and 004 KMEs: UUIDs)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS links (
    name TEXT PRIMARY KEY,
    peer TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    chain_key BLOB NOT NULL,
    auth_key BLOB NOT NULL,
    key_ids TEXT NOT NULL,
    committed_at REAL
);
CREATE TABLE IF NOT EXISTS outputs (
    link TEXT NOT NULL,
    label TEXT NOT NULL,
    secret BLOB NOT NULL,
    PRIMARY KEY (link, label)
);
CREATE TABLE IF NOT EXISTS pending (
    link TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL,
    kind TEXT NOT NULL,
    request_digest BLOB NOT NULL,
    key_ids TEXT NOT NULL,
    chain_key BLOB NOT NULL,
    auth_key BLOB NOT NULL,
    confirm_key BLOB NOT NULL,
    transcript_hash BLOB NOT NULL,
    outputs TEXT NOT NULL,
    reply BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS used_key_ids (
    link TEXT NOT NULL,
    source TEXT NOT NULL,
    key_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (link, source, key_id)
);
CREATE INDEX IF NOT EXISTS used_key_ids_seq ON used_key_ids (link, seq);
CREATE TABLE IF NOT EXISTS source_state (
    link TEXT NOT NULL,
    source TEXT NOT NULL,
    state BLOB NOT NULL,
    PRIMARY KEY (link, source)
);
CREATE TABLE IF NOT EXISTS wal_warm (
    id INTEGER PRIMARY KEY,
    n INTEGER NOT NULL
);
DROP TABLE IF EXISTS wal_pad;  -- the padding of earlier versions (zeroed: secure_delete)
CREATE TABLE IF NOT EXISTS pending_source_state (
    link TEXT NOT NULL,
    source TEXT NOT NULL,
    state BLOB NOT NULL,
    PRIMARY KEY (link, source)
);
"""


@dataclass
class Pending:
    """A responder's derived-but-uncommitted epoch, with the reply it sent for it."""

    epoch: int
    kind: str
    request_digest: bytes
    key_ids: tuple[tuple[str, str], ...]
    chain_key: Secret
    auth_key: Secret
    confirm_key: Secret
    transcript_hash: bytes
    outputs: dict[str, Secret]
    reply: bytes
    created_at: float
    source_state: dict[str, bytes] = field(default_factory=dict, repr=False)
    """Exchange sources' per-link state for this epoch, committed with it (a KEM private
    key, say: never in a repr)."""


@dataclass
class LinkRecord:
    name: str
    peer: str
    epoch: int
    chain_key: Secret
    auth_key: Secret
    key_ids: tuple[tuple[str, str], ...]
    committed_at: float | None
    outputs: dict[str, Secret] = field(default_factory=dict)
    pending: Pending | None = None
    source_state: dict[str, bytes] = field(default_factory=dict, repr=False)
    """Exchange sources' per-link state (DESIGN v2 §3), as of the committed epoch (may hold
    private keys: never in a repr)."""


def _ids_json(key_ids: tuple[tuple[str, str], ...]) -> str:
    return json.dumps([list(pair) for pair in key_ids])


def _ids_load(text: str) -> tuple[tuple[str, str], ...]:
    return tuple((s, k) for s, k in json.loads(text))


def _outputs_json(outputs: dict[str, Secret]) -> str:
    return json.dumps({label: s.reveal().hex() for label, s in outputs.items()})


def _outputs_load(text: str) -> dict[str, Secret]:
    return {label: Secret(bytes.fromhex(v)) for label, v in json.loads(text).items()}


class StateStore:
    """One SQLite connection used from a single worker thread at a time."""

    def __init__(
        self,
        state_dir: Path,
        *,
        threaded: bool = True,
        keep_used_ids: int = USED_KEY_ID_RETENTION,
    ) -> None:
        self.state_dir = state_dir
        self.keep_used_ids = keep_used_ids
        """Used key IDs remembered per link, at least (`[agent] used_key_ids_kept`)."""
        # A symlinked state_dir or state.db never gets its target chmod-ed (see private_dir).
        private_dir(state_dir, create=True)
        path = state_dir / "state.db"
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise FileCheckError(f"state file {path} is a symbolic link") from None
            raise FileCheckError(f"cannot open state file {path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FileCheckError(f"state file {path} is not a regular file")
            if stat.S_IMODE(st.st_mode) != 0o600:
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        self.path = path
        self._wal = state_dir / "state.db-wal"
        # timeout=0: another owner is reported at once, not after SQLite's 5 s busy wait
        self._db = sqlite3.connect(path, timeout=0, check_same_thread=False, isolation_level=None)
        try:
            # One process owns the state: the exclusive lock, taken at the first access and
            # held until close, keeps a second agent off this state_dir (it would reuse key
            # IDs) and spares each transaction its lock calls and the WAL its shared memory.
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
            # Set before the file has content (an existing file keeps its own): a commit
            # writes and fsyncs whole pages, each of a few hundred bytes of change.
            self._db.execute(f"PRAGMA page_size={PAGE_SIZE}")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._sync_full = True
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.executescript(_SCHEMA)
            self._page_size = int(self._db.execute("PRAGMA page_size").fetchone()[0])
        except sqlite3.OperationalError as exc:
            self._db.close()
            if "locked" in str(exc):
                raise FileCheckError(
                    f"state file {path} is in use by another process (another agent with the "
                    "same state_dir?)"
                ) from None
            raise FileCheckError(f"cannot use state file {path}: {exc}") from None
        self._recent_ids: OrderedDict[tuple[str, str], str] = OrderedDict(
            ((source, key_id), link)
            for link, source, key_id in self._db.execute(
                "SELECT link, source, key_id FROM used_key_ids ORDER BY rowid DESC LIMIT ?",
                (RECENT_USED_IDS,),
            ).fetchall()[::-1]
        )
        """(source, key ID) -> the link that used it, the newest `RECENT_USED_IDS` last."""
        self._threaded = threaded
        self.gate: InlineGate | None = None
        """Where commits run: on the loop while they are fast (no thread hop), else threads;
        None: the running loop's shared gate for calls that fsync."""
        self._batch_lock = trio.Lock()
        self._queue: list[_Job] = []
        self._last_batch = -math.inf
        """When the last batch was written (`time.monotonic`: trio's clock starts anew with
        each run)."""
        self._batch_before = -math.inf
        """When the batch before that one was written."""
        self._last_size = 0
        """How many writes the last batch held."""
        self._scrub = Settle(bound=SCRUB_DELAY, quiet=SCRUB_QUIET, min_gap=SCRUB_MIN_GAP)

    @property
    def threaded(self) -> bool:
        """Whether writes run on a worker thread (and `scrub_log` should run beside them)."""
        return self._threaded

    async def run(self, fn: Callable[..., T], *args: object, durable: bool = True) -> T:
        """Run a blocking store method with group commit, on the event loop while commits are
        fast (`inline.loop_gate`: a thread hop cost more than the commit), else on a thread.

        A call with nothing under way or queued, `ALONE_AFTER` or more after the last batch
        (or, needing no fsync, after only a batch of one write: `_alone`), commits at once (no
        schedule point: a cancel point only). Other calls take the lock (a schedule point,
        where callers runnable at the same time queue up too); calls that arrive while a batch
        is being written are queued, and the next one to get the lock runs the whole queue in
        one transaction (each call in its own savepoint, so one failing call changes nothing
        and the others still commit) with a single fsync. A call returns only after the
        transaction holding its writes is durable.

        `durable=False` is for a write whose loss the protocol recovers from (the responder's
        commit of a pending epoch that is itself durable: see `Responder._commit`). A batch of
        only such writes commits without an fsync (`synchronous=NORMAL`): it survives a crash
        of the process, as the operating system holds the log, but not a power loss before
        the next fsync, which the next durable commit or the checkpoint (`scrub_log`, within
        `SCRUB_DELAY`) makes. A batch with any durable write is durable whole.

        Unthreaded (virtual-clock tests only) it runs inline: a worker thread would let trio's
        autojump clock leap ahead while SQLite writes.
        """
        if not self._threaded:
            await trio.lowlevel.checkpoint()
            return fn(*args)
        job = _Job(fn, args, durable)
        gate = self.gate or loop_gate(DISK)
        if (
            self._alone(durable)
            and not self._queue
            and not self._batch_lock.locked()
            and gate.inline()
        ):
            # A write after a quiet spell, with nothing under way: at once, without the pass
            # of the loop that taking the lock costs. A write soon after another (a busy
            # store; tasks runnable together, as a batch of peer requests) takes the lock
            # and yields, so that the others queue up and share its commit.
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                gate.run_here(partial(self._run_batch, [job]))
            finally:
                self._written(1)
            self._scrub.changed()
            return job.outcome()
        self._queue.append(job)
        try:
            await self._batch_lock.acquire()
        except trio.Cancelled:
            if any(queued is job for queued in self._queue):
                # No batch has taken it: it must not commit later behind the caller's back
                # (its caller believes it never happened).
                self._queue = [queued for queued in self._queue if queued is not job]
                raise
            # A batch took it and runs whole: the caller learns its outcome like that of any
            # write already under way (the cancellation reaches it at its next checkpoint).
            with trio.CancelScope(shield=True):
                await self._batch_lock.acquire()
        try:
            if not job.done:
                # The batch holds other callers' writes: once taken it runs whole, whatever
                # happens to this caller.
                with trio.CancelScope(shield=True):
                    batch, self._queue = self._queue, []
                    run = partial(self._run_batch, batch)
                    try:
                        if gate.inline():
                            # taking the lock was this caller's schedule point: no second
                            # pass of the loop after the commit (`gate.run` yields after one that
                            # blocked the loop)
                            gate.run_here(run)
                        else:
                            await gate.run(run)
                    finally:
                        self._written(len(batch))
                    self._scrub.changed()
        finally:
            self._batch_lock.release()
        return job.outcome()

    def _alone(self, durable: bool) -> bool:
        """Whether a write now is no part of a burst, so that the pass of the loop that would
        gather others into its commit is waste: no batch in the last `ALONE_AFTER`; or, for a
        write that needs no fsync (the gathering's gain is mostly a shared fsync), only one
        batch, of one write, in it (on every rotation's path, a responder commits its pending
        epoch a few milliseconds after storing it). So at most two writes in `ALONE_AFTER` go
        alone: a burst's third takes the lock."""
        now = time.monotonic()
        if now - self._last_batch >= ALONE_AFTER:
            return True
        return not durable and self._last_size == 1 and now - self._batch_before >= ALONE_AFTER

    def _written(self, size: int) -> None:
        self._batch_before, self._last_batch = self._last_batch, time.monotonic()
        self._last_size = size

    async def scrub_log(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Background task for a threaded store: checkpoint the log within `SCRUB_DELAY` of
        each commit. Cancel it before `close()` (which checkpoints one last time)."""
        task_status.started()
        while True:
            await self._scrub.due()
            async with self._batch_lock:  # the connection is used by one thread at a time
                # off every rotation's path: on a thread, where a stalled fsync blocks nothing
                await trio.to_thread.run_sync(self._checkpoint_and_warm)
            self._scrub.ran()

    def _synchronous(self, full: bool) -> None:
        """Whether commits fsync the log (FULL) or leave it to the next one that does (NORMAL).
        Set outside any transaction. FULL is restored after every lowered write, and checked
        again before every batch that must be durable, so no such batch follows a lowered
        setting that could not be restored."""
        if full != self._sync_full:
            self._db.execute("PRAGMA synchronous=FULL" if full else "PRAGMA synchronous=NORMAL")
            self._sync_full = full

    def _restore_full(self) -> None:
        try:
            self._synchronous(True)
        except sqlite3.Error:
            pass  # the next durable batch sets it before it begins, or fails

    def _run_batch(self, batch: list[_Job]) -> None:
        try:
            self._synchronous(any(job.durable for job in batch))
            self._db.execute("BEGIN IMMEDIATE")
            for job in batch:
                try:
                    job.result = job.fn(*job.args)
                except Exception as exc:  # delivered to that job's caller only
                    job.error = exc
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            for job in batch:
                job.error = job.error or exc
        finally:
            self._restore_full()
            for job in batch:
                job.done = True

    def _checkpoint(self) -> bool:
        """Empty the write-ahead log so superseded keys do not outlive their commit there;
        whether it was emptied.

        The data is durable already (COMMIT fsync'd the log); a failed checkpoint only leaves
        old page images in the log until the next one that succeeds, so it is not an error for
        callers.
        """
        try:
            row = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error:
            return False
        return row is not None and tuple(row) == (0, 0, 0)

    def _checkpoint_passive(self) -> int:
        """Copy the log into the database, leaving the file as it is; returns how many pages
        (frames) the log held (a TRUNCATE checkpoint reports none: it counts after emptying
        the log)."""
        try:
            row = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            return 0
        return max(0, int(row[1])) if row else 0

    def _checkpoint_and_warm(self) -> None:
        """Checkpoint, lay down keyless log for the next commits, and start it with a commit
        that holds no key.

        After the checkpoint empties the log (the superseded keys leave it), zeros as long as
        the log the commits since the last one wrote, and the counter's frame
        (`WAL_PAD_MIN`..`WAL_PAD_MAX`), are written into the empty file and synced: the next
        commit starts the log over at its beginning, so the rotations' commits overwrite
        blocks in place instead of extending the file. That commit is the counter's: the
        first commit of a log writes and fsyncs its header before its own frames, a second
        fsync that would otherwise fall on the next rotation's path.

        The counter's commit runs with `synchronous=NORMAL`: nothing waits for it, and the next
        commit's fsync covers its frame. Under the batch lock, so no other write sees the
        lowered setting or the log while the zeros go in.
        """
        # what the log took since the last checkpoint, its header, frame headers and the
        # counter's frame included: as much again from the start does not extend the file
        frames = self._checkpoint_passive()
        written = WAL_HEADER + (frames + 1) * (WAL_FRAME_HEADER + self._page_size)
        if not self._checkpoint():
            return  # the log still holds frames: the next checkpoint tries again
        try:
            _zero_empty_log(self._wal, min(max(written, WAL_PAD_MIN), WAL_PAD_MAX))
        except OSError:
            pass  # the next commits extend the log instead: slower, no less safe
        try:
            self._synchronous(False)
            self._write(
                "INSERT INTO wal_warm VALUES (1, 1) ON CONFLICT (id) DO UPDATE SET n = n + 1", ()
            )
        except sqlite3.Error:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        finally:
            self._restore_full()

    def _write(self, sql: str, args: tuple[object, ...]) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute(sql, args)
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._checkpoint()
        self._db.close()

    # -- reads -------------------------------------------------------------------------------

    def load(self, name: str) -> LinkRecord | None:
        row = self._db.execute(
            "SELECT peer, epoch, chain_key, auth_key, key_ids, committed_at "
            "FROM links WHERE name = ?",
            (name,),
        ).fetchone()
        if row is None:
            return None
        record = LinkRecord(
            name,
            row[0],
            row[1],
            Secret(row[2]),
            Secret(row[3]),
            _ids_load(row[4]),
            row[5],
        )
        record.outputs = {
            label: Secret(secret)
            for label, secret in self._db.execute(
                "SELECT label, secret FROM outputs WHERE link = ?", (name,)
            )
        }
        record.pending = self._load_pending(name)
        record.source_state = self._load_source_state("source_state", name)
        if record.pending is not None:
            record.pending.source_state = self._load_source_state("pending_source_state", name)
        return record

    def _load_source_state(self, table: str, name: str) -> dict[str, bytes]:
        rows = self._db.execute(
            f"SELECT source, state FROM {table} WHERE link = ?",  # noqa: S608 - fixed names
            (name,),
        )
        return {source: bytes(state) for source, state in rows}

    def _write_source_state(self, table: str, name: str, states: dict[str, bytes]) -> None:
        self._db.execute(f"DELETE FROM {table} WHERE link = ?", (name,))  # noqa: S608
        for source, state in states.items():
            self._db.execute(
                f"INSERT INTO {table} VALUES (?, ?, ?)",  # noqa: S608
                (name, source, state),
            )

    def set_source_state(self, name: str, source: str, state: bytes | None) -> None:
        """Replace (None: delete) one entry of the link's committed source state, on its own
        (a foreign link's durable marks; a rotation's commit replaces the whole state)."""
        with self._tx():
            self._db.execute(
                "DELETE FROM source_state WHERE link = ? AND source = ?", (name, source)
            )
            if state is not None:
                self._db.execute("INSERT INTO source_state VALUES (?, ?, ?)", (name, source, state))

    def _load_pending(self, name: str) -> Pending | None:
        row = self._db.execute(
            "SELECT epoch, kind, request_digest, key_ids, chain_key, auth_key, confirm_key, "
            "transcript_hash, outputs, reply, created_at FROM pending WHERE link = ?",
            (name,),
        ).fetchone()
        if row is None:
            return None
        return Pending(
            row[0],
            row[1],
            row[2],
            _ids_load(row[3]),
            Secret(row[4]),
            Secret(row[5]),
            Secret(row[6]),
            row[7],
            _outputs_load(row[8]),
            row[9],
            row[10],
        )

    def is_used(self, name: str, source: str, key_id: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM used_key_ids WHERE link = ? AND source = ? AND key_id = ?",
            (name, source, key_id),
        ).fetchone()
        return row is not None

    # -- writes (each one transaction, durable on return) -----------------------------------

    def create(self, name: str, peer: str, chain_key: Secret, auth_key: Secret) -> LinkRecord:
        """Start a link at epoch 0 (no committed secret yet), replacing any older state."""
        with self._tx():
            self._reset(name, peer, chain_key, auth_key)
        record = self.load(name)
        assert record is not None
        return record

    def _reset(self, name: str, peer: str, chain_key: Secret, auth_key: Secret) -> None:
        self._db.execute("DELETE FROM outputs WHERE link = ?", (name,))
        self._db.execute("DELETE FROM pending WHERE link = ?", (name,))
        self._write_source_state("source_state", name, {})
        self._write_source_state("pending_source_state", name, {})
        self._db.execute(
            "INSERT OR REPLACE INTO links VALUES (?, ?, 0, ?, ?, '[]', NULL)",
            (name, peer, chain_key.reveal(), auth_key.reveal()),
        )

    def _mark_used(self, name: str, key_ids: tuple[tuple[str, str], ...]) -> None:
        """Record the key IDs as used; `KeyReuseError` if one was, on this link (the primary
        key refuses it: the caller's transaction or savepoint then rolls back whatever was
        inserted) or lately on another (`RECENT_USED_IDS`)."""
        recent = self._recent_ids
        for pair in key_ids:
            owner = recent.get(pair)
            if owner is not None and owner != name:
                raise KeyReuseError(
                    f"key ID {pair[1]!r} of source {pair[0]!r} was used by another link"
                )
        seq = self._db.execute(
            "SELECT COALESCE(MAX(seq), 0) FROM used_key_ids WHERE link = ?", (name,)
        ).fetchone()[0]
        for offset, (source, key_id) in enumerate(key_ids, start=1):
            try:
                self._db.execute(
                    "INSERT INTO used_key_ids VALUES (?, ?, ?, ?)",
                    (name, source, key_id, seq + offset),
                )
            except sqlite3.IntegrityError as exc:
                if exc.sqlite_errorname != "SQLITE_CONSTRAINT_PRIMARYKEY":
                    raise
                raise KeyReuseError(
                    f"key ID {key_id!r} of source {source!r} was already used"
                ) from None
        for pair in key_ids:  # (kept if the transaction then fails: the ID was handed out)
            recent[pair] = name
            recent.move_to_end(pair)
        while len(recent) > RECENT_USED_IDS:
            recent.popitem(last=False)
        last = seq + len(key_ids)
        if seq // USED_KEY_ID_PRUNE != last // USED_KEY_ID_PRUNE:
            self._delete_oldest_ids(name, USED_KEY_ID_PRUNE_MAX, through=last - self.keep_used_ids)

    def store_pending(self, name: str, pending: Pending, *, mark_used: bool) -> None:
        """Durably keep a responder's derived epoch (and its key IDs as used) before replying."""
        with self._tx():
            if mark_used:
                self._mark_used(name, pending.key_ids)
            self._db.execute(
                "INSERT OR REPLACE INTO pending VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    pending.epoch,
                    pending.kind,
                    pending.request_digest,
                    _ids_json(pending.key_ids),
                    pending.chain_key.reveal(),
                    pending.auth_key.reveal(),
                    pending.confirm_key.reveal(),
                    pending.transcript_hash,
                    _outputs_json(pending.outputs),
                    pending.reply,
                    pending.created_at,
                ),
            )
            self._write_source_state("pending_source_state", name, pending.source_state)

    def commit(
        self,
        name: str,
        *,
        epoch: int,
        chain_key: Secret,
        auth_key: Secret,
        key_ids: tuple[tuple[str, str], ...],
        outputs: dict[str, Secret],
        committed_at: float | None = None,
        mark_used: bool = False,
        source_state: dict[str, bytes] | None = None,
    ) -> LinkRecord:
        """Make `epoch` current, overwriting the previous chain key, outputs and source state
        (`source_state` replaces the link's whole source state; None or {} clears it).

        With `mark_used`, the key IDs are recorded as used in the same transaction (and the
        commit is refused, changing nothing, if any was used before). Returns the new record.
        """
        committed_at = committed_at if committed_at is not None else time.time()
        with self._tx():
            if mark_used:
                self._mark_used(name, key_ids)
            cur = self._db.execute(
                "UPDATE links SET epoch = ?, chain_key = ?, auth_key = ?, key_ids = ?, "
                "committed_at = ? WHERE name = ?",
                (
                    epoch,
                    chain_key.reveal(),
                    auth_key.reveal(),
                    _ids_json(key_ids),
                    committed_at,
                    name,
                ),
            )
            if cur.rowcount != 1:
                raise KeyError(f"link {name!r} has no state")
            self._db.execute("DELETE FROM outputs WHERE link = ?", (name,))
            for label, secret in outputs.items():
                self._db.execute(
                    "INSERT INTO outputs VALUES (?, ?, ?)", (name, label, secret.reveal())
                )
            self._db.execute("DELETE FROM pending WHERE link = ?", (name,))
            self._write_source_state("pending_source_state", name, {})
            states = source_state or {}
            self._write_source_state("source_state", name, states)
            peer = self._db.execute("SELECT peer FROM links WHERE name = ?", (name,)).fetchone()[0]
        return LinkRecord(
            name, peer, epoch, chain_key, auth_key, key_ids, committed_at, dict(outputs),
            source_state=dict(states),
        )  # fmt: skip

    def forget_used_ids(self, name: str, limit: int) -> int:
        """Delete up to `limit` of a removed link's used key IDs, oldest first; how many went.
        A link's `drop` with all of them in one transaction held the store (and, on the event
        loop, every link) for 0.5 s at 100,000 IDs on this VM: its remover calls this until
        fewer than `limit` go, each call a transaction of its own, then drops the rest."""
        return self._delete_oldest_ids(name, limit)

    def _delete_oldest_ids(self, name: str, limit: int, *, through: int | None = None) -> int:
        """Delete up to `limit` of the link's used key IDs, oldest first (those numbered up to
        `through` only, if given); how many went."""
        bound = "" if through is None else " AND seq <= ?"
        cursor = self._db.execute(
            "DELETE FROM used_key_ids WHERE rowid IN (SELECT rowid FROM used_key_ids "  # noqa: S608
            f"WHERE link = ?{bound} ORDER BY seq LIMIT ?)",
            (name, limit) if through is None else (name, through, limit),
        )
        return int(cursor.rowcount)

    def drop(self, name: str) -> None:
        with self._tx():
            for table in (
                "outputs",
                "pending",
                "used_key_ids",
                "source_state",
                "pending_source_state",
            ):
                self._db.execute(f"DELETE FROM {table} WHERE link = ?", (name,))  # noqa: S608
            self._db.execute("DELETE FROM links WHERE name = ?", (name,))

    def _tx(self) -> _Transaction:
        return _Transaction(self._db, self._checkpoint)


def used_ids_footprint(links: Iterable[tuple[str, Sequence[str]]], keep: int) -> int:
    """Bytes the used key IDs of `links` (each a name and its sources' ids) take in the state
    file once each link remembers `keep` of them and prunes: the table grows until then, and
    little after (pruning frees pages for reuse; the file does not shrink). Key IDs assumed
    UUIDs; longer ones take more."""
    base, per_link, per_source, per_key = USED_KEY_ID_ROW
    total = 0.0
    for name, sources in links:
        source = sum(len(s) for s in sources) / len(sources) if sources else 0.0
        row = base + per_link * len(name) + per_source * source + per_key * UUID_LENGTH
        total += row * (keep + USED_KEY_ID_PRUNE)
    return int(total * USED_KEY_ID_REUSE)


def used_ids_room_warning(need: int, free: int, held: int, keep: int) -> str | None:
    """What to tell the operator when the used key IDs (`need` bytes, `used_ids_footprint`)
    would take more than half of the room the state has (`free` bytes on its filesystem plus
    the `held` bytes of its file): the table grows to that size over the links' first `keep`
    key IDs (139 days at the default, with one source), and a full disk fails every link
    closed."""
    room = free + held
    if 2 * need <= room:
        return None
    return (
        f"the links' used key IDs will take about {_size(need)} of state (each link remembers "
        f"its last {keep:,}: [agent] used_key_ids_kept), against {_size(room)} of room for it "
        "(free space and the state file): lower used_key_ids_kept or give state_dir more room"
    )


def _size(count: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 1000:.1f} kB"


def _zero_empty_log(path: Path, size: int) -> None:
    """Write `size` zero bytes into the write-ahead log at `path` and sync them, if it is empty.

    Only an empty log (just truncated by a complete checkpoint, under the batch lock) is
    touched: SQLite reads a log whose header is not a log header (zeros never are) as holding
    no frames, so a crash at any point of this leaves the database as the checkpoint left it,
    and the file never holds an old page image. SQLite writes its next header and frames over
    the zeros, from the start, as it would over an empty file."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size != 0:
            return
        os.pwrite(fd, bytes(size), 0)
        os.fdatasync(fd)
    finally:
        os.close(fd)


class _Transaction:
    """A transaction, or a savepoint when one is already open (inside a group commit)."""

    def __init__(self, db: sqlite3.Connection, after_commit: Callable[[], object]) -> None:
        self.db = db
        self.after_commit = after_commit
        self.nested = False

    def __enter__(self) -> None:
        self.nested = self.db.in_transaction
        self.db.execute("SAVEPOINT op" if self.nested else "BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.nested:
            if exc_type is not None:
                self.db.execute("ROLLBACK TO op")
            self.db.execute("RELEASE op")
        elif exc_type is None:
            self.db.execute("COMMIT")
            self.after_commit()
        else:
            self.db.execute("ROLLBACK")


@dataclass
class _Job:
    fn: Callable[..., Any]
    args: tuple[object, ...]
    durable: bool = True
    """Whether the caller needs the write on disk when it returns (see `StateStore.run`)."""
    done: bool = False
    result: Any = None
    error: BaseException | None = None

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result
