"""A quPSKd daemon for the tests, written from REFERENCE §11 (its observed behaviour), not from
its code: plain HTTP `GET /new`, `/rotate`, `/ack` and, with `enable_fake_qkd_api`, the fake
014 KME under `/api/v1/keys/` (every path, status included: a fresh key container whose key is
base64(SHA3-256(key_ID))); a client loop ticking once a second with its 120/130/180 s timers;
the PSK file as 44 characters of base64 without newline.

Runs in-process on any `Network` (virtual clock) or as a process on TCP:
`python qupskd_peer.py CONFIG.toml` (CONFIG is a quPSKd config file).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio

IDENTITY = "quPSKd Version 1"


def h(parts: list[str]) -> str:
    return base64.b64encode(hashlib.sha3_256("".join(sorted(parts)).encode()).digest()).decode()


def fake_key(key_id: str) -> str:
    return base64.b64encode(hashlib.sha3_256(key_id.encode()).digest()).decode()


def fake_kme(target: str, shared: dict[str, bytes] | None = None) -> tuple[int, bytes]:
    """quPSKd's fake KME. With `shared` (in-process tests: the key store of the agent's test-kit
    `memory` source), it is one end of a KME pair: a key it hands out is also left there for
    the agent, and a key the agent's source left there is the one it returns for that ID."""
    parts = urlsplit(target)
    ids = parse_qs(parts.query).get("key_ID")
    if parts.path.endswith("dec_keys"):
        if not ids:
            return 400, b"key_ID parameter is required"
        key_id = ids[0]
        key = fake_key(key_id)
        held = shared.pop(key_id, None) if shared is not None else None
        if held is not None:
            key = base64.b64encode(held).decode()
    else:
        key_id = str(uuid.uuid4())
        key = fake_key(key_id)
        if shared is not None:
            shared[key_id] = base64.b64decode(key)
    return 200, json.dumps({"keys": [{"key": key, "key_ID": key_id}]}).encode()


async def http_get(network: Any, url: str) -> tuple[int, bytes]:
    parts = urlsplit(url)
    stream = await network.connect(parts.hostname, parts.port or 80)
    try:
        conn = h11.Connection(h11.CLIENT)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        await stream.send_all(
            conn.send(h11.Request(method="GET", target=target, headers=[("Host", parts.netloc)]))
            + conn.send(h11.EndOfMessage())
        )
        status, body = 0, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, body
    finally:
        await trio.aclose_forcefully(stream)


@dataclass
class Peer:
    config: dict[str, Any]
    network: Any
    psk_file: Path | None = None
    initiator_wait: int = 120
    responder_wait: int = 130
    max_wait: int = 180
    tick: float = 1.0
    psk: str = ""
    key: str | None = None
    key_id: str | None = None
    last: float | None = None
    """trio time of the last PSK install (quPSKd's last_rotate counter, as a time)."""
    initiator: bool = False
    rotations: int = 0
    history: list[str] = field(default_factory=list)
    served: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    client_enabled: bool = True
    installed: trio.Event = field(default_factory=trio.Event)
    shared: dict[str, bytes] | None = None
    """The agent's memory source's key store, for the fake KME (in-process tests)."""
    override: Any = None
    """Tests: target -> (status, body) to answer instead (a hostile peer), or None."""

    def __post_init__(self) -> None:
        self.psk = self.initial()
        if self.psk_file is None and "key_folder" in self.config:
            folder = Path(self.config["key_folder"])
            folder.mkdir(parents=True, exist_ok=True)
            self.psk_file = folder / f"{self.config['alias']}.key"

    def peer_calls(self) -> list[str]:
        """The protocol requests served (not the fake KME's)."""
        return [t for t in self.served if not t.startswith("/api/")]

    def initial(self) -> str:
        return h([self.config.get("psk", ""), IDENTITY])

    def install(self) -> None:
        self.history.append(self.psk)
        self.rotations += 1
        if self.psk_file is not None:
            self.psk_file.write_bytes(self.psk.encode())
        self.last = trio.current_time()
        self.installed.set()
        self.installed = trio.Event()

    def derive(self) -> None:
        assert self.key is not None and self.key_id is not None
        self.psk = h([self.key, self.key_id, self.psk])
        self.install()

    async def fetch_kme(self, operation: str) -> None:
        url = f"{self.config['etsi_url']}/api/v1/keys/{self.config['remote_SAE_ID']}/{operation}"
        status, body = await http_get(self.network, url)
        if status != 200:
            raise RuntimeError(f"KME answered {status}")
        first = json.loads(body)["keys"][0]
        self.key_id, self.key = first["key_ID"], first["key"]

    # -- server ------------------------------------------------------------------------

    async def respond(self, target: str) -> tuple[int, bytes]:
        self.served.append(target)
        if self.override is not None:
            answer = self.override(target)
            if answer is not None:
                return answer
        if target in ("/new", "/rotate"):
            if target == "/new":
                self.psk = self.initial()
            await self.fetch_kme("enc_keys?number=1")
            self.initiator = False
            return 200, json.dumps({"status": "ok", "key_ID": self.key_id}).encode()
        if target == "/ack":
            self.derive()
            return 200, json.dumps({"status": "ok"}).encode()
        if target.startswith("/api/v1/keys/") and self.config.get("enable_fake_qkd_api"):
            return fake_kme(target, self.shared)
        return 404, b"404 Not Found"

    async def handle(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    try:
                        status, body = await self.respond(event.target.decode())
                    except Exception as exc:  # quPSKd's handler thread dies: no answer
                        self.errors.append(f"serve: {exc!r}")
                        return
                    headers = [("Content-Length", str(len(body))), ("Connection", "close")]
                    await stream.send_all(
                        conn.send(h11.Response(status_code=status, headers=headers))
                        + conn.send(h11.Data(data=body))
                        + conn.send(h11.EndOfMessage())
                    )
                    return
                else:
                    return
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    # -- client loop (its timers) --------------------------------------------------------

    async def loop(self) -> None:
        """quPSKd counts seconds in a 1 s loop; this sleeps until the same moments instead, so
        a virtual clock has few wake-ups. `last` None = never rotated: call at once."""
        remote = self.config["remote_qupskd_url"]
        while True:
            now = trio.current_time()
            try:
                if self.last is not None and now - self.last > self.max_wait:
                    self.psk = h([uuid.uuid4().hex])
                    self.install()
                    continue
                wait = self.initiator_wait if self.initiator else self.responder_wait
                if not self.client_enabled or (self.last is not None and now - self.last < wait):
                    base = now if self.last is None else self.last
                    due = base + (self.max_wait + self.tick if not self.client_enabled else wait)
                    with trio.move_on_at(min(due, base + self.max_wait + self.tick)):
                        await self.installed.wait()
                    continue
                self.initiator = True
                path = "/new" if not self.key_id else "/rotate"
                status, body = await http_get(self.network, f"{remote}{path}")
                if status != 200:
                    raise RuntimeError(f"peer answered {status} to {path}")
                self.key_id = json.loads(body).get("key_ID")
                await self.fetch_kme(f"dec_keys?key_ID={self.key_id}")
                status, _ = await http_get(self.network, f"{remote}/ack")
                if status != 200:
                    raise RuntimeError(f"peer answered {status} to /ack")
                self.derive()
            except Exception as exc:
                self.errors.append(f"loop: {exc!r}"[:200])
                await trio.sleep(self.tick)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                self.network.serve, self.config["qupskd_bind"], self.config["qupskd_port"],
                self.handle,
            )  # fmt: skip
            task_status.started()
            await self.loop()


async def serve_kme(network: Any, host: str, port: int) -> None:
    """Only the fake KME (like quPSKd's qkd_simulator.py)."""
    peer = Peer({"enable_fake_qkd_api": True, "remote_SAE_ID": "x"}, network)
    await network.serve(host, port, peer.handle)


def main() -> None:
    from qkdagent_qupskd.net import TcpNetwork

    if sys.argv[1] == "--kme":
        host, _, port = sys.argv[2].rpartition(":")
        trio.run(serve_kme, TcpNetwork(), host, int(port))
        return
    config = tomllib.loads(Path(sys.argv[1]).read_text())
    waits = [int(x) for x in os.environ.get("QUPSKD_TEST_WAITS", "120,130,180").split(",")]
    tick = float(os.environ.get("QUPSKD_TEST_TICK", "1"))
    peer = Peer(config, TcpNetwork(), initiator_wait=waits[0], responder_wait=waits[1],
                max_wait=waits[2], tick=tick)  # fmt: skip
    trio.run(peer.run)


if __name__ == "__main__":
    main()
