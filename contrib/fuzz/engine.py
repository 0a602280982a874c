"""Fuzzing engine for the `fuzz_*.py` targets: seed mutation for volume, hypothesis for structure.

A target module defines `target(data: bytes) -> None` (feeds the bytes to one parser and catches
that parser's typed error: any other exception is a crash), `SEEDS: list[bytes]` and optionally
`STRATEGY` (a hypothesis strategy of bytes), `FORMAT` ("json" or "toml": the seeds' syntax, for
structure-aware mutations) and `DICTIONARY` (byte tokens worth inserting).

Hypothesis alone runs a few hundred inputs a second, too few for a million per target, so most
inputs come from a plain-Python mutation loop (byte flips, insertions, truncation, splicing,
and mutations of the decoded JSON/TOML tree: deep nesting, huge numbers, control characters,
lone surrogates, wrong types, missing, unknown and duplicate keys). Hypothesis examples run
first; what they generate joins the corpus the loop mutates.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
import tomllib
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
MAX_CRASHES_KEPT = 20
"""Distinct crashes (by exception type and escaping frame) saved per target."""
CORPUS_LIMIT = 2000
MAX_INPUT = 1 << 20
"""Largest input generated: stacked growth mutations must not eat the machine's memory."""

_NEST = "\x00qkdfuzz-nest\x00"
_HUGE = "\x00qkdfuzz-huge\x00"
_DUPKEY = "\x00qkdfuzz-dup\x00"

INTERESTING_BYTES = b"\x00\x01\x7f\x80\xff\n\r\t \"'\\/[]{}:,=.-+0123456789eE"
COMMON_TOKENS = [
    b"[" * 5000,
    b"{" * 5000,
    b'{"a":' * 3000,
    b"1" * 5000,
    b"1e999999",
    b"-0",
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"null",
    b"true",
    b"\\u0000",
    b"\\ud800",
    b"\\udfff",
    b"\\u202e",
    b"\xc0\x80",
    b"\xed\xa0\x80",
    b"\xef\xbb\xbf",
    b"\xff\xfe",
    b"\x00",
    b"\x1b[2J",
    b"\r\n",
    b"9223372036854775808",
    b"4611686018427387904",
    b"18446744073709551616",
    b"0x10",
    b"1_000",
    b"1979-05-27T07:32:00Z",
    b"inf",
    b"nan",
    b'"""',
    b"'''",
    b"[[a]]",
    b"[a.b.c]",
    b"a.b.c = 1",
    b" = ",
]


def _interesting_values(rng: random.Random) -> Any:
    choices: list[Any] = [
        None,
        True,
        False,
        0,
        -1,
        1,
        2**31,
        2**53 + 1,
        2**62 - 1,
        2**62,
        2**63,
        -(2**63),
        2**64,
        10**300,
        1.5,
        -0.0,
        1e308,
        math.inf,
        -math.inf,
        math.nan,
        "",
        "x" * rng.choice((129, 257, 4097, 70000)),
        "\x00",
        "a\x00b",
        "\n\rINFO forged log line",
        "\u202e\u200b",
        "\ud800",
        "\udfff",
        "\x1b[31m",
        "../../etc/passwd",
        "~root",
        "é" * 200,
        [],
        {},
        [[]],
        {"": ""},
        [None] * 17,
        _NEST,
        _HUGE,
    ]
    return rng.choice(choices)


@dataclass
class Crash:
    kind: str
    where: str
    """Deepest frame in project code the exception passed through (where it escaped)."""
    raised_at: str
    data: bytes
    count: int = 1
    trace: str = ""


@dataclass
class Result:
    target: str
    inputs: int = 0
    hypothesis_inputs: int = 0
    crashes: int = 0
    distinct: dict[tuple[str, str], Crash] = field(default_factory=dict)
    slowest: float = 0.0
    slowest_data: bytes = b""
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0


class InputTimeout(BaseException):
    """One input ran longer than the per-input limit (a hang). Not an Exception, so a target's
    or parser's `except Exception` cannot swallow it."""


def load_target(path: Path) -> ModuleType:
    """Import a target module by path (contrib is not a package)."""
    import importlib.util

    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    name = f"qkdfuzz_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def discover(directory: Path = HERE) -> dict[str, Path]:
    return {p.stem.removeprefix("fuzz_"): p for p in sorted(directory.glob("fuzz_*.py"))}


# --- structure-aware mutation ---------------------------------------------------------------


def _decode(fmt: str | None, data: bytes) -> Any:
    try:
        if fmt == "json":
            return json.loads(data)
        if fmt == "toml":
            return tomllib.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    return None


def _paths(tree: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _paths(value, (*prefix, index))


def _get(tree: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        tree = tree[step]
    return tree


def _mutate_tree(rng: random.Random, tree: Any) -> Any:
    """Change one node of a decoded document; returns the new root."""
    paths = list(_paths(tree))
    path = rng.choice(paths)
    node = _get(tree, path)
    op = rng.randrange(9)
    if op == 0 and isinstance(node, dict) and node:  # remove a key
        del node[rng.choice(list(node))]
    elif op == 1 and isinstance(node, dict):  # add an unknown key, or duplicate one
        if node and rng.random() < 0.5:
            node[_DUPKEY] = _interesting_values(rng)
        else:
            node[rng.choice(("extra", "mac", "v", "kind", "", "\x00", "ÿ"))] = _interesting_values(
                rng
            )
    elif op == 2 and isinstance(node, list):  # grow or empty a list
        if node and len(node) < 2000 and rng.random() < 0.7:
            room = max(1, 200_000 // (len(repr(node[0])) + 1))  # at most ~200 kB more
            node.extend([node[0]] * min(room, rng.choice((1, 16, 17, 65, 1000))))
        else:
            node.clear()
    elif op == 3 and isinstance(node, str):  # corrupt a string
        node_new = _mutate_text(rng, node)
        tree = _set(tree, path, node_new)
    elif op == 4 and isinstance(node, (int, float)) and not isinstance(node, bool):
        tree = _set(tree, path, rng.choice((node + 1, node - 1, -node, node * 2**32, str(node))))
    elif op == 5 and path:  # swap in another node's value
        other = _get(tree, rng.choice(paths))
        tree = _set(tree, path, json.loads(json.dumps(other)) if other is not node else [other])
    else:
        tree = _set(tree, path, _interesting_values(rng))
    return tree


def _set(tree: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    _get(tree, path[:-1])[path[-1]] = value
    return tree


def _mutate_text(rng: random.Random, text: str) -> str:
    pos = rng.randrange(len(text) + 1)
    piece = rng.choice(("\x00", "\n", "\x1b", "\u202e", "\ud800", "'", '"', "\\", "é", "{", "%s"))
    op = rng.randrange(3)
    if op == 0:
        return text[:pos] + piece + text[pos:]
    if op == 1:
        return text[:pos]
    return (text * rng.choice((2, 50, 1000)))[:100_000]


def _nest_text(rng: random.Random, fmt: str) -> str:
    depth = rng.choice((10, 100, 999, 1000, 3000, 5000, 20000))
    if fmt == "toml":
        return rng.choice(("[" * depth + "]" * depth, "{a=" * depth + "1" + "}" * depth))
    return rng.choice(("[" * depth + "]" * depth, "[" * depth, '{"a":' * depth + "1" + "}" * depth))


def _huge_text(rng: random.Random, fmt: str) -> str:
    if fmt == "toml":
        return rng.choice(("1" * 5000, "1e999999", "-0", "0x" + "f" * 40, "9" * 30, "inf", "nan"))
    return rng.choice(("1" * 5000, "1e999999", "-0", "9" * 30, "NaN", "-Infinity", "1.0e-99999"))


def _toml_key(key: str) -> str:
    return json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
        )
    if value is None:
        return '""'
    return value.isoformat()  # dates and times


def _encode(rng: random.Random, fmt: str, tree: Any) -> bytes:
    if fmt == "toml":
        if isinstance(tree, dict):
            text = "".join(f"{_toml_key(k)} = {_toml_value(v)}\n" for k, v in tree.items())
        else:
            text = f"x = {_toml_value(tree)}\n"
    else:
        text = json.dumps(tree, ensure_ascii=rng.random() < 0.5, allow_nan=True)
    for marker, make in ((_NEST, _nest_text), (_HUGE, _huge_text)):
        encoded = json.dumps(marker)  # control characters are escaped whatever ensure_ascii
        while encoded in text:
            text = text.replace(encoded, make(rng, fmt), 1)
    encoded = json.dumps(_DUPKEY)
    if encoded in text:
        text = text.replace(encoded, json.dumps(rng.choice(("kind", "epoch", "v", "agent"))))
    return text.encode("utf-8", "surrogatepass")


# --- byte-level mutation --------------------------------------------------------------------


class Mutator:
    def __init__(
        self,
        rng: random.Random,
        corpus: list[bytes],
        fmt: str | None,
        dictionary: list[bytes],
    ) -> None:
        self.rng = rng
        self.corpus = [c for c in corpus if c] or [b"{}"]
        self.fmt = fmt
        self.tokens = list(dictionary) + COMMON_TOKENS
        self._trees: dict[bytes, Any] = {}

    def add(self, data: bytes) -> None:
        if len(self.corpus) < CORPUS_LIMIT and data:
            self.corpus.append(data)

    def _tree(self, data: bytes) -> Any:
        if data not in self._trees:
            if len(self._trees) > 4 * CORPUS_LIMIT:
                self._trees.clear()
            tree = _decode(self.fmt, data)
            self._trees[data] = None if tree is None else json.dumps(tree, allow_nan=True)
        cached = self._trees[data]
        return None if cached is None else json.loads(cached)

    def structured(self, data: bytes) -> bytes | None:
        if self.fmt is None:
            return None
        try:
            tree = self._tree(data)
        except (ValueError, TypeError):  # TOML dates do not survive the JSON cache
            return None
        if tree is None:
            return None
        for _ in range(self.rng.choice((1, 1, 2, 3))):
            tree = _mutate_tree(self.rng, tree)
        return _encode(self.rng, self.fmt, tree)[:MAX_INPUT]

    def mutate(self) -> bytes:
        rng = self.rng
        data = rng.choice(self.corpus)
        if self.fmt is not None and rng.random() < 0.4:
            out = self.structured(data)
            if out is not None:
                return out
        buf = bytearray(data)
        for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4, 8))):
            self._havoc(buf)
        return bytes(buf[:MAX_INPUT])

    def _havoc(self, buf: bytearray) -> None:
        rng = self.rng
        n = len(buf)
        op = rng.randrange(11)
        pos = rng.randrange(n + 1)
        if op == 0 and n:
            buf[pos % n] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            buf[pos % n] = rng.randrange(256)
        elif op == 2 and n:
            buf[pos % n] = rng.choice(INTERESTING_BYTES)
        elif op == 3:
            buf[pos:pos] = os.urandom(rng.choice((1, 1, 2, 4, 8)))
        elif op == 4:
            buf[pos:pos] = rng.choice(self.tokens)
        elif op == 5 and n:
            end = min(n, pos + rng.choice((1, 2, 4, 16, 64, n)))
            del buf[pos:end]
        elif op == 6 and n:
            start = rng.randrange(n)
            chunk = buf[start : start + rng.choice((1, 4, 16, 64))]
            buf[pos:pos] = chunk * rng.choice((1, 2, 100, 3000))
        elif op == 7:
            del buf[pos:]
        elif op == 8:
            other = rng.choice(self.corpus)
            cut = rng.randrange(len(other) + 1)
            buf[pos:] = other[cut:]
        elif op == 9 and n:
            # replace a run of digits with a huge or boundary number
            start = pos % n
            while start < n and not 48 <= buf[start] <= 57:
                start += 1
            end = start
            while end < n and 48 <= buf[end] <= 57:
                end += 1
            buf[start:end] = rng.choice(
                (b"1" * 5000, b"0", b"-1", b"4611686018427387903", b"4611686018427387904", b"1e9")
            )
        else:
            buf[pos:pos] = rng.choice(self.corpus)[: rng.randrange(64)]


# --- running --------------------------------------------------------------------------------


def _project_frame(tb: Any) -> tuple[str, str]:
    frames = traceback.extract_tb(tb)
    innermost = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    where = innermost
    for frame in frames:
        name = frame.filename.replace(os.sep, "/")
        if ("/qkdagent" in name or "/plugins/" in name) and "/contrib/fuzz/" not in name:
            where = f"{_short(name)}:{frame.lineno} in {frame.name}"
    return where, innermost


def _short(name: str) -> str:
    parts = name.split("/")
    for anchor in ("qkdagent", "src"):
        if anchor in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(anchor) - 1 :])
    return parts[-1]


class Runner:
    """Feeds inputs to one target, timing each and collecting distinct crashes."""

    def __init__(self, name: str, target: Callable[[bytes], None], input_timeout: float | None):
        self.result = Result(name)
        self.target = target
        self.input_timeout = input_timeout
        if input_timeout is not None:
            signal.signal(signal.SIGALRM, _on_alarm)

    def run_one(self, data: bytes, *, reraise: bool = False) -> bool:
        """Run one input; True when it crashed."""
        result = self.result
        result.inputs += 1
        if self.input_timeout is not None:
            # repeats: an alarm landing where exceptions are ignored (a gc callback) comes again
            signal.setitimer(signal.ITIMER_REAL, self.input_timeout, 1.0)
        start = time.perf_counter()
        try:
            self.target(data)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            self._disarm()
            self._record(exc, data)
            if reraise:
                raise
            return True
        finally:
            elapsed = time.perf_counter() - start
            if elapsed > result.slowest:
                result.slowest, result.slowest_data = elapsed, data
        self._disarm()
        return False

    def _disarm(self) -> None:
        if self.input_timeout is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _record(self, exc: BaseException, data: bytes) -> None:
        result = self.result
        result.crashes += 1
        where, innermost = _project_frame(exc.__traceback__)
        key = (type(exc).__name__, where)
        if key in result.distinct:
            crash = result.distinct[key]
            crash.count += 1
            if len(data) < len(crash.data):
                crash.data = data
            return
        if len(result.distinct) < MAX_CRASHES_KEPT:
            trace = "".join(traceback.format_exception(exc, limit=-12))
            result.distinct[key] = Crash(key[0], where, innermost, data, trace=trace[-6000:])


def _on_alarm(signum: int, frame: Any) -> None:
    raise InputTimeout("input ran longer than the per-input limit")


def run_hypothesis(
    runner: Runner, strategy: Any, examples: int, *, derandomize: bool, seed: int
) -> list[bytes]:
    """Run up to `examples` hypothesis examples; returns a sample of them for the corpus."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    sample: list[bytes] = []
    start = runner.result.inputs

    @settings(
        max_examples=examples,
        derandomize=derandomize,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=(Phase.generate, Phase.shrink),
        report_multiple_bugs=False,
    )
    @given(strategy)
    def check(data: bytes) -> None:
        if len(sample) < 500:
            sample.append(data)
        runner.run_one(data, reraise=True)

    if not derandomize:
        check = hseed(seed)(check)
    try:
        check()
    except KeyboardInterrupt:
        raise
    except BaseException:  # noqa: S110 - recorded by run_one (the shrunk input is the smallest)
        pass
    runner.result.hypothesis_inputs = runner.result.inputs - start
    return sample


def fuzz(
    name: str,
    module: ModuleType,
    *,
    inputs: int,
    hypothesis_examples: int,
    seconds: float | None = None,
    seed: int = 0,
    derandomize: bool = False,
    input_timeout: float | None = None,
    progress: Callable[[Result], None] | None = None,
) -> Result:
    """Run `inputs` inputs (hypothesis first, then mutations) against one target module."""
    runner = Runner(name, module.target, input_timeout)
    result = runner.result
    began = time.perf_counter()
    deadline = None if seconds is None else began + seconds
    corpus = list(module.SEEDS)
    strategy = getattr(module, "STRATEGY", None)
    if strategy is None:
        from hypothesis import strategies as st

        strategy = st.one_of(st.binary(max_size=512), st.sampled_from(corpus))
    if hypothesis_examples:
        corpus += run_hypothesis(
            runner, strategy, min(hypothesis_examples, inputs), derandomize=derandomize, seed=seed
        )
    for data in module.SEEDS:
        runner.run_one(data)
    mutator = Mutator(
        random.Random(seed),
        corpus,
        getattr(module, "FORMAT", None),
        getattr(module, "DICTIONARY", []),
    )
    run_one = runner.run_one
    mutate = mutator.mutate
    while result.inputs < inputs:
        batch = min(1000, inputs - result.inputs)
        for _ in range(batch):
            run_one(mutate())
        if deadline is not None and time.perf_counter() > deadline:
            break
        if progress is not None and result.inputs % 50000 < 1000:
            result.seconds = time.perf_counter() - began
            progress(result)
    result.seconds = time.perf_counter() - began
    return result


def minimize(target: Callable[[bytes], None], crash: Crash, *, attempts: int = 3000) -> bytes:
    """Shrink a crashing input (chunk deletion) while it crashes the same way."""

    def same(data: bytes) -> bool:
        try:
            target(data)
        except Exception as exc:
            return (type(exc).__name__, _project_frame(exc.__traceback__)[0]) == (
                crash.kind,
                crash.where,
            )
        return False

    data = crash.data
    if crash.kind == InputTimeout.__name__:
        return data  # each try could take as long as the hang itself
    chunk = max(1, len(data) // 2)
    while chunk >= 1 and attempts > 0:
        pos = 0
        while pos < len(data) and attempts > 0:
            attempts -= 1
            candidate = data[:pos] + data[pos + chunk :]
            if same(candidate):
                data = candidate
            else:
                pos += chunk
        chunk //= 2
    return data
