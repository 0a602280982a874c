"""Benchmark: the KME simulator and end-to-end rotations through two simulated KMEs.

    python plugins/qkdagent-etsi014/bench/bench_kme.py [--seconds 3] [--rotations 200]

1. One simulator process (`python -m qkdagent_etsi014 kme-sim`, one trio worker serving both
   KMEs) over keep-alive mutual TLS. Load comes from separate client processes, each with one
   keep-alive connection and a minimal blocking HTTP/1.1 client (so the client is not the
   bottleneck): requests/s, keys/s and p50/p99 latency for `number=1` and for the largest batch.
2. The same with the source's own client stack (httpx under trio, sequential): what an agent gets.
3. Two agents (open_agent_pair) rotating through two in-process simulated KMEs: the rotation
   latency the initiator logs (enc_keys -> rotate -> responder dec_keys -> confirm -> commit).

Targets (issue 3): >= 2,000 requests/s; >= 60,000 256-bit keys/s in batches; rotation p50 <= 15 ms.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

ENC = "/api/v1/keys/bob/enc_keys"
LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else float("nan")


def raw_client(url: str, pki: str, path: str, seconds: float, out: Any) -> None:
    """One keep-alive TLS connection, requests back to back; results to the queue `out`."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    context = ssl.create_default_context(cafile=f"{pki}/ca.pem")
    context.load_cert_chain(f"{pki}/alice.pem", f"{pki}/alice.key")
    context.set_alpn_protocols(["http/1.1"])
    sock = context.wrap_socket(socket.create_connection((host, int(port))), server_hostname=host)
    request = f"GET {path} HTTP/1.1\r\nhost: {host}:{port}\r\n\r\n".encode()
    buffer, latencies, keys, errors = b"", [], 0, 0
    end = time.perf_counter() + seconds
    while (start := time.perf_counter()) < end:
        sock.sendall(request)
        while b"\r\n\r\n" not in buffer:
            buffer += sock.recv(1 << 16)
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        match = LENGTH.search(head)
        length = int(match.group(1)) if match else 0
        while len(buffer) < length:
            buffer += sock.recv(max(1 << 16, length - len(buffer)))
        body, buffer = buffer[:length], buffer[length:]
        latencies.append(time.perf_counter() - start)
        if head[9:12] == b"200":
            keys += body.count(b'"key_ID"')
        else:
            errors += 1
    sock.close()
    out.put((latencies, keys, errors))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(
    url: str, pki: str, path: str, seconds: float, connections: int, server: int
) -> dict[str, float]:
    """`server` is the simulator's PID: its CPU time per request gives its capacity on one free
    core, a figure that does not depend on what else runs on the machine."""
    queue: Any = multiprocessing.Queue()
    cpu = cpu_seconds(server)
    workers = [
        multiprocessing.Process(target=raw_client, args=(url, pki, path, seconds, queue))
        for _ in range(connections)
    ]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=seconds + 30) for _ in workers]
    for worker in workers:
        worker.join()
    latencies = [x for r in results for x in r[0]]
    cpu_per_request = (cpu_seconds(server) - cpu) / max(1, len(latencies))
    return {
        "requests/s": len(latencies) / seconds,
        "server capacity req/s": 1 / cpu_per_request if cpu_per_request else float("nan"),
        "keys/s": sum(r[1] for r in results) / seconds,
        "errors": sum(r[2] for r in results),
        "p50 ms": percentile(latencies, 50) * 1000,
        "p99 ms": percentile(latencies, 99) * 1000,
    }


async def httpx_sequential(url: str, pki: Path, seconds: float) -> dict[str, float]:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    context.load_cert_chain(str(pki / "alice.pem"), str(pki / "alice.key"))
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, verify=context, trust_env=False) as client:
        end = time.perf_counter() + seconds
        while (start := time.perf_counter()) < end:
            response = await client.get("/api/v1/keys/bob/enc_keys")
            assert response.status_code == 200
            latencies.append(time.perf_counter() - start)
    return {
        "requests/s": len(latencies) / seconds,
        "p50 ms": percentile(latencies, 50) * 1000,
        "p99 ms": percentile(latencies, 99) * 1000,
    }


class Durations(logging.Handler):
    """Collects the initiator's 'epoch N committed (initiator) in X ms' log lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.ms: dict[int, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("link %s: epoch %d committed") and record.args:
            args = record.args
            if isinstance(args, tuple) and args[2] == "initiator":
                self.ms[int(args[1])] = float(args[3])


async def rotations(directory: Path, count: int, *, kmes: bool = True) -> dict[str, float]:
    """Rotation latency through two simulated KMEs, or (kmes=False) the core's memory source."""
    from qkdagent_etsi014.sim import open_kme_pair

    from qkdagent.testing import open_agent_pair

    handler = Durations()
    logger = logging.getLogger("qkdagent")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    async with open_kme_pair(directory / "kmes") as sim:
        sides: dict[str, dict[str, Any]] = {
            sae: {
                "sources": {"qkd": sim.source_table(sae)} if kmes else None,
                "sinks": {"rec": {"type": "recording"}},
                "plugins": ["etsi014", "memory"] if kmes else ["memory"],
            }
            for sae in ("alice", "bob")
        }
        async with open_agent_pair(
            directory / ("agents" if kmes else "agents-memory"),
            alice=sides["alice"],
            bob=sides["bob"],
            link={"interval": 0.02, "jitter": 0, "reject_after": 60},
        ) as pair:
            await pair.wait_for_epoch(count + 1, timeout=300)
    logger.removeHandler(handler)
    values = [ms for epoch, ms in handler.ms.items() if epoch > 1]  # epoch 1: cold connections
    return {
        "rotations": len(values),
        "p50 ms": statistics.median(values),
        "p99 ms": percentile(values, 99),
        "max ms": max(values),
    }


def show(title: str, figures: dict[str, float]) -> None:
    text = ", ".join(
        f"{k} {v:,.0f}"
        if k.endswith("/s") or k.endswith("req/s") or k in ("errors", "rotations")
        else f"{k} {v:.2f}"
        for k, v in figures.items()
    )
    print(f"{title:<46} {text}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rotations", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kme-bench-") as tmp:
        directory = Path(tmp)
        pki, ready = directory / "pki", directory / "ready.json"
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qkdagent_etsi014",
                "kme-sim",
                "--pki",
                str(pki),
                "--ready-file",
                str(ready),
                "--rate",
                "1e10",
                "--max-key-count",
                "2000000",
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while not (ready.exists() and ready.read_text()):
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("kme-sim did not start")
                time.sleep(0.05)
            url = json.loads(ready.read_text())[0]["url"]
            print(f"simulator: one trio worker, {url}, mutual TLS, keep-alive")
            for connections in (1, 2, 4):
                show(
                    f"enc_keys number=1, {connections} connection(s)",
                    load(url, str(pki), ENC, args.seconds, connections, server.pid),
                )
            for connections in (1, 2):
                show(
                    f"enc_keys number=1024, {connections} connection(s)",
                    load(
                        url, str(pki), ENC + "?number=1024", args.seconds, connections, server.pid
                    ),
                )
            show(
                "httpx (the source's stack), sequential",
                trio.run(httpx_sequential, url, pki, args.seconds),
            )
        finally:
            server.terminate()
            server.wait(10)
        show(
            "rotation, 2 agents via 2 KMEs (in-process)",
            trio.run(rotations, directory, args.rotations),
        )
        show(
            "  baseline: same agents, core memory source",
            trio.run(partial(rotations, directory, args.rotations, kmes=False)),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
