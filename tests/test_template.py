"""contrib/plugin-template: copied and renamed as its README says, its own tests pass.

The copy is made importable the way an install makes it: its `src/` on the path and a
`.dist-info` holding the entry points its pyproject.toml declares, so the agents in its tests
find the renamed plugin by entry point, exactly as after `pip install`. (A real pip build needs
a build backend from an index; this check must run offline and in seconds.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "contrib" / "plugin-template"
IGNORE = shutil.ignore_patterns(
    "build", "*.egg-info", "__pycache__", ".ruff_cache", ".pytest_cache"
)


def make_it_yours(template: Path, destination: Path, name: str) -> Path:
    """The README's steps: copy, rename the package directory, replace `example` everywhere."""
    copy = destination / f"qkdagent-{name}"
    shutil.copytree(template, copy, ignore=IGNORE)
    (copy / "src" / "qkdagent_example").rename(copy / "src" / f"qkdagent_{name}")
    for path in copy.rglob("*"):
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            if "example" in text:
                path.write_text(text.replace("example", name), encoding="utf-8")
    return copy


def install_metadata(project: Path, site: Path) -> str:
    """A minimal `.dist-info` for `project` in `site`, with its declared entry points."""
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    dist = meta["name"].replace("-", "_")
    info = site / f"{dist}-{meta['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n"
    )
    lines = []
    for group, entries in meta.get("entry-points", {}).items():
        lines.append(f"[{group}]")
        lines += [f"{key} = {value}" for key, value in entries.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return meta["name"]


@pytest.fixture(scope="module")
def renamed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("template")
    copy = make_it_yours(TEMPLATE, base, "acme")
    site = base / "site"
    assert install_metadata(copy, site) == "qkdagent-acme"
    return copy, site


def test_the_rename_leaves_no_trace_of_the_placeholder(renamed: tuple[Path, Path]) -> None:
    copy, site = renamed
    leftovers = [
        str(p.relative_to(copy))
        for p in copy.rglob("*")
        if "example" in p.name or (p.is_file() and "example" in p.read_text(encoding="utf-8"))
    ]
    assert leftovers == []
    entry_points = next(site.glob("*.dist-info")).joinpath("entry_points.txt").read_text()
    assert "[qkdagent.plugins]\nacme = qkdagent_acme\n" in entry_points


def test_the_renamed_template_passes_its_own_tests(renamed: tuple[Path, Path]) -> None:
    copy, site = renamed
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(copy / "src"), str(site)]),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, output
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "error" not in summary, summary
    # the agents find the renamed plugin by its entry point; the contracts ran
    assert "test_agents.py::test_agents_rotate_through_the_plugin PASSED" in result.stdout
    assert "test_contract.py::TestSharedDirSource::test_key_is_single_use PASSED" in result.stdout
    assert "test_contract.py::TestFileSink::test_erase_leaves_no_usable_key PASSED" in result.stdout


def test_the_template_is_lint_clean(renamed: tuple[Path, Path]) -> None:
    ruff = shutil.which("ruff")
    assert ruff is not None, "ruff is a test dependency"
    copy, _ = renamed
    for args in (["check", "--no-cache", "."], ["format", "--check", "--no-cache", "."]):
        result = subprocess.run(
            [ruff, *args], cwd=copy, capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
