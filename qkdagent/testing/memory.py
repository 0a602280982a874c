"""The simulated link and the recording sink live in `qkdagent.builtin`; re-exported here."""

from __future__ import annotations

from ..builtin.keydir import KeyDirSource
from ..builtin.memory import MemoryPool, MemorySource
from ..builtin.recording import InstallRecord, RecordingSink

__all__ = ["InstallRecord", "KeyDirSource", "MemoryPool", "MemorySource", "RecordingSink"]
