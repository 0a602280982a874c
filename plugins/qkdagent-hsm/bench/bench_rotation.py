"""Store + retention-cleanup latency per rotation with 10, 100 and 1,000 links on one token.

Runs SoftHSM2 with its token directory on tmpfs (/dev/shm), through the real sink (worker
thread, trio caller). Each link is first brought to the steady state (retention = 2 objects),
then rotated for several rounds; one sample = one `install()` (create the new object, relabel
the previous one to `<label>.old`, destroy the one that fell out of the window). Also prints
what one C_FindObjects by label costs at that token size, which is what the sink's handle index
saves per rotation.

    python plugins/qkdagent-hsm/bench/bench_rotation.py [--links 10,100,1000] [--samples 2000]
        [--module /path/to/libsofthsm2.so]   # default: first of tests/softhsm_paths.py
        [--no-relabel]                        # retired_label = false (older keys keep the label)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from qkdagent_hsm import Pkcs11Sink

from qkdagent import KeyMeta, Link, Options, PluginContext, Secret

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # test bed: not shipped
import softhsm_paths

PIN = "bench-" + "1234"
SO_AND_USER_PIN = ("--so-pin", "so-5678", "--pin", PIN)  # throw-away PINs of a bench token


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def init_token(conf: Path, label: str) -> None:
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label, *SO_AND_USER_PIN],
        check=True,
        capture_output=True,
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
    )


def find_cost(sink: Pkcs11Sink, label: str) -> float:
    import pkcs11

    entry = sink._open()

    def find() -> float:
        template = {
            pkcs11.Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY,
            pkcs11.Attribute.LABEL: label,
        }
        start = time.perf_counter()
        for _ in range(5):
            list(entry.session.get_objects(template))
        return (time.perf_counter() - start) / 5

    return sink.worker.run_blocking(find)


async def bench(
    n_links: int, samples: int, root: Path, conf: Path, module: str, relabel: bool
) -> None:
    label = f"bench{n_links}"
    init_token(conf, label)
    pin_file = root / f"{label}.pin"
    pin_file.write_text(PIN)
    pin_file.chmod(0o600)
    options = Options(
        {"token": label, "module": module, "pin": {"file": str(pin_file)}, "retention": 2}
        | ({} if relabel else {"retired_label": False}),
        where="sinks.bench",
    )
    sink = Pkcs11Sink("bench", options, PluginContext(agent_name="alice", state_dir=root))
    options.finish()
    await sink.prepare()
    try:
        links = [Link(f"link{i}", "alice", f"peer{i:04d}", True) for i in range(n_links)]
        for epoch in (1, 2):  # steady state: two objects per link
            for link in links:
                await sink.install(link, Secret.random(32), KeyMeta(epoch, (), "b", 0.0))
        rounds = max(1, samples // n_links)
        latencies: list[float] = []
        wall = time.perf_counter()
        for r in range(rounds):
            epoch = 3 + r
            for link in links:
                secret = Secret.random(32)
                meta = KeyMeta(epoch, (), "b", 0.0)
                start = time.perf_counter()
                await sink.install(link, secret, meta)
                latencies.append(time.perf_counter() - start)
        wall = time.perf_counter() - wall
        find = await trio.to_thread.run_sync(find_cost, sink, "peer0000")
        ms = [x * 1000 for x in latencies]
        print(
            f"{n_links:>5} links  {2 * n_links:>5} objects  {len(ms):>5} rotations  "
            f"median {statistics.median(ms):6.2f} ms  p99 {percentile(ms, 0.99):6.2f} ms  "
            f"mean {statistics.fmean(ms):6.2f} ms  {len(ms) / wall:7.0f} rotations/s  "
            f"(one C_FindObjects by label: {find * 1000:6.2f} ms)"
        )
    finally:
        await sink.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--links", default="10,100,1000")
    parser.add_argument("--samples", type=int, default=2000, help="rotations measured per size")
    parser.add_argument("--no-relabel", action="store_true", help="retired_label = false")
    parser.add_argument(
        "--module", default=softhsm_paths.find_module(), help="libsofthsm2.so to load"
    )
    args = parser.parse_args()
    if args.module is None:
        candidates = ", ".join(softhsm_paths.MODULE_CANDIDATES)
        parser.error(f"libsofthsm2.so not found in {candidates}; give --module")
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="qkdagent-hsm-bench-", dir=base))
    try:
        (root / "tokens").mkdir()
        conf = root / "softhsm2.conf"
        conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n")
        os.environ["SOFTHSM2_CONF"] = str(conf)
        tmpfs = base is not None
        print(
            f"SoftHSM2 {args.module}, file backend on {root} (tmpfs: {tmpfs}); retention 2, "
            f"{'no relabelling' if args.no_relabel else 'previous key relabelled <label>.old'}"
        )
        for n in (int(x) for x in args.links.split(",")):
            trio.run(bench, n, args.samples, root, conf, args.module, not args.no_relabel)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
