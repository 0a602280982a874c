"""Secret references (`Options.secret`): `{file}`, `{env}` and `{credential}` tables holding any
value, over referenced content of any bytes, in every encoding, with and without `size = 32`.
Only ConfigError may come out, and an accepted secret has the asked size.

An input is a JSON object: `ref` (the reference table, as written in the config), `content`
(the referenced bytes, one character per byte), `encoding` (index into ENCODINGS) and `size`.
File paths are kept inside a scratch directory, where `fifo`, `zero` (a link to /dev/zero),
`dir`, `loop` (a symlink loop) and `big` (a 64 MiB sparse file) stand for the special files an
operator could name: none may be accepted as a secret, block or be read without bound.

Run: python3 contrib/fuzz/run_fuzz.py --target secret_ref
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from qkdagent import options as options_module
from qkdagent.errors import ConfigError
from qkdagent.options import Options
from qkdagent.secret import Secret

FORMAT = "json"
ENCODINGS = ("base64", "hex", "raw", "text")
ENV = "QKDFUZZ_SECRET"
SPECIAL = ("fifo", "zero", "dir", "loop", "big")
SLOW = 0.25
"""Seconds a special file may take before it counts as blocking or an unbounded read."""

_SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None
_DIR = Path(tempfile.mkdtemp(prefix="qkdfuzz-secret-", dir=_SHM))
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)
_CREDS = _DIR / "creds"
_CREDS.mkdir()
os.mkfifo(_DIR / "fifo", 0o600)
os.symlink("/dev/zero", _DIR / "zero")
(_DIR / "dir").mkdir()
os.symlink("loop", _DIR / "loop")
with open(_DIR / "big", "wb") as _big:
    _big.truncate(64 << 20)
_FDS = {
    name: os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    for name, path in (("secret", _DIR / "secret"), ("cred", _CREDS / "cred"))
}
_found: set[str] = set()
"""Special files that already gave a finding: later inputs naming them read `secret` instead,
so one slow finding is not repeated a hundred thousand times."""

KEY = os.urandom(32)
SEEDS = [
    json.dumps({"ref": ref, "content": content, "encoding": enc, "size": True}).encode()
    for ref, content, enc in [
        ({"file": "secret"}, KEY.hex(), 1),
        ({"file": "secret"}, __import__("base64").b64encode(KEY).decode() + "\n", 0),
        ({"file": "secret"}, KEY.decode("latin-1"), 2),
        ({"env": ENV}, KEY.hex(), 1),
        ({"credential": "cred"}, KEY.hex(), 1),
        ({"file": "fifo"}, KEY.hex(), 1),
        ({"file": "zero"}, "", 2),
        ({"file": "dir"}, "", 0),
        ({"file": "loop"}, "", 0),
        ({"file": "big"}, "", 2),
        ({"file": "secret", "env": ENV}, "", 0),
        ({"file": "secret\u0000x"}, "", 0),
        ({"env": ENV}, "\udcff\x00", 3),
    ]
]
DICTIONARY = [b'"file"', b'"env"', b'"credential"', b'"fifo"', b'"zero"', b'"../"', b'"/"']
_refs = st.one_of(
    st.fixed_dictionaries({}, optional={k: st.text(max_size=20) for k in ("file", "env")}),
    st.dictionaries(st.sampled_from(["file", "env", "credential", "x"]), st.text(), max_size=2),
    st.fixed_dictionaries({"file": st.sampled_from(["secret", *SPECIAL])}),
    st.fixed_dictionaries({"credential": st.sampled_from(["cred", "", ".", "..", "a/b"])}),
)
STRATEGY = st.builds(
    lambda ref, content, enc, size: json.dumps(
        {"ref": ref, "content": content, "encoding": enc, "size": size}
    ).encode(),
    _refs,
    st.one_of(st.binary(max_size=80).map(lambda b: b.decode("latin-1")), st.just(KEY.hex())),
    st.integers(0, 3),
    st.booleans(),
)


def _content(value: Any) -> bytes:
    if not isinstance(value, str):
        return json.dumps(value).encode()
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")


def _confine(path: str) -> str:
    """Keep a fuzzed path inside the scratch directory (the fuzzer must not read the machine)."""
    parts = [p for p in path.split("/") if p not in ("", ".", "..")]
    if parts and parts[0].startswith("~"):
        parts[0] = "home" + parts[0]
    if parts and parts[0] in _found:
        parts[0] = "secret"
    return "/".join(parts)


def _in_toml(value: Any) -> bool:
    """Whether a config file could hold the value (TOML strings have no lone surrogates)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _write(name: str, data: bytes) -> None:
    fd = _FDS[name]
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def target(data: bytes) -> None:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return  # not an input of this harness
    if not isinstance(doc, dict):
        return
    ref = doc.get("ref")
    if not _in_toml(ref):
        return  # not an input a config file can express
    content = _content(doc.get("content", ""))
    encoding = doc.get("encoding")
    encoding = ENCODINGS[encoding % 4] if type(encoding) is int else "base64"
    size = 32 if doc.get("size", True) else None
    _write("secret", content)
    _write("cred", content)
    os.chmod(_DIR / "secret", 0o644 if doc.get("open") else 0o600)
    if b"\0" in content:
        os.environb.pop(ENV.encode(), None)
    else:
        os.environb[ENV.encode()] = content
    getattr(options_module, "_taken_env", {}).clear()  # a reload cache, when there is one
    special = None
    if isinstance(ref, dict) and isinstance(ref.get("file"), str):
        ref = {**ref, "file": _confine(ref["file"])}
        special = next((s for s in SPECIAL if ref["file"].split("/")[0] == s), None)
    os.environ["CREDENTIALS_DIRECTORY"] = str(_CREDS)
    opts = Options({"bootstrap": ref}, where="links.x", file=str(_DIR / "a.toml"), base_dir=_DIR)
    if special is None:
        _check(opts, encoding, size)
    else:
        _probe(special, opts, encoding, size)


def _check(opts: Options, encoding: str, size: int | None) -> Secret | None:
    try:
        secret = opts.secret("bootstrap", encoding=encoding, size=size)
    except ConfigError:
        return None
    assert isinstance(secret, Secret), f"secret() returned {type(secret).__name__}"
    assert size is None or len(secret) == size, "an accepted secret has the wrong size"
    return secret


def _probe(special: str, opts: Options, encoding: str, size: int | None) -> None:
    """Read a special file with a memory cap, and a writer on the FIFO that goes away late."""
    writer = None
    if special == "fifo":
        writer = os.open(_DIR / "fifo", os.O_RDWR | os.O_NONBLOCK)  # never blocks on Linux
        os.write(writer, KEY.hex().encode())
        timer = threading.Timer(SLOW * 2, os.close, (writer,))
        timer.start()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    in_use = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    cap = in_use + (256 << 20)
    if hard == resource.RLIM_INFINITY or cap < hard:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    start = time.perf_counter()
    try:
        secret = _check(opts, encoding, size)
    except MemoryError:
        _found.add(special)
        raise
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        if writer is not None:
            timer.cancel()
            timer.join()
            try:
                os.close(writer)
            except OSError:
                pass  # the timer closed it
    elapsed = time.perf_counter() - start
    if secret is not None and special != "big":
        _found.add(special)
        raise AssertionError(f"a {special} was accepted as a secret file")
    if elapsed > SLOW:
        _found.add(special)
        raise AssertionError(f"reading a {special} took {elapsed:.2f} s (blocking or unbounded)")
