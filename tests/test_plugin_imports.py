"""Plugins use only the public API: the names `qkdagent` and `qkdagent.testing` export.

Everything else in the core may change without notice, so a plugin that reaches into it would
break on a core release that keeps the public API intact. The one submodule a plugin may name
is the test kit's pytest plugin (its fixtures are found by module name).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import qkdagent
import qkdagent.testing

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
TEMPLATE = ROOT / "contrib" / "plugin-template"
EXPORTS = {
    "qkdagent": {*qkdagent.__all__, "testing"},  # `from qkdagent import testing` is the kit
    "qkdagent.testing": set(qkdagent.testing.__all__),
}
MODULES = {"qkdagent", "qkdagent.testing", "qkdagent.testing.pytest_plugin"}


def private_imports(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            module = node.module
            if module == "qkdagent" or module.startswith("qkdagent."):
                public = EXPORTS.get(module)
                if module not in MODULES:
                    found.append(module)
                elif public is not None:
                    found += [f"{module}.{a.name}" for a in node.names if a.name not in public]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("qkdagent.") and alias.name not in MODULES:
                    found.append(alias.name)
    return found


def test_the_checker_sees_a_private_import() -> None:
    source = (
        "from qkdagent.pki import x\n"
        "import qkdagent.agent\n"
        "from qkdagent import pki, Sink\n"
        "from qkdagent.testing.toml import config_toml\n"
        "from qkdagent.testing import agents, RecordingSink\n"
    )
    assert private_imports(source) == [
        "qkdagent.pki",
        "qkdagent.agent",
        "qkdagent.pki",
        "qkdagent.testing.toml",
        "qkdagent.testing.agents",
    ]
    public = (
        "import qkdagent\nfrom qkdagent import Sink, testing\n"
        "from qkdagent.testing import free_port\n"
    )
    assert private_imports(public) == []


def test_plugins_import_only_the_public_api() -> None:
    files = sorted(p for p in PLUGINS.glob("*/*/**/*.py") if "build" not in p.parts)
    assert len(files) > 50  # the plugins' sources, tests and benchmarks
    template = sorted(TEMPLATE.glob("*/**/*.py"))
    assert len(template) >= 6  # the plugin template is held to the same rule
    offenders = {
        str(path.relative_to(ROOT)): bad
        for path in files + template
        if (bad := private_imports(path.read_text(encoding="utf-8")))
    }
    assert offenders == {}


def test_every_export_is_in_the_plugin_guide() -> None:
    """Exporting a name makes it API: the author guide says what each one is for."""
    guide = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    missing = [
        f"{module}.{name}"
        for module, names in EXPORTS.items()
        for name in sorted(names - {"__version__", "testing"})
        if not re.search(rf"\b{re.escape(name)}\b", guide)
    ]
    assert missing == []
