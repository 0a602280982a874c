#!/usr/bin/env python3
"""GET_KEY/s on one persistent connection and with a connection per call, OPEN_CONNECT/s, per
dialect, against the in-process simulator over loopback mutual TLS.

    python3 plugins/qkdagent-etsi004/bench/bench_qkdm.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import trio
from qkdagent_etsi004 import codec
from qkdagent_etsi004.codec import QoS
from qkdagent_etsi004.sim import open_qkdm_pair
from qkdagent_etsi004.source import Etsi004Source

from qkdagent import Link
from qkdagent.testing import build_component

ALICE = Link("l", "alice", "bob", True)


async def rate(seconds: float, call) -> float:  # type: ignore[no-untyped-def]
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        await call()
        n += 1
    return n / (time.perf_counter() - start)


async def main(seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with open_qkdm_pair(Path(tmp), rate_bps=4e9) as sim:
            for transport in ("binary-v1", "binary-v2"):
                for persistent in (True, False):
                    table = sim.source_table("alice", transport=transport, persistent=persistent)
                    source = build_component(Etsi004Source, table, links=(ALICE,), agent="alice")
                    await source.prepare()
                    await source.new_key(ALICE)
                    r = await rate(seconds, lambda s=source: s.new_key(ALICE))
                    mode = "one connection" if persistent else "connection per call"
                    print(f"{transport}: GET_KEY {r:8.0f}/s ({mode})")
                    if persistent:
                        request = codec.OpenConnectRequest("qkd://alice", "qkd://bob", QoS(32))
                        service = codec.Service.OPEN_CONNECT_RESPONSE
                        r = await rate(
                            seconds, lambda s=source, q=request, v=service: s._call(q, v)
                        )
                        print(f"{transport}: OPEN_CONNECT {r:8.0f}/s (one connection)")
                    await source.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    trio.run(main, parser.parse_args().seconds)
