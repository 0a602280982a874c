"""PSK identity templates (pure).

Both agents of a link render the same template from values they share (link name, both agent
names, epoch), so the client offers exactly the identity the server looks up. Identities carry the
epoch by default: that is what lets a server keep the previous epoch's key under its own identity
during the grace period.
"""

from __future__ import annotations

import string

import qkdagent
from qkdagent import Link

DEFAULT_TEMPLATE = "{link}.{epoch}"
CQPTOOLKIT_TEMPLATE = "pkcs:object={object};id={epoch_hex}"
"""cqptoolkit names where a key lives: the PKCS#11 object label (by its convention the client
site's name, `{client}` by default) and the key id (here the epoch in hex)."""

FIELDS = ("link", "epoch", "epoch_hex", "label", "server", "client", "object")
"""Only fields both agents render alike: agent names appear by TLS role, never as local/peer."""


def check_template(template: str, fields: tuple[str, ...] = FIELDS) -> str | None:
    """Return a problem description, or None if `template` only uses known plain fields."""
    return qkdagent.check_template(template, fields)


def uses_epoch(template: str) -> bool:
    return any(
        name in ("epoch", "epoch_hex") for _, name, _, _ in string.Formatter().parse(template)
    )


def render(
    template: str,
    link: Link,
    epoch: int,
    label: str,
    *,
    server_side: bool,
    object_template: str = "{client}",
) -> str:
    """Render an identity; `server_side` says whether this agent feeds the TLS server."""
    server, client = (link.local, link.peer) if server_side else (link.peer, link.local)
    values = {
        "link": link.name,
        "server": server,
        "client": client,
        "epoch": str(epoch),
        "epoch_hex": format(epoch, "x"),
        "label": label,
    }
    values["object"] = object_template.format_map(values)
    return template.format_map(values)
