"""mypy is clean on the core and every plugin (the `[tool.mypy]` files of pyproject.toml).

Run as a test so CI fails on a type error like on any other regression. mypy keeps its own
cache (.mypy_cache at the repository root, independent of pytest's cacheprovider): warm runs
take well under a second, a cold one a few seconds.
"""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _sources() -> list[Path]:
    """What the configuration must cover: the core package and each plugin's src packages."""
    return [*ROOT.glob("qkdagent/**/*.py"), *ROOT.glob("plugins/*/src/**/*.py")]


def test_mypy_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"mypy found errors:\n{output}"
    # A configuration that checks fewer files (a plugin left out) must not pass silently.
    checked = re.search(r"no issues found in (\d+) source files", output)
    assert checked is not None, output
    assert int(checked.group(1)) == len(_sources()), output
