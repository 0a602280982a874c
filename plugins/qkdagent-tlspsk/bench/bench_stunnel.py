"""Benchmark: time from commit to stunnel accepting the new key (write + SIGHUP + confirm).

Starts a private stunnel server on loopback and rotates its PSK file through the `tls-psk` sink
N times per configuration, timing each `install()` call: atomic write, SIGHUP, then confirmation
(a PSK handshake with the new key and/or stunnel's log line). Prints median / p90 / p99 / max.

    python plugins/qkdagent-tlspsk/bench/bench_stunnel.py [--rounds 200] [--tls 1.2]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import trio
from qkdagent_tlspsk import TlsPskSink

from qkdagent import KeyMeta, Link, Options, PluginContext, Secret

LINK = Link("bench", "alice", "bob", True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_sink(tmp: Path, name: str, **options: object) -> TlsPskSink:
    opts = Options(options, where=f"sinks.{name}")
    sink = TlsPskSink(name, opts, PluginContext("bench", tmp / f"state-{name}"))
    opts.finish()
    return sink


def start_stunnel(tmp: Path, port: int, tls: str, psk: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("stunnel4") or shutil.which("stunnel")
    if binary is None:
        raise SystemExit("stunnel4 is not installed")
    tls_lines = (
        "sslVersionMin = TLSv1.3\nciphersuites = TLS_AES_128_GCM_SHA256\n"
        if tls == "1.3"
        else "sslVersionMax = TLSv1.2\nciphers = PSK\n"
    )
    conf = tmp / "stunnel.conf"
    conf.write_text(
        f"foreground = yes\npid = {tmp / 'stunnel.pid'}\noutput = {tmp / 'stunnel.log'}\n"
        f"[bench]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:9\n{tls_lines}"
        f"PSKsecrets = {psk}\n"
    )
    proc = subprocess.Popen(
        [binary, str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.02)
    while not (tmp / "stunnel.pid").exists() and time.monotonic() < end:
        time.sleep(0.01)
    return proc


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(sink: TlsPskSink, rounds: int, first_epoch: int) -> list[float]:
    times = []
    for i in range(rounds):
        secret = Secret.random(32)
        meta = KeyMeta(first_epoch + i, (f"k{i}",), "bench", time.time())
        start = time.perf_counter()
        await sink.install(LINK, secret, meta)
        times.append((time.perf_counter() - start) * 1000)
    return times


async def main(rounds: int, tls: str) -> None:
    with tempfile.TemporaryDirectory(prefix="tlspsk-bench-") as tmpdir:
        tmp = Path(tmpdir)
        port = free_port()
        psk = tmp / "psk.txt"
        base = {"path": str(psk), "pid_file": str(tmp / "stunnel.pid")}
        seed = make_sink(tmp, "seed", path=str(psk))
        await seed.prepare()
        await seed.erase(LINK, "startup")
        proc = start_stunnel(tmp, port, tls, psk)
        try:
            configs = {
                "write only (no reload)": {"path": str(tmp / "other.txt")},
                "SIGHUP + handshake probe": {
                    **base,
                    "probe": f"127.0.0.1:{port}",
                    "probe_tls": tls,
                },
                "SIGHUP + log line": {**base, "log_file": str(tmp / "stunnel.log")},
                "SIGHUP + log line + probe": {
                    **base,
                    "log_file": str(tmp / "stunnel.log"),
                    "probe": f"127.0.0.1:{port}",
                    "probe_tls": tls,
                },
            }
            print(f"stunnel PSK rotation, TLS {tls}, {rounds} rounds per row, times in ms")
            print(f"{'confirmation':28} {'median':>8} {'p90':>8} {'p99':>8} {'max':>8}")
            epoch = 1
            for label, options in configs.items():
                sink = make_sink(tmp, f"s{epoch}", **options)
                await sink.prepare()
                await measure(sink, 3, epoch)  # warm-up (DH params, page cache)
                times = await measure(sink, rounds, epoch + 3)
                epoch += rounds + 3
                print(
                    f"{label:28} {statistics.median(times):8.2f} {pct(times, 0.9):8.2f} "
                    f"{pct(times, 0.99):8.2f} {max(times):8.2f}"
                )
        finally:
            proc.terminate()
            proc.wait(timeout=5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--tls", choices=("1.2", "1.3"), default="1.2")
    args = parser.parse_args()
    trio.run(main, args.rounds, args.tls)
