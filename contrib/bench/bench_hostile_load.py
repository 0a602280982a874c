#!/usr/bin/env python3
"""Rotations kept under a hostile load on the peer port (issue 11, defect 6).

Starts an agent pair as processes on loopback (keydir source, file sinks, `--interval`
between rotations, both at `--nofile` descriptors, 1,024 like a default systemd service),
measures the quiet rotation rate, then holds against the responder's peer port:

- `--idle` plain TCP connections that never send a byte (reopened as soon as the server
  closes one, so the attacker keeps its count up all the time);
- `--slow` trickling connections, half plain TCP dribbling garbage before any TLS, half with a
  CA-signed certificate ("mallory") dribbling a request body, 1 byte per second; reopened too;
- `--flood` kept-alive mallory connections sending forged requests back to back (garbage,
  well-formed rotates with forged MACs, unknown links, oversized bodies).

It prints the rotations per second quiet and under attack, their ratio (target >= 90 % with
2,000 hostile connections), the attack's own counts, and each agent's peak descriptors and
peak RSS (from /proc). Everything stays on 127.0.0.0/8 and stops by itself after
`--quiet` + `--attack` seconds (plus start-up, a minute or two in all).

The attacker runs in this process, on the same cores as the agents. To tell "the attacker
takes CPU from the agents" from "the server degrades", it can be confined: `--nice 19` (it gets
only CPU the agents leave), `--attacker-cpus 1 --agent-cpus 0` (separate cores). Each window
also prints the CPU of alice, bob, the attacker and everything else on the machine (other
people's jobs make the figures noisy: repeat), and the rotation latency seen in the agents' logs.

    python3 contrib/bench/bench_hostile_load.py [--idle 1000 --slow 1000 --flood 8]
        [--nice 19] [--attacker-cpus 1 --agent-cpus 0]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import resource
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import httpx
import trio

from qkdagent.testing import config_toml, pair_configs, write_test_pki

LINK = "alice-bob"
_COMMITTED = re.compile(r"committed \((?:initiator|responder)\) in ([0-9.]+) ms")


def cpu_seconds(pid: int | str = "self") -> float:
    """CPU seconds a process used so far (user + system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy so far (all cores, from /proc/stat)."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cpus(text: str | None) -> set[int] | None:
    return {int(x) for x in text.split(",")} if text else None


def percentiles(values: list[float]) -> str:
    if not values:
        return "no rotations logged"
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return (
        f"n={len(ordered)} p50 {at(0.5):.0f} p90 {at(0.9):.0f} p99 {at(0.99):.0f} "
        f"max {ordered[-1]:.0f} ms"
    )


@dataclass
class Window:
    """CPU and log offsets at the start of a measuring window; `close` gives the figures."""

    agents: dict[str, Agent]
    cpu: dict[str, float] = field(default_factory=dict)
    logs: dict[str, int] = field(default_factory=dict)
    started: float = 0.0

    def __post_init__(self) -> None:
        self.started = time.monotonic()
        self.cpu = {n: cpu_seconds(a.proc.pid) for n, a in self.agents.items()}
        self.cpu["attacker"] = cpu_seconds()
        self.cpu["machine"] = machine_busy()
        self.logs = {n: a.log_size() for n, a in self.agents.items()}

    def close(self) -> tuple[dict[str, float], dict[str, list[float]], float]:
        """Cores used per process (and by everything else), rotation durations (ms) and the
        window's length (s)."""
        seconds = time.monotonic() - self.started
        now = {n: cpu_seconds(a.proc.pid) for n, a in self.agents.items()}
        now["attacker"] = cpu_seconds()
        now["machine"] = machine_busy()
        used = {n: (now[n] - self.cpu[n]) / seconds for n in now}
        used["others"] = used["machine"] - sum(used[n] for n in ("alice", "bob", "attacker"))
        durations = {n: a.durations(self.logs[n], a.log_size()) for n, a in self.agents.items()}
        return used, durations, seconds


@dataclass
class Agent:
    name: str
    proc: subprocess.Popen[bytes]
    status_url: str
    peer_port: int
    log: Path
    peak_fds: int = 0
    peak_rss_kib: int = 0

    def log_size(self) -> int:
        return self.log.stat().st_size

    def durations(self, start: int, end: int) -> list[float]:
        """Rotation durations (ms) this agent logged between two log offsets."""
        with self.log.open("rb") as f:
            f.seek(start)
            text = f.read(end - start).decode(errors="replace")
        return [float(ms) for ms in _COMMITTED.findall(text)]

    def sample(self) -> None:
        try:
            self.peak_fds = max(self.peak_fds, len(os.listdir(f"/proc/{self.proc.pid}/fd")))
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):  # the kernel's own peak RSS
                    self.peak_rss_kib = max(self.peak_rss_kib, int(line.split()[1]))
        except (OSError, ValueError):
            pass


@dataclass
class Attack:
    opened: int = 0
    closed_by_server: int = 0
    forged: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0


def start_agents(
    directory: Path, interval: float, nofile: int, agent_cpus: set[int] | None
) -> dict[str, Agent]:
    pki = write_test_pki(directory / "ca", ["alice", "bob", "mallory"])
    sides: dict[str, dict[str, Any]] = {}
    for name in ("alice", "bob"):
        sides[name] = {
            "sources": {"sim": {"type": "keydir", "directory": str(directory / "keys")}},
            "sinks": {"psk": {"type": "file", "path": str(directory / f"{name}.psk")}},
            "agent": {
                "tls": {
                    "cert": str(pki[name].cert),
                    "key": str(pki[name].key),
                    "ca": str(pki.ca_cert),
                }
            },
        }
    link = {"interval": interval, "jitter": 0, "reject_after": 120}
    configs = pair_configs(directory, alice=sides["alice"], bob=sides["bob"], link=link)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        if agent_cpus:
            os.sched_setaffinity(0, agent_cpus)

    agents = {}
    for name in ("bob", "alice"):
        path = directory / f"{name}.toml"
        path.write_text(config_toml(configs[name]))
        proc = subprocess.Popen(
            [sys.executable, "-m", "qkdagent", "run", "-c", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(directory / f"{name}.log", "ab"),
            preexec_fn=limit,
        )
        agent = configs[name]["agent"]
        agents[name] = Agent(
            name,
            proc,
            f"http://{agent['status_listen']}/status",
            int(agent["listen"].rsplit(":", 1)[1]),
            directory / f"{name}.log",
        )
    return agents


async def epoch(http: httpx.AsyncClient, agent: Agent) -> int | None:
    try:
        status = (await http.get(agent.status_url, timeout=2)).json()
    except (httpx.HTTPError, ValueError):
        return None
    return next((x["epoch"] for x in status["links"] if x["link"] == LINK), None)


async def wait_epoch(http: httpx.AsyncClient, agent: Agent, at_least: int, bound: float) -> int:
    with trio.fail_after(bound):
        while True:
            value = await epoch(http, agent)
            if value is not None and value >= at_least:
                return value
            if agent.proc.poll() is not None:
                raise SystemExit(f"{agent.name} exited with {agent.proc.returncode}")
            await trio.sleep(0.1)


async def rate(http: httpx.AsyncClient, agent: Agent, seconds: float) -> float:
    """Rotations per second committed by `agent` over `seconds` (the status polls share this
    process's loop with the attacker's tasks and may take seconds: generous bounds)."""
    first = await wait_epoch(http, agent, 0, 60)
    started = time.monotonic()
    await trio.sleep(seconds)
    last = await wait_epoch(http, agent, first, 60)
    return (last - first) / (time.monotonic() - started)


async def sampler(agents: dict[str, Agent]) -> None:
    while True:
        for agent in agents.values():
            agent.sample()
        await trio.sleep(0.2)


@dataclass
class Probes:
    """Fresh connections of a peer (alice's certificate, from 127.0.0.1): each a new TCP
    connection, a mutual TLS handshake and one request; seconds taken, or None if it failed
    within 5 s. The window a probe counts in is chosen by `window`."""

    window: str = "quiet"
    times: dict[str, list[float | None]] = field(default_factory=dict)

    def summary(self, window: str) -> str:
        times = self.times.get(window, [])
        ok = sorted(1000 * t for t in times if t is not None)
        if not ok:
            return f"0 of {len(times)} got an answer"
        return f"{len(ok)} of {len(times)} answered, p50 {ok[len(ok) // 2]:.0f} max {ok[-1]:.0f} ms"


async def probe(port: int, context: ssl.SSLContext, probes: Probes, every: float) -> None:
    request = h11.Request(
        method="POST", target=f"/v1/links/{LINK}/probe", headers=[("host", "bob")]
    )  # not an action: a 404 from the server itself, the link is not touched
    while True:
        window, started, took = probes.window, time.monotonic(), None
        with trio.move_on_after(5):
            try:
                tcp = await trio.open_tcp_stream("127.0.0.1", port)
                stream = trio.SSLStream(tcp, context, server_hostname="127.0.0.1")
                client = h11.Connection(h11.CLIENT)
                await stream.send_all(client.send(request) + client.send(h11.EndOfMessage()))
                while not isinstance(event := client.next_event(), h11.Response):
                    if event is h11.NEED_DATA:
                        client.receive_data(await stream.receive_some(4096))
                took = time.monotonic() - started
                await stream.aclose()
            except (OSError, trio.BrokenResourceError, h11.ProtocolError):
                pass
        probes.times.setdefault(window, []).append(took)
        await trio.sleep(max(0.0, every - (time.monotonic() - started)))


# -- the attacker ---------------------------------------------------------------------------


async def connect(port: int, source: str | None) -> trio.SocketStream:
    sock = trio.socket.socket()
    if source:
        await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def hold_idle(port: int, source: str | None, stats: Attack) -> None:
    """One idle connection, reopened whenever the server closes it."""
    while True:
        try:
            stream = await connect(port, source)
        except OSError:
            stats.errors += 1
            await trio.sleep(0.1)
            continue
        stats.opened += 1
        try:
            while await stream.receive_some(4096):
                pass
        except trio.BrokenResourceError:
            pass
        stats.closed_by_server += 1
        await stream.aclose()


async def hold_slow(
    port: int, source: str | None, context: ssl.SSLContext | None, stats: Attack
) -> None:
    """One connection dribbling a byte a second (garbage before TLS, or a request body under
    mallory's certificate), reopened whenever the server closes it."""
    while True:
        opened = False
        try:
            tcp = await connect(port, source)
            stream: trio.abc.Stream = tcp
            if context is not None:
                stream = trio.SSLStream(tcp, context, server_hostname="127.0.0.1")
                await stream.do_handshake()
                head = f"POST /v1/links/{LINK}/rotate HTTP/1.1\r\nhost: bob\r\n"
                await stream.send_all((head + "content-length: 60000\r\n\r\n").encode())
            stats.opened += 1
            opened = True
            while True:
                await stream.send_all(b"x")
                await trio.sleep(1)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            if opened:
                stats.closed_by_server += 1
            else:
                stats.errors += 1
            await trio.sleep(0.05)


def forged_bodies() -> list[tuple[str, bytes]]:
    """Requests a holder of another agent's certificate might send."""
    nonce = base64.b64encode(os.urandom(32)).decode()
    rotate = {
        "v": 1,
        "kind": "rotate",
        "link": LINK,
        "from": "alice",
        "to": "bob",
        "epoch": 7,
        "keys": [["sim", "00000000-0000-4000-8000-0000000000aa"]],
        "labels": ["file"],
        "nonce": nonce,
        "mac": base64.b64encode(os.urandom(32)).decode(),
    }
    return [
        (f"/v1/links/{LINK}/rotate", json.dumps(rotate).encode()),
        (f"/v1/links/{LINK}/commit", os.urandom(200)),
        (f"/v1/links/{LINK}/rotate", b"[" * 5000),
        ("/v1/links/no-such-link/rotate", b"{}"),
        (f"/v1/links/{LINK}/resync", b"x" * 70_000),
    ]


async def flood(port: int, source: str | None, context: ssl.SSLContext, stats: Attack) -> None:
    """Forged requests back to back on a kept-alive mallory connection."""
    bodies = forged_bodies()
    n = 0
    while True:
        try:
            tcp = await connect(port, source)
            stream = trio.SSLStream(tcp, context, server_hostname="127.0.0.1")
            await stream.do_handshake()
            while True:
                path, body = bodies[n % len(bodies)]
                n += 1
                client = h11.Connection(h11.CLIENT)
                headers = [("host", "bob"), ("content-length", str(len(body)))]
                data = client.send(h11.Request(method="POST", target=path, headers=headers))
                await stream.send_all(data + client.send(h11.Data(data=body)))
                while True:
                    event = client.next_event()
                    if event is h11.NEED_DATA:
                        client.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Response):
                        stats.statuses[event.status_code] = (
                            stats.statuses.get(event.status_code, 0) + 1
                        )
                    elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                        break
                stats.forged += 1
                if client.our_state is h11.MUST_CLOSE or client.their_state is h11.MUST_CLOSE:
                    break
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            stats.errors += 1
            await trio.sleep(0.01)


async def attack(port: int, args: argparse.Namespace, mallory: ssl.SSLContext, stats: Attack):
    sources = [None] if args.same_address else [f"127.0.0.{2 + i % 16}" for i in range(16)]
    async with trio.open_nursery() as nursery:
        for i in range(args.idle):
            nursery.start_soon(hold_idle, port, sources[i % len(sources)], stats)
        for i in range(args.slow):
            context = mallory if i % 2 else None
            nursery.start_soon(hold_slow, port, sources[i % len(sources)], context, stats)
        for i in range(args.flood):
            nursery.start_soon(flood, port, sources[i % len(sources)], mallory, stats)


def mode(args: argparse.Namespace) -> str:
    """Which way the attacker shares the machine with the agents."""
    if not (args.nice or args.attacker_cpus or args.agent_cpus):
        return "attacker shares all cores with the agents at the same priority (default)"
    parts = []
    if args.nice:
        parts.append(f"attacker at nice {args.nice}")
    if args.attacker_cpus:
        parts.append(f"attacker on CPU {args.attacker_cpus}")
    if args.agent_cpus:
        parts.append(f"agents on CPU {args.agent_cpus}")
    return ", ".join(parts)


async def main(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.idle + args.slow + args.flood + 512
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
    if args.attacker_cpus:
        os.sched_setaffinity(0, cpus(args.attacker_cpus))
    with tempfile.TemporaryDirectory(prefix="qkdagent-hostile-") as tmp:
        directory = Path(tmp)
        agents = start_agents(directory, args.interval, args.nofile, cpus(args.agent_cpus))
        alice, bob = agents["alice"], agents["bob"]
        pki_dir = directory / "ca"
        mallory = ssl.create_default_context(cafile=str(pki_dir / "ca.pem"))
        mallory.load_cert_chain(str(pki_dir / "mallory.pem"), str(pki_dir / "mallory.key"))
        peer = ssl.create_default_context(cafile=str(pki_dir / "ca.pem"))
        peer.load_cert_chain(str(pki_dir / "alice.pem"), str(pki_dir / "alice.key"))
        probes = Probes()
        stats = Attack()
        try:
            async with httpx.AsyncClient() as http, trio.open_nursery() as nursery:
                nursery.start_soon(sampler, agents)
                await wait_epoch(http, alice, 3, 60)
                nursery.start_soon(probe, bob.peer_port, peer, probes, args.probe_every)
                window = Window(agents)
                quiet = await rate(http, alice, args.quiet)
                quiet_cpu, quiet_ms, quiet_s = window.close()
                if args.nice:
                    os.nice(args.nice)  # the attacker takes only CPU the agents leave
                nursery.start_soon(attack, bob.peer_port, args, mallory, stats)
                probes.window = "ramp"
                await trio.sleep(args.ramp)
                probes.window = "attack"
                held = stats.opened - stats.closed_by_server
                opened = stats.opened
                window = Window(agents)
                under = await rate(http, alice, args.attack)
                attack_cpu, attack_ms, attack_s = window.close()
                probes.window = "after"
                opened = stats.opened - opened
                bob_epoch = await epoch(http, bob)
                nursery.cancel_scope.cancel()
        finally:
            for agent in agents.values():
                agent.sample()
                agent.proc.terminate()
            for agent in agents.values():
                try:
                    agent.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    agent.proc.kill()
        bob_log = (directory / "bob.log").read_text(errors="replace")
        alice_log = (directory / "alice.log").read_text(errors="replace")
    hostile = args.idle + args.slow + args.flood
    print(f"mode: {mode(args)}")
    print(
        f"agents: interval {args.interval} s, nofile {args.nofile}, attacker "
        f"{'on the peer address' if args.same_address else 'on 16 other loopback addresses'}"
    )
    print(
        f"hostile connections: {args.idle} idle + {args.slow} slow + {args.flood} flooding "
        f"= {hostile} (about {held} open at the start of the window)"
    )
    print(f"quiet:        {quiet:6.2f} rotations/s over {args.quiet:g} s")
    print(
        f"under attack: {under:6.2f} rotations/s over {args.attack:g} s "
        f"({100 * under / quiet:.0f} % of quiet; bob at epoch {bob_epoch})"
    )
    print(
        f"attack: {stats.opened} connections opened ({opened / args.attack:.0f}/s in the "
        f"window), {stats.closed_by_server} closed by the server, {stats.forged} forged "
        f"requests answered {dict(sorted(stats.statuses.items()))}, {stats.errors} connect/TLS "
        "errors"
    )
    for label, used in (("quiet", quiet_cpu), ("attack", attack_cpu)):
        print(
            f"CPU {label + ':':7} "
            + ", ".join(
                f"{n} {100 * used[n]:.0f} %" for n in ("alice", "bob", "attacker", "others")
            )
            + f" of a core; machine {100 * used['machine']:.0f} % of {os.cpu_count()} cores"
        )
    for label, durations, seconds in (
        ("quiet", quiet_ms, quiet_s),
        ("attack", attack_ms, attack_s),
    ):
        print(
            f"rotation time {label + ':':7} alice (initiator) {percentiles(durations['alice'])}; "
            f"bob (responder) {percentiles(durations['bob'])}; "
            f"{len(durations['alice']) / seconds:.2f}/s in alice's log over {seconds:.0f} s"
        )
    print(
        f"fresh peer connections (every {args.probe_every:g} s): quiet {probes.summary('quiet')}"
        f"; under attack {probes.summary('attack')}"
    )
    for agent in agents.values():
        print(
            f"{agent.name}: peak {agent.peak_fds} descriptors, peak RSS "
            f"{agent.peak_rss_kib / 1024:.1f} MiB"
        )
    summaries = [line for line in bob_log.splitlines() if "peer API: refused" in line]
    if summaries:
        print("bob's last summary:", summaries[-1].split("peer API: ", 1)[1])
    print(
        f"bob's log: {bob_log.count('Traceback')} tracebacks, "
        f"{bob_log.count('peer API: refused')} summary lines, {len(bob_log.splitlines())} lines; "
        f"alice's log: {alice_log.count('WARNING')} warnings"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--slow", type=int, default=1000)
    parser.add_argument("--flood", type=int, default=8, help="flooding connections")
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--nofile", type=int, default=1024)
    parser.add_argument("--quiet", type=float, default=20)
    parser.add_argument("--attack", type=float, default=30)
    parser.add_argument("--ramp", type=float, default=5, help="seconds before measuring")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="lower the attacker's CPU priority (it shares the machine's cores with the agents)",
    )
    parser.add_argument(
        "--attacker-cpus", help="confine the attacker (this process) to these CPUs, e.g. 1"
    )
    parser.add_argument("--agent-cpus", help="confine both agents to these CPUs, e.g. 0")
    parser.add_argument(
        "--probe-every", type=float, default=0.5, help="seconds between fresh peer connections"
    )
    parser.add_argument("--same-address", action="store_true", help="attack from 127.0.0.1")
    trio.run(main, parser.parse_args())
