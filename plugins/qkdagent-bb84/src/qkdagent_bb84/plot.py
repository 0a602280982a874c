"""The sweep's PNG (needs matplotlib, the `plot` extra): secret key rate against distance,
measured beside the asymptotic and expected finite-key curves, and QBER against Eve's fraction."""

from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path
from typing import Any

from .curves import asymptotic_rate, expected, finite_rate
from .engine import Settings


def plot_sweep(path: Path, rows: list[dict[str, Any]], settings: Settings) -> None:
    matplotlib = importlib.import_module("matplotlib")  # the optional extra: untyped here
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    eves = sorted({float(r["eve_fraction"]) for r in rows})
    honest = [r for r in rows if float(r["eve_fraction"]) == eves[0]]
    distances = [float(r["distance_km"]) for r in honest]
    top = max(distances) if distances else 100.0
    grid = [top * i / 199 for i in range(200)]
    f = next((float(r["f"]) for r in honest if float(r["f"]) > 0), 1.16)
    physics = [replace(settings.physics, distance_km=d, eve_intercept=eves[0]) for d in grid]
    eps = (settings.eps_sec, settings.eps_cor)
    left.semilogy(grid, [asymptotic_rate(p, f) for p in physics], label="asymptotic (GLLP/decoy)")
    left.semilogy(
        grid,
        [finite_rate(p, settings.block_bits, f, *eps) for p in physics],
        label=f"finite key, n = {settings.block_bits:.0e}",
    )
    measured = [(d, float(r["bits_per_pulse"])) for d, r in zip(distances, honest, strict=True)]
    left.semilogy(
        [d for d, v in measured if v > 0], [v for _, v in measured if v > 0], "o", label="simulated"
    )
    left.set_xlabel("distance (km)")
    left.set_ylabel("secret key bits per pulse")
    left.grid(True, which="both", alpha=0.3)
    left.legend()

    first = float(rows[0]["distance_km"]) if rows else 0.0
    at_first = [r for r in rows if float(r["distance_km"]) == first]
    right.plot(
        [float(r["eve_fraction"]) for r in at_first], [float(r["qber"]) for r in at_first], "o",
        label="estimated (simulated)",
    )  # fmt: skip
    line = [i / 100 for i in range(101)]
    base = replace(settings.physics, distance_km=first)
    right.plot(
        line, [expected(replace(base, eve_intercept=e)).error[0] for e in line], label="expected"
    )
    right.axhline(settings.qber_threshold, linestyle="--", color="grey", label="abort threshold")
    right.set_xlabel("intercept-resend fraction")
    right.set_ylabel("QBER")
    right.grid(True, alpha=0.3)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
