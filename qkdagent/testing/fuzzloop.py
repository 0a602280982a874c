"""The quick mutation loop a plugin's fuzz module runs on its own (`python fuzz_x.py SECONDS`);
`contrib/fuzz/engine.py` is the thorough engine that runs every target in CI."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

Refusals = tuple[type[BaseException], ...]


def selecting_target(
    parsers: Sequence[Callable[[bytes], object]], refusals: Sequence[Refusals]
) -> Callable[[bytes], None]:
    """A target whose first byte picks one of `parsers` (drawn at random by `mutation_loop`
    with `selectors=len(parsers)`) and feeds it the rest; the parser may refuse with the
    errors of the same index in `refusals` (a parser that must not fail gets `()`), anything
    else escapes as a crash."""
    if len(parsers) != len(refusals):
        raise ValueError("one tuple of refusals per parser")

    def target(data: bytes) -> None:
        if not data:
            return
        index = data[0] % len(parsers)
        try:
            parsers[index](data[1:])
        except refusals[index]:
            pass

    return target


def mutation_loop(
    target: Callable[[bytes], None],
    seeds: Sequence[bytes],
    seconds: float,
    *,
    selectors: int = 0,
    truncate: float = 0.0,
) -> int:
    """Feed `target` byte-flipped seeds for `seconds` (reproducible: a fixed random seed) and
    print and return the number of runs; a crash propagates. With `selectors`, byte 0 picks one
    of that many parsers and is drawn at random (mutations leave it alone otherwise); with
    `truncate`, that share of inputs is also cut short."""
    rng = random.Random(0)
    end = time.monotonic() + seconds
    runs = 0
    first = 1 if selectors else 0
    while time.monotonic() < end:
        data = bytearray(rng.choice(seeds))
        if len(data) > first:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(first, len(data))] = rng.randrange(256)
        if selectors and data:
            data[0] = rng.randrange(selectors)
        if truncate and data and rng.random() < truncate:
            del data[rng.randrange(first, len(data)) if len(data) > first else len(data) :]
        target(bytes(data))
        runs += 1
    print(f"{runs} runs, no crash")
    return runs
