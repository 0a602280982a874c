"""Plugins use only the public API: `qkdagent` itself and the `qkdagent.testing` kit.

Everything else in the core may change without notice, so a plugin that reaches into it would
break on a core release that keeps the public API intact.
"""

from __future__ import annotations

import ast
from pathlib import Path

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"
PUBLIC = ("qkdagent", "qkdagent.testing")


def private_imports(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            public = any(name == p or name.startswith("qkdagent.testing.") for p in PUBLIC)
            if (name == "qkdagent" or name.startswith("qkdagent.")) and not public:
                found.append(name)
    return found


def test_the_checker_sees_a_private_import() -> None:
    assert private_imports("from qkdagent.pki import x\nimport qkdagent.agent\n") == [
        "qkdagent.pki",
        "qkdagent.agent",
    ]
    assert private_imports("from qkdagent import Sink\nfrom qkdagent.testing import x\n") == []


def test_plugins_import_only_the_public_api() -> None:
    files = sorted(p for p in PLUGINS.glob("*/*/**/*.py") if "build" not in p.parts)
    assert len(files) > 50  # the plugins' sources, tests and benchmarks
    offenders = {
        str(path.relative_to(PLUGINS)): bad
        for path in files
        if (bad := private_imports(path.read_text(encoding="utf-8")))
    }
    assert offenders == {}
