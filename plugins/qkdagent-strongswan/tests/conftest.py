"""Fixtures: two real charons in two fresh network namespaces, and sinks pointed at them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qkdagent_strongswan import StrongswanPpkSink

from qkdagent import ComponentEvent, Link, PluginContext
from qkdagent.testing import build_component, require_binary, require_root
from qkdagent.testing.pytest_plugin import install_logging_guard

from .testbed import CONN, PPK_ID, Charon, ConnSpec, Testbed


def pytest_configure(config: pytest.Config) -> None:
    """Also when this directory runs alone (a conftest below the root cannot use
    `pytest_plugins`): no test leaves a logging handler on a closed stream."""
    install_logging_guard(config)


def require_lab() -> None:
    require_root()
    require_binary("ip", "swanctl", "charon", "ping")
    if not Path("/dev/net/tun").exists():
        from qkdagent.testing import missing

        missing("/dev/net/tun is missing (kernel-libipsec needs it)")


@pytest.fixture
def lab_conns() -> tuple[list[ConnSpec], list[ConnSpec]]:
    """Override in a module to change the connections of the two gateways."""
    return [ConnSpec(CONN, PPK_ID)], [ConnSpec(CONN, PPK_ID)]


@pytest.fixture
def make_before_break() -> bool:
    return True


@pytest.fixture
def lab_ready() -> None:
    """Fail under CI (skip elsewhere) when root, iproute2, strongSwan or /dev/net/tun is missing."""
    require_lab()


@pytest.fixture
def bed(
    lab_ready: None, lab_conns: tuple[list[ConnSpec], list[ConnSpec]], make_before_break: bool
) -> Iterator[Testbed]:
    with Testbed.open(*lab_conns, make_before_break=make_before_break) as testbed:
        yield testbed


@pytest.fixture
def reported() -> list[ComponentEvent]:
    """What the sinks built by `make_sink` reported to their agent (`context.report`)."""
    return []


@pytest.fixture
def make_sink(
    tmp_path: Path, reported: list[ComponentEvent]
) -> Iterator[Callable[..., StrongswanPpkSink]]:
    """`make_sink(charon, **options)`: a sink for that charon (not yet prepared)."""

    def make(
        charon: Charon, name: str = "ppk", links: tuple[Link, ...] = (), **options: Any
    ) -> StrongswanPpkSink:
        table: dict[str, Any] = {
            "socket": str(charon.vici_path),
            "ppk_id": PPK_ID,
            "ike": CONN,
            "strongswan_conf": str(charon.strongswan_conf),
            "reauth_timeout": 8,
        }
        table.update(options)
        table = {k: v for k, v in table.items() if v is not None}
        context = PluginContext(f"agent-{charon.side}", tmp_path, reporter=reported.append)
        return build_component(StrongswanPpkSink, table, name=name, context=context, links=links)

    yield make
