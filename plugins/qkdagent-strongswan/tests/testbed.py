"""Two real charon daemons in two network namespaces, for this plugin's tests and benchmark.

Not shipped in the wheel (it lives in tests/). Needs root, `/dev/net/tun`, iproute2 and the
Debian strongSwan packages (charon, swanctl, the kernel-libipsec plugin). The machine's kernel
may lack ESP, so the daemons use kernel-libipsec (a TUN device, ESP in userspace) with UDP
encapsulation.

Layout: namespaces `<prefix>a` and `<prefix>b` joined by a veth pair with outer addresses
192.0.2.1/.2 (TEST-NET-1); each side's protected address (198.51.100.1/.2) sits on its loopback,
so traffic between them only crosses through the tunnel. Every charon gets a private tmpfs on
/run (charon hard-codes /var/run/charon.pid), its own strongswan.conf, swanctl.conf, log file
and VICI socket in a short temp dir (a Unix socket path is limited to 107 bytes).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import vici
import vici.exception

CHARON = "/usr/lib/ipsec/charon"
OUTER = ("192.0.2.1", "192.0.2.2")
INNER = ("198.51.100.1", "198.51.100.2")
IDS = ("gw-a.qkd.test", "gw-b.qkd.test")
CONN = "gw"
"""Name of the default connection (IKE and CHILD SA) between the gateways."""
PPK_ID = "qkd-gw"
"""Its PPK_ID on both sides."""

STRONGSWAN_CONF = """\
charon {{
  load = random nonce openssl aes sha1 sha2 hmac kdf pem pkcs1 x509 pubkey gmp vici \
kernel-libipsec kernel-netlink socket-default
  make_before_break = {mbb}
  retransmit_tries = {retransmit_tries}
  retransmit_timeout = 1.0
  retransmit_base = 1.4
  install_virtual_ip = no
  # many connections between the same two addresses: the per-IP half-open limit (5) and the
  # cookie threshold (10) would otherwise drop or delay bursts of IKE_SA_INITs
  block_threshold = 2000
  cookie_threshold = 2000
  plugins {{
    vici {{
      socket = unix://{vici}
    }}
  }}
  filelog {{
    qkd {{
      path = {log}
      default = 1
      ike = 2
      cfg = 2
      flush_line = yes
      time_format = %T
    }}
  }}
  syslog {{
    daemon {{
      default = -1
    }}
  }}
}}
swanctl {{
  load = random nonce openssl aes sha1 sha2 hmac pem pkcs1 x509 pubkey
}}
"""

CONN_TEMPLATE = """\
  {name} {{
    version = 2
    local_addrs = {local_addr}
    remote_addrs = {remote_addr}
    encap = yes
    mobike = no
    proposals = aes128gcm16-prfsha256-ecp256
    {ppk}
    local {{
      auth = psk
      id = {local_id}
    }}
    remote {{
      auth = psk
      id = {remote_id}
    }}
    children {{
      {name} {{
        local_ts = {local_ts}
        remote_ts = {remote_ts}
        esp_proposals = aes128gcm16
        start_action = none
      }}
    }}
  }}
"""


def _run(*argv: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout)


@dataclass(frozen=True)
class ConnSpec:
    """One IKE connection between the two gateways; ids and selectors differ per connection."""

    name: str
    ppk_id: str | None
    """PPK_ID this side sends (and requires); None: accept any PPK_ID a secret exists for."""
    ppk_required: bool = True
    index: int = 0


@dataclass
class Charon:
    """One charon daemon in its own network namespace."""

    side: str
    netns: str
    directory: Path
    outer: str
    inner: str
    peer_outer: str
    peer_inner: str
    local_id: str
    remote_id: str
    proc: subprocess.Popen[bytes] | None = None
    conns: list[ConnSpec] = field(default_factory=list)

    @property
    def vici_path(self) -> Path:
        return self.directory / "charon.vici"

    @property
    def log_path(self) -> Path:
        return self.directory / "charon.log"

    @property
    def swanctl_conf(self) -> Path:
        return self.directory / "swanctl.conf"

    @property
    def strongswan_conf(self) -> Path:
        return self.directory / "strongswan.conf"

    def session(self) -> vici.Session:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(str(self.vici_path))
        return vici.Session(sock)

    def initiate(self, name: str, timeout: float = 10) -> bool:
        """Bring up IKE SA and CHILD SA `name`; False when charon reports a failure."""
        session = self.session()
        try:
            message = {"ike": name, "child": name, "timeout": str(int(timeout * 1000))}
            for _ in session.initiate(message):
                pass
            return True
        except vici.exception.CommandException:
            return False
        finally:
            session.transport.close()

    def initiate_nowait(self, names: list[str]) -> None:
        """Start IKE SAs without waiting (a waiting initiate pins one of charon's threads)."""
        session = self.session()
        try:
            for name in names:
                for _ in session.initiate({"ike": name, "child": name, "timeout": "-1"}):
                    pass
        finally:
            session.transport.close()

    def terminate(self, name: str, timeout: float = 10) -> None:
        """Tear down every IKE SA of connection `name` (no error if there is none)."""
        session = self.session()
        try:
            for _ in session.terminate({"ike": name, "timeout": str(int(timeout * 1000))}):
                pass
        except vici.exception.CommandException:
            pass
        finally:
            session.transport.close()

    def fresh_initiate(self, name: str, timeout: float = 10) -> bool:
        """Set up a brand-new IKE SA (a plain initiate would reuse an existing one)."""
        self.terminate(name)
        return self.initiate(name, timeout)

    def sas(self, name: str | None = None) -> list[dict[str, object]]:
        session = self.session()
        try:
            return ike_sas(session, name)
        finally:
            session.transport.close()

    def shared_ids(self) -> set[str]:
        session = self.session()
        try:
            return {k.decode() for k in session.get_shared().get("keys", [])}
        finally:
            session.transport.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def swanctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "STRONGSWAN_CONF": str(self.strongswan_conf),
        }
        return subprocess.run(
            [
                "swanctl",
                *args,
                "--uri",
                f"unix://{self.vici_path}",
                "--file",
                str(self.swanctl_conf),
            ],
            capture_output=True,
            text=True,
            check=check,
            timeout=30,
            env=env,
        )

    def netns_exec(
        self, *argv: str, check: bool = True, timeout: float = 20
    ) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", self.netns, *argv, check=check, timeout=timeout)

    def ping(
        self, count: int = 1, wait: float = 1.0, interval: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Ping the peer's protected address from ours (crosses only through the tunnel)."""
        argv = ["ping", "-n", "-c", str(count), "-W", str(wait), "-I", self.inner]
        if interval is not None:
            argv += ["-i", str(interval)]
        return self.netns_exec(*argv, self.peer_inner, check=False, timeout=count * 2 + wait + 10)

    def write_configs(self, psk: str, *, make_before_break: bool, retransmit_tries: int) -> None:
        self.strongswan_conf.write_text(
            STRONGSWAN_CONF.format(
                mbb="yes" if make_before_break else "no",
                vici=self.vici_path,
                log=self.log_path,
                retransmit_tries=retransmit_tries,
            )
        )
        self.write_swanctl(psk)

    def write_swanctl(self, psk: str) -> None:
        blocks = []
        for conn in self.conns:
            ppk = ""
            if conn.ppk_id is not None:
                ppk += f"ppk_id = {conn.ppk_id}\n    "
            ppk += f"ppk_required = {'yes' if conn.ppk_required else 'no'}"
            blocks.append(
                CONN_TEMPLATE.format(
                    name=conn.name,
                    local_addr=self.outer,
                    remote_addr=self.peer_outer,
                    ppk=ppk,
                    local_id=_conn_id(self.local_id, conn.index),
                    remote_id=_conn_id(self.remote_id, conn.index),
                    local_ts=_conn_ts(self.inner, conn.index),
                    remote_ts=_conn_ts(self.peer_inner, conn.index),
                )
            )
        text = "connections {\n" + "".join(blocks) + "}\n"
        text += f"secrets {{\n  ike-qkdtest {{\n    secret = {psk}\n  }}\n}}\n"
        self.swanctl_conf.write_text(text)
        os.chmod(self.swanctl_conf, 0o600)

    def conn_message(self, conn: ConnSpec) -> dict[str, object]:
        """The VICI `load-conn` message equivalent to this side's swanctl.conf entry (no ppk_id)."""
        body: dict[str, object] = {
            "version": "2",
            "local_addrs": [self.outer],
            "remote_addrs": [self.peer_outer],
            "encap": "yes",
            "mobike": "no",
            "proposals": ["aes128gcm16-prfsha256-ecp256"],
            "ppk_required": "yes" if conn.ppk_required else "no",
            "local": {"auth": "psk", "id": _conn_id(self.local_id, conn.index)},
            "remote": {"auth": "psk", "id": _conn_id(self.remote_id, conn.index)},
            "children": {
                conn.name: {
                    "local_ts": [_conn_ts(self.inner, conn.index)],
                    "remote_ts": [_conn_ts(self.peer_inner, conn.index)],
                    "esp_proposals": ["aes128gcm16"],
                    "start_action": "none",
                }
            },
        }
        return {conn.name: body}

    def start(self, timeout: float = 15) -> None:
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "STRONGSWAN_CONF": str(self.strongswan_conf),
        }
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.netns,
                "sh",
                "-c",
                f"mount -t tmpfs qkdtest /run && exec {CHARON}",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.directory / "charon.stderr", "wb"),
        )
        wait_until(
            self._vici_ready,
            timeout,
            lambda: f"charon {self.side} did not open VICI:\n{self.log()[-2000:]}",
        )

    def _vici_ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"charon {self.side} exited ({self.proc.returncode}): {self.log()[-2000:]}"
            )
        try:
            s = self.session()
        except OSError:
            return False
        s.version()
        s.transport.close()
        return True

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def cpu_seconds(self) -> float:
        """User+system CPU time of the charon process (the `exec`ed child of ip netns exec)."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _conn_id(base: str, index: int) -> str:
    return base if index == 0 else f"c{index}.{base}"


def _conn_ts(inner: str, index: int) -> str:
    if index == 0:
        return f"{inner}/32"
    # extra connections protect distinct ports of the same hosts
    return f"{inner}/32[udp/{10000 + index}]"


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    message: Callable[[], str] | str,
    step: float = 0.05,
) -> None:
    """Poll `predicate` until it is true or `timeout` passes (bounded; for external processes)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(message() if callable(message) else message)
        time.sleep(step)


@dataclass
class Testbed:
    """Both gateways; build with `Testbed.open(...)` as a context manager."""

    __test__ = False  # not a pytest test class

    prefix: str
    directory: Path
    a: Charon
    b: Charon

    @classmethod
    @contextlib.contextmanager
    def open(
        cls,
        conns_a: list[ConnSpec],
        conns_b: list[ConnSpec],
        *,
        make_before_break: bool = True,
        retransmit_tries: int = 2,
        start: bool = True,
    ) -> Iterator[Testbed]:
        suffix = secrets.token_hex(3)
        prefix = f"qsw{suffix}"
        directory = Path(tempfile.mkdtemp(prefix=f"qsw-{suffix}-"))
        psk = "0x" + secrets.token_hex(32)
        a = Charon(
            "a",
            prefix + "a",
            directory / "a",
            OUTER[0],
            INNER[0],
            OUTER[1],
            INNER[1],
            IDS[0],
            IDS[1],
            conns=conns_a,
        )
        b = Charon(
            "b",
            prefix + "b",
            directory / "b",
            OUTER[1],
            INNER[1],
            OUTER[0],
            INNER[0],
            IDS[1],
            IDS[0],
            conns=conns_b,
        )
        bed = cls(prefix, directory, a, b)
        try:
            bed._network()
            for side in (a, b):
                side.directory.mkdir(mode=0o700)
                side.write_configs(
                    psk, make_before_break=make_before_break, retransmit_tries=retransmit_tries
                )
            if start:
                for side in (a, b):
                    side.start()
                    side.swanctl("--load-all", "--noprompt")
            yield bed
        finally:
            bed.close()

    def _network(self) -> None:
        a, b = self.a, self.b
        _run("ip", "netns", "add", a.netns)
        _run("ip", "netns", "add", b.netns)
        _run(
            "ip",
            "link",
            "add",
            f"{self.prefix}va",
            "netns",
            a.netns,
            "type",
            "veth",
            "peer",
            "name",
            f"{self.prefix}vb",
            "netns",
            b.netns,
        )
        for side, dev in ((a, f"{self.prefix}va"), (b, f"{self.prefix}vb")):
            side.netns_exec("ip", "addr", "add", f"{side.outer}/24", "dev", dev)
            side.netns_exec("ip", "link", "set", dev, "up")
            side.netns_exec("ip", "link", "set", "lo", "up")
            side.netns_exec("ip", "addr", "add", f"{side.inner}/32", "dev", "lo")

    def close(self) -> None:
        for side in (self.a, self.b):
            with contextlib.suppress(Exception):
                side.stop()
        for side in (self.a, self.b):
            _run("ip", "netns", "del", side.netns, check=False)
        shutil.rmtree(self.directory, ignore_errors=True)

    def sides(self) -> tuple[Charon, Charon]:
        return self.a, self.b


def ike_sas(session: vici.Session, name: str | None = None) -> list[dict[str, object]]:
    """`list-sas` flattened to a list of IKE SA dicts (with their `name`), decoded to str."""
    out: list[dict[str, object]] = []
    filters = {"ike": name} if name else None
    for entry in session.list_sas(filters):
        for sa_name, sa in entry.items():
            item = _decode(sa)
            assert isinstance(item, dict)
            item["name"] = sa_name
            out.append(item)
    return out


def _decode(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


PPK_LOG = re.compile(r"using PPK for PPK_ID '([^']*)'")


def ppk_log_count(charon: Charon, ppk_id: str | None = None) -> int:
    """How often this charon logged that it used a PPK (optionally for one PPK_ID)."""
    return sum(1 for m in PPK_LOG.finditer(charon.log()) if ppk_id is None or m.group(1) == ppk_id)


def established(charon: Charon, conn: str = CONN) -> list[dict[str, object]]:
    """The ESTABLISHED IKE SAs of `conn` on one daemon."""
    return [sa for sa in charon.sas(conn) if sa["state"] == "ESTABLISHED"]


async def poll_until(predicate: Callable[[], bool], limit: float) -> None:
    """Bounded real-time polling of an external process's state (charon, agents) from trio."""
    import trio  # only the async tests need it

    with trio.fail_after(limit):
        while True:
            if predicate():
                return
            await trio.sleep(0.05)
