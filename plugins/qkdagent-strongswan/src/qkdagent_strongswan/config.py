"""The sink's options, read and validated without I/O (`qkdagent check` builds every sink)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import qkdagent
from qkdagent import Options

# strongSwan parses a received PPK_ID as an identity: '@', '=' or ':' would turn it into another
# identity type (REFERENCE §3.2), so only plain characters are allowed.
PPK_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,200}")
TEMPLATE_FIELDS = ("link", "sink")
REAUTH_MODES = ("responder", "off")
ERASE_MODES = ("unload", "random")


def check_ppk_id(value: str) -> str | None:
    """Problem with a PPK_ID (or None): strongSwan must read it back as the same plain string."""
    if not PPK_ID_RE.fullmatch(value):
        return "may only contain letters, digits, '.', '_' and '-' (at most 200 characters)"
    return None


def _check_template(value: str) -> str | None:
    problem = qkdagent.check_template(value, TEMPLATE_FIELDS)
    if problem:
        return problem
    return check_ppk_id(value.format(**{name: "x" for name in TEMPLATE_FIELDS}))


def is_template(value: str) -> bool:
    return "{" in value


def render(template: str, *, link: str, sink: str) -> str:
    """Fill `{link}`/`{sink}`; the result must still be a plain id (link names are validated)."""
    return template.format(link=link, sink=sink)


@dataclass(frozen=True)
class PpkConfig:
    socket: Path
    ppk_id: str
    """PPK_ID (template) the peer gateway sends: the secret's owner identity."""
    secret_id: str
    """Unique VICI id (template) of the loaded secret: loading the same id replaces it."""
    ike: str | None
    """IKE connection whose SAs are reauthenticated so that a new PPK takes effect."""
    reauth: str
    reauth_timeout: float
    reauth_retries: int
    reauth_retry_delay: float
    erase: str
    versioned: bool
    keep_versions: int
    check_interval: float
    vici_timeout: float
    strongswan_conf: Path | None
    conn_file: Path | None
    """JSON `load-conn` message for `ike`; re-sent with each epoch's PPK_ID (versioned mode)."""

    @classmethod
    def read(cls, options: Options) -> PpkConfig:
        socket = options.path("socket", Path("/var/run/charon.vici"))
        ppk_id = options.string("ppk_id", check=_check_template, max_len=200)
        secret_id = options.string("secret_id", "qkdagent-{link}", check=_check_template)
        ike = options.string("ike", None, max_len=200, check=_check_template)
        reauth = options.string("reauth", "responder" if ike else "off", choices=REAUTH_MODES)
        if reauth != "off" and ike is None:
            options.fail("reauth", 'needs `ike` (the connection to reauthenticate) or "off"')
        conf = options.path("strongswan_conf", Path("/etc/strongswan.conf"))
        versioned = options.boolean("versioned", False)
        conn_file = options.path("conn_file", None)
        if conn_file is not None and not versioned:
            options.fail("conn_file", "is only used with `versioned = true`")
        if conn_file is not None and (ike is None or is_template(ike)):
            options.fail("conn_file", "needs `ike` naming the one connection the file defines")
        return cls(
            socket=socket,
            ppk_id=ppk_id,
            secret_id=secret_id,
            ike=ike,
            reauth=reauth,
            reauth_timeout=options.number("reauth_timeout", 4.0, min=0.5, max=600),
            reauth_retries=options.integer("reauth_retries", 1, min=0, max=10),
            reauth_retry_delay=options.number("reauth_retry_delay", 0.5, min=0, max=60),
            erase=options.string("erase", "unload", choices=ERASE_MODES),
            versioned=versioned,
            keep_versions=options.integer("keep_versions", 2, min=1, max=16),
            check_interval=options.number("check_interval", 10.0, min=0.1, max=3600),
            vici_timeout=options.number("vici_timeout", 10.0, min=0.1, max=300),
            strongswan_conf=conf,
            conn_file=conn_file,
        )
