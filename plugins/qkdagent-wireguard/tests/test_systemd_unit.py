"""contrib/wireguard's broker unit: `systemd-analyze verify` accepts it without a warning, and
its system-call filter, applied the way systemd applies it, leaves the broker what it needs
(chown(2) for `--socket-group` in particular). Needs no running systemd."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from qkdagent.testing import require_binary

UNIT = Path(__file__).resolve().parents[3] / "contrib" / "wireguard"
UNIT = UNIT / "qkdagent-wireguard-broker.service"
BROKER_SYSCALLS = {
    # bind_socket: umask, bind, chown to --socket-group, chmod, listen, rename into place
    "socket", "umask", "bind", "chown", "fchownat", "chmod", "listen", "rename",
    # serving: accept, SO_PEERCRED, replies, requests, removing the socket on SIGTERM
    "accept4", "getsockopt", "sendto", "recvfrom", "unlink", "epoll_wait",
}  # fmt: skip


def unit_values(text: str, key: str) -> list[str]:
    """Every `key=` value of the unit, in order, with continuation lines joined."""
    text = text.replace("\\\n", " ")
    return [m[1].strip() for m in re.finditer(rf"^{key}=(.*)$", text, re.MULTILINE)]


def syscall_groups() -> dict[str, list[str]]:
    """`systemd-analyze syscall-filter`: each @group and its members (names or @groups)."""
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] = []
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand(items: list[str], groups: dict[str, list[str]]) -> set[str]:
    names: set[str] = set()
    for item in items:
        if item.startswith("@"):
            names |= expand(groups[item], groups)
        else:
            names.add(item)
    return names


def effective_filter(values: list[str], groups: dict[str, list[str]]) -> tuple[bool, set[str]]:
    """(allow-list mode, set) after `SystemCallFilter=` lines, per systemd.exec(5): the first
    line sets the mode, later lines of the same kind add to the set, of the other kind remove
    from it; an empty value resets."""
    allow: bool | None = None
    names: set[str] = set()
    for value in values:
        if not value:
            allow, names = None, set()
            continue
        deny = value.startswith("~")
        items = expand(value.lstrip("~").split(), groups)
        if allow is None:
            allow, names = not deny, items
        elif deny == (not allow):
            names |= items
        else:
            names -= items
    return bool(allow), names


def test_effective_filter_model() -> None:
    groups = {"@a": ["x", "@b"], "@b": ["y"]}
    assert effective_filter(["@a", "~@b"], groups) == (True, {"x"})
    assert effective_filter(["@a", "~@b", "y"], groups) == (True, {"x", "y"})
    assert effective_filter(["~x", "y", "@b"], groups) == (False, {"x"})
    assert effective_filter(["~x", ""], groups) == (False, set())


def test_broker_unit_filter_allows_what_the_broker_calls() -> None:
    require_binary("systemd-analyze")
    text = UNIT.read_text()
    assert "--socket-group" in unit_values(text, "ExecStart")[0]
    allow, names = effective_filter(unit_values(text, "SystemCallFilter"), syscall_groups())
    assert allow, "the unit should allow-list (@system-service)"
    assert BROKER_SYSCALLS <= names, sorted(BROKER_SYSCALLS - names)
    assert "CAP_CHOWN" in unit_values(text, "CapabilityBoundingSet")[0]


def test_broker_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    require_binary("systemd-analyze")
    # verify checks that ExecStart's program exists: point it at the installed one
    program = shutil.which("qkdagent-wireguard") or sys.executable
    text = UNIT.read_text().replace("/usr/local/bin/qkdagent-wireguard", program)
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr  # unknown keys or groups are only warnings
