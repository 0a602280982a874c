"""The config file: `load_config` (bytes on disk) and `parse_config(tomllib.loads(text))`.

Any input must give a config or a ConfigError; a file tomllib refuses (whatever it raises:
TOMLDecodeError, RecursionError for deep nesting, ValueError for a huge integer) must be a
ConfigError from `load_config`.

Run: python3 contrib/fuzz/run_fuzz.py --target config
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import tomllib
from pathlib import Path

from hypothesis import strategies as st

from qkdagent.config import load_config, parse_config
from qkdagent.errors import ConfigError
from qkdagent.testing import config_toml, pair_configs

FORMAT = "toml"
_SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None
_DIR = Path(tempfile.mkdtemp(prefix="qkdfuzz-config-", dir=_SHM))
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)
CONFIG = _DIR / "agent.toml"
_CONFIG_FD = os.open(CONFIG, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
"""Rewritten in place for each input: creating a file per input costs more than parsing it."""


def _seeds() -> list[bytes]:
    sinks = {"out": {"type": "file", "path": str(_DIR / "out.key"), "label": "wg0"}}
    configs = pair_configs(_DIR, alice={"sinks": sinks}, bob={"sinks": sinks})
    full = config_toml(configs["alice"])
    extra = configs["bob"]
    extra["agent"].update(
        drain_timeout=5, rotation_timeout=20, max_parallel_rotations=8, log_format="json"
    )
    extra["links"]["alice-bob"].update(role="responder", jitter=0.2, backoff_min=2)
    examples = Path(__file__).resolve().parents[1] / "config"
    seeds = [full.encode(), config_toml(extra).encode()]
    seeds += [p.read_bytes() for p in sorted(examples.glob("*.toml"))]
    seeds += [
        b"a = " + b"[" * 5000,  # tomllib recurses per level: RecursionError
        b"a = " + b"{a=" * 3000 + b"1" + b"}" * 3000,
        b"[agent]\nname = " + b"1" * 5000 + b"\n",  # int() beyond 4300 digits: ValueError
        b"[agent]\ndrain_timeout = 1e400\n",
        b"\xff\xfe[agent]",
    ]
    return seeds


SEEDS = _seeds()
DICTIONARY = [
    b"[agent]",
    b"[agent.tls]",
    b"[links.x]",
    b"[sinks.s]",
    b"[sources.m]",
    b'type = "file"',
    b'bootstrap = { env = "HOME" }',
    b'peer_url = "https://[::1]:0"',
    b'listen = "127.0.0.1:99999"',
    b"interval = 0",
    b"reject_after = -1",
]

_keys = st.sampled_from(
    ["agent", "name", "listen", "tls", "links", "sinks", "sources", "peer", "peer_url",
     "bootstrap", "interval", "reject_after", "type", "label", "file", "env", "x"]
)  # fmt: skip
_values = st.recursive(
    st.one_of(
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(max_size=40),
        st.datetimes().map(lambda d: d.isoformat()),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=4)),
    max_leaves=25,
)


@st.composite
def _mutated_seed(draw: st.DrawFn) -> bytes:
    """A seed config with one dotted key set to an arbitrary value, as TOML text."""
    base = draw(st.sampled_from(SEEDS[:2])).decode()
    section = draw(st.sampled_from(["agent", "agent.tls", "links.alice-bob", "sinks.out"]))
    key = draw(_keys)
    value = draw(_values)
    from engine import _toml_value  # the mutation engine's TOML writer

    line = f"{key} = {_toml_value(value)}\n"
    marker = f"[{section}]\n"
    text = base.replace(marker, marker + line, 1) if marker in base else base + line
    return text.encode("utf-8", "surrogatepass")


STRATEGY = st.one_of(_mutated_seed(), st.binary(max_size=300))


def target(data: bytes) -> None:
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except Exception:
        document = None
    if document is None:
        os.ftruncate(_CONFIG_FD, 0)
        os.pwrite(_CONFIG_FD, data, 0)
        try:
            load_config(CONFIG)
        except ConfigError:
            return
        raise AssertionError("load_config accepted a file that tomllib refuses")
    try:
        parse_config(document, file=CONFIG)
    except ConfigError:
        pass
