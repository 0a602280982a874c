"""Integration tests need real components; in CI a missing one is a failure, not a skip."""

from __future__ import annotations

import os
import shutil

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(reason: str) -> None:
    """Skip on a developer machine, fail under CI=true (a skipped integration test hides a gap)."""
    if in_ci():
        pytest.fail(f"required component missing under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def require_binary(*names: str) -> dict[str, str]:
    """Return the absolute paths of executables, or skip/fail naming the first one missing."""
    found: dict[str, str] = {}
    for name in names:
        path = shutil.which(name) or next(
            (p for p in (f"/usr/sbin/{name}", f"/usr/lib/ipsec/{name}") if os.access(p, os.X_OK)),
            None,
        )
        if path is None:
            missing(f"{name} is not installed")
            raise AssertionError("unreachable")
        found[name] = path
    return found


def require_root() -> None:
    if os.geteuid() != 0:
        missing("this test needs root (network namespaces, devices)")
