"""Fuzz target for everything the TLS-PSK plugin reads back from disk that another program or a
person may have written: the PSK file in each format, the slot bookkeeping, the consumer's pid
file and the consumer's log, which the reload confirmation scans.

`target(data)` feeds the bytes to one of them (the first byte picks which). A parser may only
refuse with its own error (`FormatError`, `ValueError` for the slots, `SinkError` for the pid
file); the log scan may not fail at all, and must reach the verdict that the verdict-line rule,
applied plainly line by line, finds (the scan reads in 64-byte pieces here, so the pieces'
edges, long lines and partial last lines are all exercised). Run it standalone:

    python3 plugins/qkdagent-tlspsk/fuzz/fuzz_tlspsk_files.py [seconds]
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from qkdagent_tlspsk import reload, slots
from qkdagent_tlspsk.formats import FORMATS, FormatError

from qkdagent import SinkError
from qkdagent.testing import mutation_loop, selecting_target

_DIR = tempfile.TemporaryDirectory(prefix="fuzz-tlspsk-")  # removed at exit
_FILE = Path(_DIR.name) / "input"
_WATCH = reload.LogWatch(_FILE, "Configuration successful", "Configuration failed")
_PIECE = 64


def _format(name: str) -> Callable[[bytes], object]:
    return FORMATS[name].parse


def _pid(data: bytes) -> None:
    _FILE.write_bytes(data)
    pid = reload.read_pid(_FILE)
    assert 1 < pid < 2**22


def _says(line: bytes, needle: bytes) -> bool:
    """The rule again, written plainly: after the first `LOGn[...]: ` the rest is the needle;
    without one, the line is the needle or ends with ": " and it."""
    line = line.rstrip(b"\r")
    for at in range(len(line)):
        if (
            line.startswith(b"LOG", at)
            and line[at + 3 : at + 4] in b"01234567"
            and (line[at + 4 : at + 5] == b"[")
        ):
            close = line.find(b"]", at + 5)
            if close >= 0 and line[close : close + 3] == b"]: ":
                return line[close + 3 :] == needle
    return line == needle or line.endswith(b": " + needle)


def _expected(data: bytes) -> bool | None:
    """The first verdict line among the complete lines a read can hold whole."""
    for line in data.split(b"\n")[:-1]:  # the last piece has no newline yet
        if len(line) + 1 > _PIECE:
            continue  # its start or its end is out of sight of one read: never judged
        for needle, verdict in ((_WATCH.failure, False), (_WATCH.success, True)):
            if _says(line, needle.encode()):
                return verdict
    return None


def _scan_all(pos: reload.LogPosition, size: int) -> tuple[bool | None, reload.LogPosition]:
    verdict = None
    for _ in range(size + 2):
        verdict, after = reload._scan(_WATCH, pos)
        assert after.offset >= pos.offset, "a scan never moves back"
        if verdict is not None or (after.offset == pos.offset and pos.file is not None):
            return verdict, after
        pos = after
    raise AssertionError("the scan did not settle")


def _log(data: bytes) -> None:
    """Written in two parts with scans between, so a line read partly is read again."""
    saved = reload.SCAN_CHUNK
    reload.SCAN_CHUNK = _PIECE
    try:
        _FILE.write_bytes(data[: len(data) // 2])
        verdict, pos = _scan_all(reload.LogPosition(None, 0), len(data))
        if verdict is None:
            with _FILE.open("ab") as fh:
                fh.write(data[len(data) // 2 :])
            verdict, pos = _scan_all(pos, len(data))
    finally:
        reload.SCAN_CHUNK = saved
    assert verdict is _expected(data), (verdict, _expected(data))
    if verdict is None:  # every complete line read, and no more than a read's worth beyond
        assert data.rfind(b"\n") + 1 <= pos.offset <= len(data)
        assert len(data) - pos.offset < _PIECE


PARSERS: tuple[Callable[[bytes], object], ...] = (
    *(_format(name) for name in sorted(FORMATS)),
    slots.loads,
    _pid,
    _log,
)
REFUSALS = (*((FormatError,) for _ in FORMATS), (ValueError,), (SinkError,), ())

_KEY = "ab" * 32
_STUNNEL_LOG = (
    b"2026.12.05 22:04:34 LOG5[ui]: Reading configuration from file /etc/stunnel.conf\n"
    + b"2026.12.05 22:04:34 LOG5[7]: Service [srv] accepted connection from 127.0.0.1:4\n" * 3
    + b"2026.12.05 22:04:34 LOG5[ui]: Configuration successful\n"
    + b"2026.12.05 22:04:35 LOG3[ui]: Configuration failed\n"
)
SEEDS = (  # the first byte picks the parser: the formats in name order, then the rest
    b"\x00" + f"6463312d646332:{_KEY}\n".encode(),  # gnutls (hex identity)
    b"\x01" + f"dc1-dc2.7:{_KEY}\n# note\n\n".encode(),  # nghttpx
    b"\x02" + f"dc1-dc2.7:{{HEX}}{_KEY}\n".encode(),  # nginx-patch
    b"\x03" + _KEY.encode(),  # openssl
    b"\x04" + f"dc1-dc2.7:{_KEY}\ndc1-dc2.6:{_KEY}\n".encode(),  # stunnel
    b"\x05"
    + slots.dumps([slots.Slot("dc1-dc2.7", "dc1-dc2", 7, None), slots.Slot("x", "l", 6, 1.5)]),
    b"\x05" + b"[" * 5000,
    b"\x0612345\n",
    b"\x07" + _STUNNEL_LOG,
    b"\x07" + b"x" * 200 + b"Configuration failed" + b"y" * 100,
)


target = selecting_target(PARSERS, REFUSALS)


def main(seconds: float) -> None:
    mutation_loop(target, SEEDS, seconds, selectors=len(PARSERS))


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 10.0)
