"""Benchmark: PSK install latency per backend, and 1,000 peers on one interface rotated at once.

    python plugins/qkdagent-wireguard/bench/bench_install.py            # uapi, broker, wg set
    python plugins/qkdagent-wireguard/bench/bench_install.py --kernel   # netlink, in QEMU

Needs root, wireguard-go, wg, ip (and qemu + ci/setup.sh's kernel for --kernel). Every install
goes through the sink's full path, device evidence included (uapi: the device listing and the set
in one round trip; netlink: set and read-back in one send). The baseline spawns
`wg set IFACE peer PUB preshared-key FILE` once per install, the way shell-based tools do.
The many-peers figure is sink-only: it calls `WireGuardSink.install` directly (no agents).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from qkdagent_wireguard.sink import WireGuardSink

from qkdagent import KeyMeta, Link, Options, PluginContext, Secret

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # test beds: not shipped
from wg_testbed import Node, Pair

LINK = Link("bench", "alice", "bob", True)
SINK_ONLY = (
    "sink-only: WireGuardSink.install called directly, one sink per peer in one process "
    "(no agents, no key source, no agent protocol)"
)
PLUGIN = Path(__file__).resolve().parents[1]


def meta(epoch: int) -> KeyMeta:
    return KeyMeta(epoch, ("k",), "wireguard", time.time())


_contexts: dict[Path, PluginContext] = {}
"""One agent per work directory: its sinks share backends and batches (its stash)."""


def make_sink(node: Node, peer_text: str, workdir: Path, name: str = "wg", **opt) -> WireGuardSink:  # type: ignore[no-untyped-def]
    table = {"interface": node.iface, "peer_public_key": peer_text, **opt}
    options = Options(table, where=f"sinks.{name}")
    context = _contexts.setdefault(workdir, PluginContext("bench", workdir))
    sink = WireGuardSink(name, options, context)
    options.finish()
    return sink


def summary(label: str, seconds: list[float]) -> float:
    seconds = sorted(seconds)
    median = statistics.median(seconds)
    p99 = seconds[min(len(seconds) - 1, int(len(seconds) * 0.99))]
    print(
        f"  {label:<34} n={len(seconds):<5} median {median * 1e6:9.1f} µs   p99 {p99 * 1e6:9.1f} µs"
    )
    return median


async def install_latency(sink: WireGuardSink, n: int, idle: float = 0.0) -> list[float]:
    """`n` installs through the sink's full path; `idle` seconds of sleep before each."""
    times = []
    for i in range(n):
        secret, key_meta = Secret.random(), meta(i)
        if idle:
            await trio.sleep(idle)  # the agent idles in trio between rotations, too
        start = time.perf_counter()
        await sink.install(LINK, secret, key_meta)
        times.append(time.perf_counter() - start)
    return times


class RawClient:
    """The daemon's own floor: the sink's request bytes on a kept socket, with nothing around
    them (no trio, batching, parsing or wiping), read in the tightest loop Python has
    (yielding the CPU between tries, like the sink). No client of the socket can beat this
    by much. `listing=False` sends a bare set (no
    evidence that the peer exists), to show what dropping the listing would buy."""

    def __init__(self, node: Node, peer: Node, listing: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(f"/run/wireguard/{node.iface}.sock")
        self.sock.setblocking(False)
        self.head, self.replies = (b"get=1\n\n", 2) if listing else (b"", 1)
        self.peer = peer.public.hex().encode()
        self.buf = bytearray(65536)

    def latency(self, n: int, idle: float = 0.0) -> list[float]:
        view, sock, times = memoryview(self.buf), self.sock, []
        for _ in range(n):
            request = (
                self.head
                + b"set=1\npublic_key=%s\nupdate_only=true\npreshared_key=%s\n\n"
                % (
                    self.peer,
                    os.urandom(32).hex().encode(),
                )
            )
            if idle:
                time.sleep(idle)
            start = time.perf_counter()
            sock.send(request)
            used = 0
            while self.buf.count(b"\n\n", 0, used) < self.replies:
                try:
                    got = sock.recv_into(view[used:])
                except BlockingIOError:
                    os.sched_yield()  # as the sink does: the daemon may wait for this CPU
                    continue
                if not got:
                    raise RuntimeError("wireguard-go closed the control socket")
                used += got
            times.append(time.perf_counter() - start)
            if not self.buf.startswith(b"errno=0\n\n", used - 9):
                raise RuntimeError("wireguard-go refused the floor measurement's set")
        view.release()
        return times

    def close(self) -> None:
        self.sock.close()


def wg_set_latency(node: Node, peer: Node, workdir: Path, n: int) -> list[float]:
    """Spawn `wg set` once per install. The key file is written before the clock starts, so
    the baseline is the spawn alone (the cheapest this method can be)."""
    times = []
    pskfile = workdir / "bench-psk"
    # wg reaches wireguard-go's global UAPI socket from here and a kernel interface of this
    # namespace directly: no `ip netns exec` (which alone costs ~1.5 ms) in the baseline.
    for _ in range(n):
        fd = os.open(pskfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, base64.b64encode(os.urandom(32)) + b"\n")
        os.close(fd)
        argv = ["wg", "set", node.iface, "peer", peer.public_text, "preshared-key", str(pskfile)]
        start = time.perf_counter()
        subprocess.run(argv, check=True)
        times.append(time.perf_counter() - start)
    pskfile.unlink()
    return times


def add_peers(node: Node, count: int) -> list[bytes]:
    """`count` extra peers (random public keys, one allowed IP each) in one `wg set` call."""
    peers = [os.urandom(32) for _ in range(count)]
    args = []
    for i, peer in enumerate(peers):
        args += ["peer", base64.b64encode(peer).decode(), "allowed-ips",
                 f"10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}/32"]  # fmt: skip
    node.wg("set", node.iface, *args)
    return peers


def cpu_of(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def many_peers(  # type: ignore[no-untyped-def]
    node: Node, workdir: Path, count: int, sequential: int, backend: str, daemon_pid: int | None
):
    peers = add_peers(node, count)
    sinks = [
        make_sink(node, base64.b64encode(p).decode(), workdir, f"wg{i}", backend=backend)
        for i, p in enumerate(peers)
    ]
    async with trio.open_nursery() as nursery:
        for sink in sinks:
            nursery.start_soon(sink.prepare)
    results = {}
    for mode in ("concurrent", "sequential"):
        secrets = [Secret.random() for _ in sinks]
        key_meta = meta(1 if mode == "concurrent" else 2)
        cpu0, dcpu0 = time.process_time(), cpu_of(daemon_pid)
        start = time.perf_counter()
        if mode == "concurrent":
            async with trio.open_nursery() as nursery:
                for sink, secret in zip(sinks, secrets, strict=True):
                    nursery.start_soon(sink.install, LINK, secret, key_meta)
        else:
            for sink, secret in zip(sinks[:sequential], secrets, strict=False):
                await sink.install(LINK, secret, key_meta)
        wall = time.perf_counter() - start
        cpu, dcpu = time.process_time() - cpu0, cpu_of(daemon_pid) - dcpu0
        results[mode] = (wall, cpu, dcpu)
        done = count if mode == "concurrent" else min(sequential, count)
        print(
            f"  [sink-only] {done:>5} of {count} peers, {mode:<10} ({backend}): "
            f"total {wall * 1e3:8.1f} ms, sink CPU {cpu * 1e3:8.1f} ms, "
            f"device CPU {dcpu * 1e3:7.1f} ms"
        )
    batches = sinks[0]._shared.batcher(node.iface).batches if sinks[0]._shared else 0
    print(f"  backend round trips for all of the above (incl. prepare): {batches}")
    for sink in sinks:
        await sink.aclose()
    return results


def start_broker(workdir: Path, node: Node, peer: Node) -> tuple[subprocess.Popen[bytes], Path]:
    sock = workdir / "broker.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qkdagent_wireguard.cli", "broker", "--socket", str(sock),
         "--allow", f"{node.iface}:{peer.public_text}"],
        stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 15
    while not sock.is_socket():
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            proc.wait()
            raise RuntimeError("broker did not start")
        time.sleep(0.02)
    return proc, sock


async def userspace(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="qkdwg-bench-"))
    try:
        # wireguard-go at its default log level, as deployed (the tests log at debug level)
        with Pair(workdir / "wg", log_level="error").open(os.urandom(32), os.urandom(32)) as pair:
            a, b = pair.a, pair.b
            assert a is not None and b is not None
            results = await latencies(args, workdir, a, b)
            report(args, results)
            print(f"one interface, {args.peers} peers, {SINK_ONLY}:")
            assert a.proc is not None
            await many_peers(a, workdir, args.peers, args.sequential, "uapi", a.proc.pid)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def latencies(
    args: argparse.Namespace, workdir: Path, a: Node, b: Node
) -> dict[str, list[float]]:
    """Every userspace latency, in interleaved rounds: the host's noise (large on a shared
    VM) then moves every figure together, not one of them."""
    results: dict[str, list[float]] = {k: [] for k in LABELS}
    rounds = args.rounds
    per, spawns = max(1, args.n // rounds), max(1, args.baseline // rounds)
    async with contextlib.AsyncExitStack() as stack:
        proc, sock = start_broker(workdir, a, b)
        stack.callback(proc.wait)
        stack.callback(proc.terminate)
        listing, bare = RawClient(a, b, True), RawClient(a, b, False)
        stack.callback(listing.close)
        stack.callback(bare.close)
        uapi = make_sink(a, b.public_text, workdir, backend="uapi")
        stack.push_async_callback(uapi.aclose)
        broker = make_sink(a, b.public_text, workdir, backend="broker", broker_socket=str(sock))
        stack.push_async_callback(broker.aclose)
        await uapi.prepare()
        await broker.prepare()
        for _ in range(rounds):
            results["uapi"] += await install_latency(uapi, per)
            results["broker"] += await install_latency(broker, per)
            results["listing"] += listing.latency(per)
            results["bare"] += bare.latency(per)
            results["wg"] += wg_set_latency(a, b, workdir, spawns)
        idle, spaced = args.idle / 1e3, max(1, args.n // 10)
        results["uapi idle"] += await install_latency(uapi, spaced, idle)
        results["listing idle"] += listing.latency(spaced, idle)
    return results


def report(args: argparse.Namespace, results: dict[str, list[float]]) -> None:
    print(
        "install latency (wireguard-go; listing + set in one round trip; "
        f"{args.rounds} interleaved rounds):"
    )
    medians = {key: summary(LABELS[key].format(idle=args.idle), results[key]) for key in LABELS}
    base = medians["wg"]
    print(
        f"  speed-up vs `wg set`: uapi {base / medians['uapi']:.1f}x, "
        f"broker {base / medians['broker']:.1f}x"
    )
    print(
        "  the daemon alone (no sink) vs `wg set`: "
        f"listing + set {base / medians['listing']:.1f}x, "
        f"bare set {base / medians['bare']:.1f}x"
    )
    print(
        f"  after {args.idle:g} ms idle: uapi {base / medians['uapi idle']:.1f}x, "
        f"the daemon alone {base / medians['listing idle']:.1f}x"
    )


LABELS = {
    "uapi": "uapi (in-process)",
    "broker": "broker (unix socket -> uapi)",
    "listing": "floor: raw listing + set",
    "bare": "floor: raw bare set",
    "wg": "baseline: spawn `wg set`",
    "uapi idle": "uapi, daemon idle {idle:g} ms before",
    "listing idle": "floor, daemon idle {idle:g} ms before",
}


async def kernel(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="qkdwg-bench-"))
    try:
        await kernel_figures(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def kernel_figures(args: argparse.Namespace, workdir: Path) -> None:
    with Pair(workdir / "wg", kernel=True, a_in_caller_ns=True).open(
        os.urandom(32), os.urandom(32)
    ) as pair:
        a, b = pair.a, pair.b
        assert a is not None and b is not None
        print(f"install latency (kernel WireGuard {a.iface} under QEMU TCG, set + read-back):")
        builtin = make_sink(a, b.public_text, workdir, backend="netlink")
        pyroute2 = make_sink(
            a, b.public_text, workdir, backend="netlink", netlink_library="pyroute2"
        )
        await builtin.prepare()
        await pyroute2.prepare()
        nl = summary("netlink (in-process, built-in)", await install_latency(builtin, args.n))
        py = summary(
            "netlink (in-process, pyroute2)",
            await install_latency(pyroute2, max(20, args.n // 5)),
        )
        await builtin.aclose()
        await pyroute2.aclose()
        base = summary("baseline: spawn `wg set`", wg_set_latency(a, b, workdir, args.baseline))
        print(
            f"  speed-up vs `wg set`: netlink built-in {base / nl:.1f}x, pyroute2 {base / py:.1f}x"
        )
        print(f"one interface, {args.peers} peers, {SINK_ONLY}:")
        await many_peers(a, workdir, args.peers, args.sequential, "netlink", None)


def in_vm(args: argparse.Namespace) -> int:
    from wg_guestvm import cache_ready, run_guest

    cache = PLUGIN / ".cache" / "kernel"
    if not cache_ready(cache):
        print(f"no kernel in {cache}: run {PLUGIN / 'ci' / 'setup.sh'}", file=sys.stderr)
        return 1
    argv = [sys.executable, str(Path(__file__).resolve()), "--in-guest", "-n", str(args.n),
            "--baseline", str(args.baseline), "--peers", str(args.peers),
            "--sequential", str(args.sequential)]  # fmt: skip
    script = (
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp "
        "PYTHONDONTWRITEBYTECODE=1 TMPDIR=/run/tmp\nip link set lo up\n"
        f"{shlex.join(argv)} > /mnt/bench.txt 2>&1\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = run_guest(cache, Path(tmp), script, timeout=600)
        out = Path(tmp, "bench.txt")
        print(out.read_text() if out.exists() else result.console)
    return 0 if result.exit_code == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", action="store_true", help="netlink backend, inside QEMU")
    parser.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("-n", type=int, default=1000, help="installs per backend")
    parser.add_argument("--baseline", type=int, default=200, help="`wg set` spawns")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (userspace)")
    parser.add_argument(
        "--idle", type=float, default=5.0, help="ms the daemon idles before a spaced install"
    )
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument(
        "--sequential",
        type=int,
        default=100,
        help="peers rotated one at a time (each its own batch)",
    )
    args = parser.parse_args()
    if args.in_guest:
        trio.run(kernel, args)
        return 0
    if args.kernel:
        return in_vm(args)
    trio.run(userspace, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
