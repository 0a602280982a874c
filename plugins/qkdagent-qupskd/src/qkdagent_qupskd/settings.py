"""The `[links.NAME]` options of a `protocol = "qupskd"` link, read without I/O.

listen    = "HOST:PORT"          # quPSKd's qupskd_bind:qupskd_port of the replaced daemon
peer_url  = "http://HOST:PORT"   # the peer's remote_qupskd_url
psk       = { file = "..." }     # quPSKd's `psk` (optional), as a secret reference
initiator_wait / responder_wait / max_wait   # default: interval, interval + 10, reject_after
request_timeout = 10             # one call to the peer, connection to last byte
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from qkdagent import Options, Secret, decimal

from .timers import Waits


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    peer_host: str
    peer_port: int
    peer_url: str
    psk: Secret | None
    initiator_wait: float | None
    responder_wait: float | None
    max_wait: float | None
    request_timeout: float

    def __repr__(self) -> str:
        return f"Settings(listen={self.host}:{self.port}, peer={self.peer_url})"

    def waits(self, interval: float, reject_after: float) -> Waits:
        """quPSKd's 120/130/180 s are the link defaults (interval 120, reject_after 180)."""
        initiator = self.initiator_wait if self.initiator_wait is not None else interval
        responder = self.responder_wait if self.responder_wait is not None else initiator + 10
        maximum = self.max_wait if self.max_wait is not None else reject_after
        return Waits(initiator, responder, maximum)

    def psk_text(self) -> str:
        return "" if self.psk is None else self.psk.reveal().decode("utf-8")


def _host(text: str) -> str | None:
    if not text or not text.isascii() or any(c in text for c in "/@?# \t"):
        return None
    return text.strip("[]")


def split_listen(text: str) -> tuple[str, int] | str:
    host, sep, port = text.rpartition(":")
    checked = _host(host)
    number = decimal(port, 5)
    if not sep or checked is None or number is None or not 0 < number < 65536:
        return 'must be "HOST:PORT" (quPSKd\'s qupskd_bind and qupskd_port)'
    return checked, number


def split_peer_url(text: str) -> tuple[str, int] | str:
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return "is not a URL"
    if parts.scheme != "http":
        return "must be an http:// URL (quPSKd's peer channel is plain HTTP)"
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return "must be http://HOST:PORT without a path, query or user info"
    host = _host(parts.hostname or "")
    if host is None:
        return "has no usable host name"
    return host, port or 80


def read(options: Options) -> Settings:
    listen = split_listen(options.string("listen", max_len=300))
    if isinstance(listen, str):
        options.fail("listen", listen)
    peer_url = options.string("peer_url", max_len=300)
    peer = split_peer_url(peer_url)
    if isinstance(peer, str):
        options.fail("peer_url", peer)
    psk = options.secret("psk", None, encoding="text")
    if psk is not None:
        try:
            psk.reveal().decode("utf-8")
        except UnicodeDecodeError:
            options.fail("psk", "must be UTF-8 text (quPSKd hashes it as a string)")
    waits = {
        name: options.number(name, None, positive=True, max=86400)
        for name in ("initiator_wait", "responder_wait", "max_wait")
    }
    maximum = waits["max_wait"]
    for name in ("initiator_wait", "responder_wait"):
        value = waits[name]
        if value is not None and maximum is not None and value >= maximum:
            options.fail(name, f"must be below max_wait ({maximum:g} s)")
    return Settings(
        host=listen[0],
        port=listen[1],
        peer_host=peer[0],
        peer_port=peer[1],
        peer_url=peer_url.rstrip("/"),
        psk=psk,
        initiator_wait=waits["initiator_wait"],
        responder_wait=waits["responder_wait"],
        max_wait=maximum,
        request_timeout=options.number("request_timeout", 10.0, positive=True, max=300),
    )
