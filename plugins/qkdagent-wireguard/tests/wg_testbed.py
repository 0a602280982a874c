"""Throw-away WireGuard topologies for tests and benchmarks (root, Linux).

Two network namespaces joined by a veth pair, with a WireGuard interface in each: wireguard-go
(userspace, controlled over its UAPI socket) or kernel WireGuard (netlink). Names carry a random
suffix so parallel runs do not collide; `close()` kills the processes it started (by PID) and
deletes the namespaces it created (by name). Private keys go to 0600 files, never on argv.
Only addresses inside these namespaces are used.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def run(*argv: str, ns: str | None = None, input: bytes | None = None) -> str:
    """Run a command (in namespace `ns`), returning stdout; raise with stderr on failure."""
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    proc = subprocess.run(cmd, input=input, capture_output=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}"
        )
    return proc.stdout.decode()


def genkey() -> tuple[bytes, bytes]:
    """A WireGuard key pair (private, public) made by `wg genkey`/`wg pubkey`."""
    private = base64.b64decode(run("wg", "genkey").strip())
    public = base64.b64decode(run("wg", "pubkey", input=base64.b64encode(private) + b"\n").strip())
    return private, public


def wait_for(predicate, timeout: float, interval: float = 0.02, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    """Poll `predicate` until true or raise TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Node:
    ns: str | None
    """None: the caller's own namespace (so an in-process netlink sink can reach the interface)."""
    iface: str
    veth: str
    underlay: str
    tunnel: str
    private: bytes
    public: bytes
    port: int
    keyfile: Path
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def public_text(self) -> str:
        return base64.b64encode(self.public).decode()

    def ip(self, *args: str) -> str:
        return run("ip", *(["-n", self.ns] if self.ns else []), *args)

    def wg(self, *args: str, input: bytes | None = None) -> str:
        return run("wg", *args, ns=self.ns, input=input)

    def psk_of(self, peer: Node) -> bytes | None:
        """The PSK this node holds for `peer`, read through `wg show ... preshared-keys`."""
        for line in self.wg("show", self.iface, "preshared-keys").splitlines():
            pub, _, psk = line.partition("\t")
            if pub == peer.public_text:
                return None if psk.strip() == "(none)" else base64.b64decode(psk.strip())
        raise LookupError(f"{self.iface} has no peer {peer.public_text}")

    def latest_handshake(self, peer: Node) -> int:
        for line in self.wg("show", self.iface, "latest-handshakes").splitlines():
            pub, _, when = line.partition("\t")
            if pub == peer.public_text:
                return int(when.strip())
        raise LookupError(f"{self.iface} has no peer {peer.public_text}")

    def allowed_ips(self, peer: Node) -> str:
        for line in self.wg("show", self.iface, "allowed-ips").splitlines():
            pub, _, ips = line.partition("\t")
            if pub == peer.public_text:
                return ips.strip()
        raise LookupError(f"{self.iface} has no peer {peer.public_text}")

    def add_peer(self, peer: Node, psk: bytes | None, keydir: Path) -> None:
        args = [
            "set", self.iface, "peer", peer.public_text,
            "allowed-ips", f"{peer.tunnel}/32",
            "endpoint", f"{peer.underlay}:{peer.port}",
        ]  # fmt: skip
        if psk is not None:
            pskfile = keydir / f"psk-{self.iface}"
            fd = os.open(pskfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(base64.b64encode(psk).decode() + "\n")
            try:
                self.wg(*args, "preshared-key", str(pskfile))
            finally:
                pskfile.unlink()
        else:
            self.wg(*args)

    def set_psk(self, peer: Node, psk: bytes, keydir: Path) -> None:
        """Set the PSK with `wg set` (the test's stand-in for the far side's agent)."""
        pskfile = keydir / f"psk-{self.iface}"
        fd = os.open(pskfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(base64.b64encode(psk).decode() + "\n")
        try:
            self.wg("set", self.iface, "peer", peer.public_text, "preshared-key", str(pskfile))
        finally:
            pskfile.unlink()

    def reset_session(self, peer: Node, keydir: Path) -> None:
        """Drop the current session by removing and re-adding the peer, keeping its PSK."""
        psk = self.psk_of(peer)
        self.wg("set", self.iface, "peer", peer.public_text, "remove")
        self.add_peer(peer, psk, keydir)

    def ping(self, peer: Node, timeout: float) -> bool:
        """True once a ping crosses the tunnel to `peer` within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            prefix = ["ip", "netns", "exec", self.ns] if self.ns else []
            proc = subprocess.run(
                [*prefix, "ping", "-c1", "-W1", "-q", peer.tunnel],
                capture_output=True,
                timeout=10,
                check=False,
            )
            if proc.returncode == 0:
                return True
        return False


@dataclass
class Pair:
    """Two namespaces with one WireGuard interface each, peered with each other."""

    workdir: Path
    kernel: bool = False
    a_in_caller_ns: bool = False
    """Put side a in the caller's namespace instead of a new one (kernel netlink tests)."""
    log_level: str = "debug"
    """wireguard-go's LOG_LEVEL: tests read its debug log; benchmarks use the default, "error"."""
    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    a: Node | None = None
    b: Node | None = None
    namespaces: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    kernel_links: list[Node] = field(default_factory=list)

    def open(self, psk_a: bytes | None = None, psk_b: bytes | None = None) -> Pair:
        net = 16 + secrets.randbelow(200)
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)
        s = self.suffix
        nodes = []
        for side, host in (("a", 1), ("b", 2)):
            private, public = genkey()
            keyfile = self.workdir / f"private-{side}"
            fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(base64.b64encode(private).decode() + "\n")
            in_caller = side == "a" and self.a_in_caller_ns
            node = Node(
                ns=None if in_caller else f"qkdwg{side}-{s}",
                iface=f"wq{side}{s}",
                veth=f"vq{side}{s}",
                underlay=f"10.213.{net}.{host}",
                tunnel=f"10.214.{net}.{host}",
                private=private,
                public=public,
                port=51820 + host,
                keyfile=keyfile,
            )
            if node.ns is not None:
                run("ip", "netns", "add", node.ns)
                self.namespaces.append(node.ns)
                node.ip("link", "set", "lo", "up")
            nodes.append(node)
        self.a, self.b = nodes
        a, b = nodes
        a_end = [a.veth, *(["netns", a.ns] if a.ns else [])]
        b_end = [b.veth, *(["netns", b.ns] if b.ns else [])]
        run("ip", "link", "add", *a_end, "type", "veth", "peer", *b_end)
        for node in nodes:
            node.ip("addr", "add", f"{node.underlay}/24", "dev", node.veth)
            node.ip("link", "set", node.veth, "up")
            self._start_wireguard(node)
            node.wg(
                "set", node.iface, "listen-port", str(node.port), "private-key", str(node.keyfile)
            )
            node.ip("addr", "add", f"{node.tunnel}/24", "dev", node.iface)
            node.ip("link", "set", node.iface, "up")
        a.add_peer(b, psk_a, self.workdir)
        b.add_peer(a, psk_b, self.workdir)
        return self

    def fresh_handshake(self, timeout: float = 6.0) -> bool:
        """Drop both sessions (peers re-added with the PSKs they hold) and ping across."""
        assert self.a is not None and self.b is not None
        self.a.reset_session(self.b, self.workdir)
        self.b.reset_session(self.a, self.workdir)
        return self.a.ping(self.b, timeout)

    def _start_wireguard(self, node: Node) -> None:
        if self.kernel:
            node.ip("link", "add", node.iface, "type", "wireguard")
            self.kernel_links.append(node)
            return
        assert node.ns is not None, "wireguard-go nodes get their own namespace"
        node.log = self.workdir / f"wireguard-go-{node.iface}.log"
        with open(node.log, "wb") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", node.ns, "wireguard-go", "-f", node.iface],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "LOG_LEVEL": self.log_level},
            )
        node.proc = proc
        self.procs.append(proc)
        sock = Path("/run/wireguard") / f"{node.iface}.sock"
        wait_for(lambda: sock.is_socket() or proc.poll() is not None, 10, what=f"{sock} to appear")
        if proc.poll() is not None:
            raise RuntimeError(f"wireguard-go for {node.iface} exited: {node.log.read_text()}")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        for node in self.kernel_links:
            if node.ns is None:
                subprocess.run(["ip", "link", "del", node.iface], capture_output=True, check=False)
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        for node in (self.a, self.b):
            if node is not None:
                Path(f"/run/wireguard/{node.iface}.sock").unlink(missing_ok=True)

    def __enter__(self) -> Pair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
