"""`qkdagent bb84 run|sweep`: per-block figures, the sweep's CSV against the expected curves, the
plot (or the clear refusal without matplotlib), and every bad flag as one line with exit 2."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from qkdagent_bb84.cli import configure, run


def main(argv: list[str]) -> int:
    """`qkdagent bb84 ...` as the core's CLI runs a plugin command (in-process; plugins' tests
    may not import the core's cli module, the subprocess test below goes through it)."""
    assert argv[0] == "bb84"
    parser = argparse.ArgumentParser(prog="qkdagent bb84")
    configure(parser)
    return run(parser.parse_args(argv[1:]))


SMALL = ["--set", "decoys=false", "--set", "block_bits=4000", "--seed", "3"]


def test_run_prints_one_line_per_block_and_writes_csv(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "blocks.csv"
    assert main(["bb84", "run", "--blocks", "3", *SMALL, "--csv", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].split()[:2] == ["block", "status"]
    rows = list(csv.DictReader(out.open()))
    assert [r["block"] for r in rows] == ["0", "1", "2"]
    assert all(r["status"] == "ok" and int(r["key_bits"]) > 0 for r in rows)
    assert all(0.0 < float(r["qber_estimate"]) < 0.03 and 1.0 < float(r["f"]) < 1.5 for r in rows)


def test_sweep_writes_rates_beside_the_expected_curves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep.csv"
    argv = ["bb84", "sweep", "--blocks", "2", *SMALL, "--distances", "0,40", "--eve", "0,1",
            "--csv", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = {
        (float(r["distance_km"]), float(r["eve_fraction"])): r for r in csv.DictReader(out.open())
    }
    assert set(rows) == {(0, 0), (0, 1), (40, 0), (40, 1)}
    for distance in (0.0, 40.0):
        honest, eve = rows[distance, 0.0], rows[distance, 1.0]
        measured = float(honest["bits_per_pulse"])
        assert 0 < measured <= float(honest["asymptotic_bits_per_pulse"])
        assert int(honest["aborted"]) == 0 and int(eve["aborted"]) == 2 and eve["key_bits"] == "0"
        assert 0.2 < float(eve["qber"]) < 0.3  # full intercept-resend: about 25 %
    # the rate falls with distance, measured and expected alike
    assert float(rows[40, 0]["bits_per_pulse"]) < float(rows[0, 0]["bits_per_pulse"])
    assert float(rows[40, 0]["finite_key_bits_per_pulse"]) < float(
        rows[0, 0]["finite_key_bits_per_pulse"]
    )


def test_sweep_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With matplotlib (the `plot` extra) a PNG; without it a one-line refusal before any work."""
    png, out = tmp_path / "sweep.png", tmp_path / "sweep.csv"
    argv = ["bb84", "sweep", "--blocks", "1", *SMALL, "--distances", "0,20", "--eve", "0,0.5",
            "--csv", str(out), "--plot", str(png)]  # fmt: skip
    if importlib.util.find_spec("matplotlib") is None:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "needs matplotlib" in err
        assert not out.exists() and not png.exists()
    else:
        assert main(argv) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["run", "--blocks", "0"], "--blocks: 0 is not between 1 and 10000"),
        (["run", "--blocks", "99999999"], "is not a whole number"),
        (["run", "--set", "mu=lots"], "--set mu: not a number"),
        (["run", "--set", "colour=red"], "unknown --set 'colour'"),
        (["run", "--set", "distance_km"], "is not KEY=VALUE"),
        (["run", "--set", "mu=0.5", "--set", "mu=0.6"], "given twice"),
        (["run", "--set", "seed=4"], "not link parameters"),
        (["sweep", "--distances", "1,nan", "--csv", "x"], "nan is not between 0 and 1000"),
        (["sweep", "--eve", "2", "--csv", "x"], "2 is not between 0 and 1"),
        (["sweep", "--distances", ",".join(["1"] * 300), "--csv", "x"], "1 to 200"),
        (["sweep"], "--csv FILE is required"),
        (["sweep", "--blocks", "9000", "--eve", "0,1", "--csv", "x"], "at most 10000 blocks"),
        (
            ["sweep", "--blocks", "1", *SMALL, "--distances", "0", "--csv", "/nonexistent/x.csv"],
            "No such file or directory",
        ),
        (["fly"], "invalid choice: 'fly'"),
        (["run", "--frobnicate"], "unrecognized arguments"),
    ],
)
def test_a_bad_flag_is_one_line_and_exit_2(
    argv: list[str], text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(["bb84", *argv])
    except SystemExit as exc:  # argparse's own errors (our parser makes them one line)
        code = int(exc.code or 0)
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and text in err and "Traceback" not in err, err


def test_the_command_is_registered_through_the_entry_point() -> None:
    done = subprocess.run(  # noqa: S603 - our own interpreter and fixed arguments
        [sys.executable, "-m", "qkdagent", "bb84", "run", *SMALL],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].split()[:2] == ["0", "ok"]
