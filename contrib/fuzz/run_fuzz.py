#!/usr/bin/env python3
"""Run the fuzz targets of this directory: N inputs each (mutations plus hypothesis examples).

    python3 contrib/fuzz/run_fuzz.py                       # every target, 1,000,000 inputs each
    python3 contrib/fuzz/run_fuzz.py --target peer_request --inputs 100000 --seconds 60
    python3 contrib/fuzz/run_fuzz.py --target config --replay contrib/fuzz/crashes/config-1.bin

Prints, per target: inputs run, crashes (each distinct one saved as crashes/<target>-<n>.bin,
with its exception type, where it escaped and a minimized copy), the slowest input and
inputs/s. Exits 1 when any target crashed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=1_000_000, help="inputs per target")
    parser.add_argument("--target", action="append", help="target name (repeatable)")
    parser.add_argument("--seconds", type=float, help="time cap per target")
    parser.add_argument("--hypothesis", type=int, help="hypothesis examples (default 1%%, ≤10k)")
    parser.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    parser.add_argument("--input-timeout", type=float, default=10.0, help="a hang, in seconds")
    parser.add_argument("--crashes", type=Path, default=engine.HERE / "crashes")
    parser.add_argument("--replay", type=Path, help="run one saved input and show what happens")
    args = parser.parse_args(argv)

    logging.disable(logging.CRITICAL)  # parsers log warnings; a million of them help nobody
    targets = engine.discover()
    names = args.target or list(targets)
    unknown = [n for n in names if n not in targets]
    if unknown:
        parser.error(f"unknown target {unknown[0]!r}; have: {', '.join(targets)}")
    if args.replay:
        return _replay(targets[names[0]], args.replay)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    hyp = args.hypothesis if args.hypothesis is not None else min(10_000, args.inputs // 100)
    print(f"seed {seed}, {args.inputs:,} inputs per target ({hyp:,} from hypothesis)")
    crashed = False
    for name in names:
        try:
            module = engine.load_target(targets[name])
        except ImportError as exc:
            print(f"{name}: cannot import the target ({exc}); its plugin is not installed?")
            crashed = True
            continue
        result = engine.fuzz(
            name,
            module,
            inputs=args.inputs,
            hypothesis_examples=hyp,
            seconds=args.seconds,
            seed=seed,
            input_timeout=args.input_timeout,
            progress=_progress,
        )
        _report(result, module, args.crashes)
        crashed |= result.crashes > 0
    return 1 if crashed else 0


def _progress(result: engine.Result) -> None:
    print(
        f"  {result.target}: {result.inputs:,} inputs, {result.crashes:,} crashes, "
        f"{result.rate:,.0f}/s",
        file=sys.stderr,
        flush=True,
    )


def _report(result: engine.Result, module: object, crashes: Path) -> None:
    r = result
    print(
        f"{r.target}: {r.inputs:,} inputs run ({r.hypothesis_inputs:,} hypothesis) in "
        f"{r.seconds:,.1f} s, {r.rate:,.0f} inputs/s; crashes: {r.crashes:,} "
        f"({len(r.distinct)} distinct); slowest input {r.slowest * 1000:,.2f} ms, "
        f"{len(r.slowest_data):,} bytes: {_preview(r.slowest_data)}"
    )
    crashes.mkdir(parents=True, exist_ok=True)
    (crashes / f"{r.target}-slowest.bin").write_bytes(r.slowest_data)
    for n, crash in enumerate(r.distinct.values(), 1):
        path = crashes / f"{r.target}-{n}.bin"
        path.write_bytes(crash.data)
        small = engine.minimize(module.target, crash)  # type: ignore[attr-defined]
        path.with_suffix(".min.bin").write_bytes(small)
        path.with_suffix(".txt").write_text(crash.trace)
        print(
            f"  crash {n}: {crash.kind} x{crash.count:,}, escaped from {crash.where} "
            f"(raised at {crash.raised_at}); input {len(crash.data):,} bytes -> {path}, "
            f"minimized to {len(small):,} bytes: {_preview(small)}"
        )


def _preview(data: bytes, limit: int = 60) -> str:
    text = repr(data[:limit])
    return text + ("..." if len(data) > limit else "")


def _replay(path: Path, data_file: Path) -> int:
    module = engine.load_target(path)
    try:
        module.target(data_file.read_bytes())
    except Exception:
        traceback.print_exc()
        return 1
    print("no crash")
    return 0


if __name__ == "__main__":
    sys.exit(main())
