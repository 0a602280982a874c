"""Atomic, private file writes for secrets and state."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_secret_file(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600) -> None:
    """Write `data` to `path` atomically with `mode` (default 0600).

    The temp file is created 0600 in the same directory, fsynced, renamed over the target and the
    directory fsynced, so a reader sees the old or the new content, never a mix, and the bytes are
    never readable by others even for an instant.
    """
    target = Path(path)
    directory = target.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, target)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
