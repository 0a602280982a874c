"""Runtime modules never import the test kit (DESIGN §2), and the demo runs without pytest.

The test kit needs pytest and holds test doubles; a root daemon must not import it. Two checks:
every `import` statement of a runtime module (also those inside functions, which an import test
would not reach), and a real interpreter with `qkdagent.testing` and `pytest` blocked that
imports every runtime module, loads the core's entry points and runs the demo.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import qkdagent

PACKAGE = Path(qkdagent.__file__).resolve().parent
BLOCK = "import sys; sys.modules['qkdagent.testing'] = None; sys.modules['pytest'] = None\n"


def runtime_modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if "testing" in parts or parts[-1] == "__main__":
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imports_of(source: str, module: str) -> set[str]:
    """Absolute names of the modules `module`'s source imports (relative imports resolved)."""
    package = module if source.startswith("#package") else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.add(name)
            found |= {f"{name}.{alias.name}" for alias in node.names}
    return found


def imported_by(module: str) -> set[str]:
    path = PACKAGE.parent / Path(*module.split("."))
    file = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    source = file.read_text(encoding="utf-8")
    return imports_of(("#package\n" if file.name == "__init__.py" else "") + source, module)


def test_the_import_reader_resolves_relative_imports() -> None:
    found = imports_of("from ..testing import x\nfrom . import y\n", "qkdagent.builtin.memory")
    assert {"qkdagent.testing", "qkdagent.testing.x", "qkdagent.builtin.y"} <= found
    assert "qkdagent.testing" in imports_of("#package\nfrom .testing import x\n", "qkdagent")


def test_no_runtime_module_imports_the_test_kit() -> None:
    modules = runtime_modules()
    assert {"qkdagent", "qkdagent.agent", "qkdagent.demo", "qkdagent.builtin.memory"} <= set(
        modules
    )
    offenders = {
        module: sorted(
            n for n in imported_by(module) if n.split(".")[:2] == ["qkdagent", "testing"]
        )
        for module in modules
    }
    assert {m: names for m, names in offenders.items() if names} == {}


def test_runtime_imports_and_entry_points_work_with_the_test_kit_and_pytest_blocked() -> None:
    code = (
        BLOCK
        + "import importlib, importlib.metadata as md\n"
        + f"for name in {runtime_modules()!r}:\n"
        + "    importlib.import_module(name)\n"
        + "core = [ep for ep in md.entry_points(group='qkdagent.plugins')"
        + " if ep.value.startswith('qkdagent.')]\n"
        + "assert {'file', 'exec', 'memory'} <= {ep.name for ep in core}, core\n"
        + "for ep in core:\n"
        + "    ep.load()\n"
        + "assert 'qkdagent.testing' not in [m for m in sys.modules if sys.modules[m]]\n"
        + "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


def test_blocking_works() -> None:
    """The check above would pass vacuously if blocking did not make the import fail."""
    result = subprocess.run(
        [sys.executable, "-c", BLOCK + "import qkdagent.testing\n"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "ModuleNotFoundError" in result.stderr or "ImportError" in result.stderr


def test_the_demo_runs_with_the_test_kit_and_pytest_blocked(tmp_path: Path) -> None:
    code = (
        BLOCK
        + "from qkdagent.cli import main\n"
        + "code = main(['demo', '--rotations', '2', '--interval', '1', '--source', 'memory',"
        + f" '--dir', {str(tmp_path)!r}])\n"
        + "assert 'qkdagent.testing' not in [m for m in sys.modules if sys.modules[m]]\n"
        + "sys.exit(code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "2 rotations, secrets identical on both sides every time." in result.stdout


def test_installed_plugins_load_and_run_their_commands_without_pytest() -> None:
    """What an operator installs (`pip install qkdagent-etsi014`) has no pytest: every
    bundled plugin's entry points and command modules import with pytest and the test kit
    blocked (kme-sim's PKI once came from the test kit)."""
    code = (
        BLOCK
        + "import importlib.metadata as md\n"
        + "groups = ('qkdagent.plugins', 'qkdagent.commands', 'qkdagent.demo')\n"
        + "eps = [ep for g in groups for ep in md.entry_points(group=g)]\n"
        + "assert any(ep.value.startswith('qkdagent_etsi014') for ep in eps), eps\n"
        + "for ep in eps:\n"
        + "    ep.load()\n"
        + "import qkdagent_etsi014.cli, qkdagent_etsi014.sim\n"
        + "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


def _module_level_imports(path: Path, module: str) -> set[str]:
    """What `module` imports when it is imported: module-level imports outside
    `if TYPE_CHECKING:` blocks (function-level imports run later and cannot form a cycle at
    import time, but they are counted too: a cycle there is still a tangle)."""
    import ast

    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(filter(None, [*parts, base]))
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    visit([child])

    visit(tree.body)
    return found


def test_the_core_has_no_import_cycle() -> None:
    root = PACKAGE.parent
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if not name.startswith("qkdagent.testing"):
            modules[name] = path
    graph = {
        name: {m for m in _module_level_imports(path, name) if m in modules and m != name}
        for name, path in modules.items()
    }
    # the package itself re-exports the API: importing `qkdagent` from a submodule is fine
    graph = {n: deps - {"qkdagent"} for n, deps in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                walk(dep, [*stack, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    assert cycles == []
