"""The file sink's spares (`fileutil.write_via_spare`): empty files made ahead in each
directory the sink writes, and the replaced files its installs still hold.

An atomic write on ext4 spends most of its time creating the new file and freeing the old
one. Through a spare, with the old file held open, an install does neither: the sink's task
closes the held files (which frees them) at its next pass, between rotations, and makes the
next spares on its thread, after the installs it makes durable. `SparePool` is the
bookkeeping, on the event loop; `do_work` and `discard` are the file work, on that thread.

Bounds: `SPARES_PER_DIRECTORY` open spares in at most `MAX_DIRECTORIES` directories, and at
most `MAX_HELD` replaced files held; past them an install writes as before. A held file is
a previous key, unlinked, that only this process can reach: the task closes it within the
sink's `SYNC_DELAY`, and an erase closes every one first.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..fileutil import Spare, create_spare, discard_spare, remove_stale_spares

SPARES_PER_DIRECTORY = 2
MAX_DIRECTORIES = 64
MAX_HELD = 256


@dataclass
class Work:
    """What the task's thread does next: make `wanted[d]` spares in each directory `d`
    (removing an earlier run's from the directories in `first` before)."""

    wanted: dict[Path, int] = field(default_factory=dict)
    first: set[Path] = field(default_factory=set)


class SparePool:
    def __init__(self) -> None:
        self._spares: dict[Path, list[Spare]] = {}
        self._dirs: set[Path] = set()
        """Directories given spares (at most MAX_DIRECTORIES)."""
        self._wanted: set[Path] = set()
        self._cleaned: set[Path] = set()
        """Directories whose leftover spares were removed (once per run)."""
        self._held: list[int] = []

    def take(self, directory: Path) -> Spare | None:
        """A spare for the next write in `directory`, if one is ready. Either way, the
        directory gets spares at the next `work` (within the bounds)."""
        if directory not in self._dirs and len(self._dirs) < MAX_DIRECTORIES:
            self._dirs.add(directory)
        if directory in self._dirs:
            self._wanted.add(directory)
        spares = self._spares.get(directory)
        if not spares or len(self._held) >= MAX_HELD:
            return None
        return spares.pop()

    def put_back(self, directory: Path, spare: Spare) -> None:
        """A spare taken and not used (its write was cancelled before it started)."""
        self._spares.setdefault(directory, []).append(spare)

    def hold(self, fd: int) -> None:
        """A replaced file, held until the next `work` closes it."""
        self._held.append(fd)

    def has_work(self) -> bool:
        """Whether a directory wants spares."""
        return bool(self._wanted)

    def work(self) -> Work:
        """Hand the pending work to the task (which must run `do_work` with it, then `add`)."""
        work = Work()
        for directory in self._wanted:
            missing = SPARES_PER_DIRECTORY - len(self._spares.get(directory, ()))
            if missing > 0:
                work.wanted[directory] = missing
            if directory not in self._cleaned:
                self._cleaned.add(directory)
                work.first.add(directory)
        self._wanted = set()
        return work

    def add(self, made: dict[Path, list[Spare]]) -> None:
        for directory, spares in made.items():
            self._spares.setdefault(directory, []).extend(spares)

    def release(self) -> list[int]:
        """Every held file, to close now, before any await (the task's pass; an erase: no
        earlier key stays reachable)."""
        held, self._held = self._held, []
        return held

    def drain(self) -> list[Spare]:
        """Every spare, to remove (the task is stopping)."""
        spares = [spare for pool in self._spares.values() for spare in pool]
        self._spares = {}
        self._wanted = set()
        return spares


def do_work(work: Work) -> dict[Path, list[Spare]]:
    """Make the wanted spares (a directory that refuses one gets no more this time: its
    installs write as before)."""
    made: dict[Path, list[Spare]] = {}
    for directory, count in work.wanted.items():
        if directory in work.first:
            remove_stale_spares(directory)
        for _ in range(count):
            try:
                made.setdefault(directory, []).append(create_spare(directory))
            except OSError:
                break
    return made


def close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def discard(spares: list[Spare]) -> None:
    for spare in spares:
        discard_spare(spare)
