"""Configs for two agents, `alice` and `bob`, on loopback: the demo's and the test kit's.

`pair_configs` writes a throw-away PKI and a bootstrap secret and returns the two config dicts
(as parsed TOML). Without `sources`, both sides share a fresh simulated link (the `memory`
source, a pool named after the pair). The link is named `alice-bob`; `alice` sorts first and is
the initiator unless `link` sets roles. `qkdagent.testing.open_agent_pair` runs such a pair.
"""

from __future__ import annotations

import base64
import collections
import os
import random
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..fileutil import write_secret_file
from ..pki import write_test_pki

LINK = "alice-bob"
NAMES = ("alice", "bob")
_random = random.SystemRandom()


_handed_out: collections.deque[int] = collections.deque(maxlen=4096)
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_PORTS_BELOW_EPHEMERAL = 16384


def free_port() -> int:
    """A loopback TCP port free right now (the agent binds it with SO_REUSEADDR).

    It is taken from below the kernel's ephemeral range where there is room: a server binding
    port 0, or any outgoing connection, takes its port from that range, and could otherwise be
    given this port between now and the agent's bind (a demo's simulator did, now and then).
    Ports this process handed out recently are never handed out twice: two agents of one pair,
    or a server and its status listener, would otherwise get the same port now and then.
    """
    low, high = _below_ephemeral()
    failed: OSError | None = None
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # (no SO_REUSEADDR: a port a closed connection holds in TIME_WAIT is skipped, so a
            # server that binds without it can take the port too)
            try:
                sock.bind(("127.0.0.1", _random.randrange(low, high) if high > low else 0))
            except OSError as exc:  # in use: try another
                failed = exc
                continue
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.append(port)
            return port
    raise failed or OSError("no free loopback port found")


def _below_ephemeral() -> tuple[int, int]:
    """Ports [low, high) under the ephemeral range, or (0, 0) where it leaves no room."""
    try:
        first = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        first = 32768  # Linux's default
    low = max(1024, first - _PORTS_BELOW_EPHEMERAL)
    return (low, first) if first - low >= 1024 else (0, 0)


def pair_configs(
    directory: Path,
    *,
    alice: Mapping[str, Any] | None = None,
    bob: Mapping[str, Any] | None = None,
    link: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Config dicts (as parsed TOML) for alice and bob, with PKI and bootstrap files written."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = write_test_pki(directory / "pki", list(NAMES))
    bootstrap = directory / "bootstrap.key"
    write_secret_file(bootstrap, base64.b64encode(os.urandom(32)))
    pool = f"pair-{uuid.uuid4().hex[:12]}"
    ports = {name: free_port() for name in NAMES}
    sides = {"alice": dict(alice or {}), "bob": dict(bob or {})}
    configs: dict[str, dict[str, Any]] = {}
    for name, side in sides.items():
        peer = "bob" if name == "alice" else "alice"
        sources = side.get("sources") or {"sim": {"type": "memory", "pool": pool}}
        plugins = list(side.get("plugins", []))
        test_kit = ("memory", "keydir")
        if any(s.get("type") in test_kit for s in sources.values()) and "memory" not in plugins:
            plugins.append("memory")
        link_table = {
            "peer": peer,
            "peer_url": f"https://127.0.0.1:{ports[peer]}",
            "bootstrap": {"file": str(bootstrap)},
            "sources": list(sources),
            "sinks": list(side.get("sinks", {})),
            "interval": 120,
            "reject_after": 180,
            **(link or {}),
            **side.get("link", {}),
        }
        if link_table.get("protocol", "native") != "native":
            # a link of another protocol has its own peer settings (`linkprotocol.py`): drop
            # what this function made up for the native one, keep what the caller gave
            given = {**(link or {}), **side.get("link", {})}
            for key in ("peer_url", "bootstrap"):
                if key not in given:
                    del link_table[key]
        configs[name] = {
            "agent": {
                "name": name,
                "listen": f"127.0.0.1:{ports[name]}",
                "state_dir": str(directory / name / "state"),
                "status_listen": f"127.0.0.1:{free_port()}",
                "plugins": plugins,
                "tls": {
                    "cert": str(pki[name].cert),
                    "key": str(pki[name].key),
                    "ca": str(pki.ca_cert),
                },
                **side.get("agent", {}),
            },
            "links": {LINK: link_table},
            "sources": dict(sources),
            "sinks": dict(side.get("sinks", {})),
        }
    return configs


__all__ = ["LINK", "NAMES", "free_port", "pair_configs"]
