"""Every test the threat model cites exists, so a claim never points at nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "threat-model.md"
CITATION = re.compile(r"`((?:tests|plugins/[\w-]+/tests)/[\w/]+\.py)(?:::(\w+))?`|`::(\w+)`")


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_every_cited_test_exists() -> None:
    cited: list[tuple[str, str | None]] = []
    current = None
    for match in CITATION.finditer(DOC.read_text()):
        path, name, bare = match.groups()
        if path:
            current = path
            cited.append((path, name))
        else:
            assert current is not None, f"::{bare} cited before any file"
            cited.append((current, bare))
    assert len(cited) > 30
    missing = []
    for path, name in cited:
        file = ROOT / path
        if not file.exists():
            missing.append(path)
        elif name is not None and name not in _tests_in(file):
            missing.append(f"{path}::{name}")
    assert not missing, missing
