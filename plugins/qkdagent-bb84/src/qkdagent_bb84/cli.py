"""`qkdagent bb84 run|sweep`: run a simulated link for N blocks, or sweep distance and Eve.

`run` prints one line of figures per block (and optionally writes them as CSV); `sweep` runs
`--blocks` blocks at every (distance, Eve fraction) point and writes a CSV with the measured
secret key rate beside the asymptotic and expected finite-key rates (`curves.py`), and with
`--plot FILE.png` (needs matplotlib: `pip install 'qkdagent-bb84[plot]'`) the key rate against
distance and the QBER against the eavesdropped fraction. Link parameters are `--set K=V`, the
names and bounds of the `--supply bb84:...` options. Every flag is bounded; a bad one is one line
on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import os
import secrets
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from .curves import asymptotic_rate, finite_rate
from .engine import BlockResult, Settings, run_block
from .supply import parse_options

MAX_BLOCKS = 10_000
MAX_POINTS = 200
MAX_SETS = 64
PLOT_POINTS = 200


class UsageError(Exception):
    """A bad flag: one line, exit 2."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse's errors as one line (no usage block), exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message}".replace("\n", " "), file=sys.stderr)
        raise SystemExit(2)


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 6:
        raise argparse.ArgumentTypeError(f"{text[:20]!r} is not a whole number")
    value = int(text)
    if not 1 <= value <= MAX_BLOCKS:
        raise argparse.ArgumentTypeError(f"{value} is not between 1 and {MAX_BLOCKS}")
    return value


def _floats(lo: float, hi: float) -> Any:
    def parse(text: str) -> list[float]:
        items = [t for t in text.split(",") if t.strip()]
        if not items or len(items) > MAX_POINTS or len(text) > 16 * MAX_POINTS:
            raise argparse.ArgumentTypeError(f"1 to {MAX_POINTS} comma-separated numbers")
        out = []
        for item in items:
            try:
                value = float(item)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{item[:20]!r} is not a number") from None
            if not lo <= value <= hi:  # also refuses nan
                raise argparse.ArgumentTypeError(f"{value:g} is not between {lo:g} and {hi:g}")
            out.append(value)
        return out

    return parse


def _assignment(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or len(text) > 200 or not text.isprintable():
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not KEY=VALUE")
    return key, value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = "Run a simulated BB84 link: per-block figures, or a distance/Eve sweep."
    parser.error = _OneLineParser.error.__get__(parser)  # type: ignore[method-assign]
    sub = parser.add_subparsers(dest="action", required=True, parser_class=_OneLineParser)
    for name, text in (("run", "run N blocks, one line each"), ("sweep", "key rate vs distance")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--blocks", type=_count, default=1 if name == "run" else 3)
        p.add_argument(
            "--set", type=_assignment, action="append", default=[], metavar="KEY=VALUE",
            help="a link parameter (the names of --supply bb84:...; e.g. distance_km=50)",
        )  # fmt: skip
        p.add_argument("--seed", type=_count, help="reproducible blocks (1..10000)")
        p.add_argument("--csv", type=Path, help="write the figures as CSV here")
    sweep = sub.choices["sweep"]
    sweep.add_argument("--distances", type=_floats(0, 1000), default=[0, 10, 25, 50, 75, 100])
    sweep.add_argument("--eve", type=_floats(0, 1), default=[0.0], help="Eve fractions")
    sweep.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")


def _settings(sets: Sequence[tuple[str, str]]) -> tuple[Settings, float]:
    if len(sets) > MAX_SETS:
        raise UsageError(f"--set: at most {MAX_SETS}")
    options = dict(sets)
    if len(options) != len(sets):
        raise UsageError("--set: a parameter is given twice")
    if {"seed", "capacity_bits"} & set(options):
        raise UsageError("--set: seed and capacity_bits are not link parameters here")
    try:
        settings, _, rate, _ = parse_options(options)
    except ValueError as exc:
        raise UsageError(str(exc).replace("bb84 supply option ", "--set ")) from None
    return settings, rate


BLOCK_FIELDS = ["block", "status", "sifted", "sample", "qber_estimate", "qber_actual",
                "disclosed", "f", "round_trips", "key_bits", "pulses", "bits_per_pulse",
                "seconds"]  # fmt: skip
SWEEP_FIELDS = ["distance_km", "eve_fraction", "blocks", "aborted", "qber", "f", "key_bits",
                "pulses", "bits_per_pulse", "asymptotic_bits_per_pulse",
                "finite_key_bits_per_pulse", "key_rate_bps"]  # fmt: skip


def block_row(number: int, r: BlockResult) -> dict[str, Any]:
    return {
        "block": number, "status": r.status, "sifted": r.sifted, "sample": r.sample,
        "qber_estimate": round(r.qber_estimate, 6), "qber_actual": round(r.qber_actual, 6),
        "disclosed": r.disclosed, "f": round(r.f, 4), "round_trips": r.rounds,
        "key_bits": r.key_bits, "pulses": r.pulses,
        "bits_per_pulse": f"{r.key_bits / r.pulses:.4g}" if r.pulses else 0,
        "seconds": round(sum(r.seconds.values()), 4),
    }  # fmt: skip


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    """Atomically (a reader never sees half a file)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text(text.getvalue())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _seed(args: argparse.Namespace) -> int:
    return args.seed if args.seed is not None else secrets.randbits(63)


def cmd_run(args: argparse.Namespace) -> int:
    settings, _ = _settings(args.set)
    seed = _seed(args)
    rows = []
    widths = {f: max(len(f), 8) for f in BLOCK_FIELDS}
    widths["status"] = 28
    print(" ".join(f"{f:>{widths[f]}}" for f in BLOCK_FIELDS))
    for number in range(args.blocks):
        result = run_block(settings, (seed, number))
        row = block_row(number, result)
        rows.append(row)
        print(" ".join(f"{row[f]!s:>{widths[f]}}" for f in BLOCK_FIELDS), flush=True)
    if args.csv:
        _write_csv(args.csv, BLOCK_FIELDS, rows)
    return 0


def sweep_point(
    settings: Settings, distance: float, eve: float, blocks: int, seed: tuple[int, ...], rate: float
) -> dict[str, Any]:
    phys = replace(settings.physics, distance_km=distance, eve_intercept=eve)
    point = replace(settings, physics=phys)
    results = [run_block(point, (*seed, b)) for b in range(blocks)]
    ok = [r for r in results if r.ok]
    pulses = sum(r.pulses for r in results)
    key_bits = sum(r.key_bits for r in ok)
    f = sum(r.f for r in ok) / len(ok) if ok else 0.0
    per_pulse = key_bits / pulses if pulses else 0.0
    eps = (settings.eps_sec, settings.eps_cor)
    return {
        "distance_km": distance, "eve_fraction": eve, "blocks": blocks,
        "aborted": len(results) - len(ok),
        "qber": round(sum(r.qber_estimate for r in results) / len(results), 6),
        "f": round(f, 4), "key_bits": key_bits, "pulses": pulses,
        "bits_per_pulse": f"{per_pulse:.4g}",
        "asymptotic_bits_per_pulse": f"{asymptotic_rate(phys, f or 1.16):.4g}",
        "finite_key_bits_per_pulse":
            f"{finite_rate(phys, settings.block_bits, f or 1.16, *eps):.4g}",
        "key_rate_bps": f"{per_pulse * rate:.4g}",
    }  # fmt: skip


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.csv is None:
        raise UsageError("sweep: --csv FILE is required")
    points = [(d, e) for d in args.distances for e in args.eve]
    if len(points) * args.blocks > MAX_BLOCKS:
        raise UsageError(f"sweep: at most {MAX_BLOCKS} blocks in all (points x --blocks)")
    if args.plot is not None:
        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError("--plot needs matplotlib: pip install 'qkdagent-bb84[plot]'")
    settings, rate = _settings(args.set)
    seed = _seed(args)
    rows = []
    for index, (distance, eve) in enumerate(points):
        row = sweep_point(settings, distance, eve, args.blocks, (seed, index), rate)
        rows.append(row)
        print(", ".join(f"{k}={row[k]}" for k in SWEEP_FIELDS), flush=True)
    _write_csv(args.csv, SWEEP_FIELDS, rows)
    if args.plot is not None:
        from .plot import plot_sweep

        plot_sweep(args.plot, rows, settings)
    return 0


def run(args: argparse.Namespace) -> int:
    """0 when done; 2 and one line on stderr for a bad flag."""
    try:
        return cmd_run(args) if args.action == "run" else cmd_sweep(args)
    except (UsageError, OSError) as exc:
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
        print(f"bb84: {text}{where}".replace("\n", " "), file=sys.stderr)
        return 2
