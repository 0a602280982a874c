"""qkdagent-qupskd: quPSKd's peer protocol as a link protocol (`protocol = "qupskd"`), for
migrating from quPSKd one side at a time, and `qkdagent migrate qupskd`.

Thin on purpose: hook implementations only.
"""

from __future__ import annotations

from collections.abc import Callable

import qkdagent
from qkdagent import CommandRegistry, LinkProtocol


@qkdagent.hookimpl
def qkdagent_register_link_protocols(register: Callable[[type[LinkProtocol]], None]) -> None:
    from .protocol import QupskdProtocol

    register(QupskdProtocol)


@qkdagent.hookimpl
def qkdagent_add_commands(cli: CommandRegistry) -> None:
    from .migrate_cli import configure, run

    cli.add(
        "migrate",
        help="write qkdagent configs for a site running quPSKd (migrate qupskd FILE)",
        configure=configure,
        run=run,
    )
