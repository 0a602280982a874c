"""`qkdagent qkdm-sim`: run simulated QKD modules (004, both binary dialects, mutual TLS)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from functools import partial
from pathlib import Path

import trio

from .sim import DEFAULT_MODULES, SimSettings, Simulator, make_pki, run_simulator


def _module(text: str) -> tuple[str, list[str]]:
    module, sep, apps = text.partition("=")
    names = [a for a in apps.split(",") if a]
    if not sep or not module or not names:
        raise argparse.ArgumentTypeError(f"expected MODULE_ID=APP[,APP...], got {text!r}")
    return module, names


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Serve simulated ETSI GS QKD 004 modules over mutual TLS, both binary dialects (v1 "
        "1.0.1 and v2 2.1.1, told apart by the version bytes). Modules are linked in pairs."
    )
    parser.add_argument("--make-pki", metavar="DIR", type=Path, help="write a PKI and exit")
    parser.add_argument("--pki", metavar="DIR", type=Path, help="certificates (made if missing)")
    parser.add_argument(
        "--module",
        metavar="ID=APP[,APP]",
        type=_module,
        action="append",
        help="a module and its applications (repeat; linked two by two in order; "
        "default QKDM_A=alice QKDM_B=bob)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="first module's port, then +1 ...")
    parser.add_argument("--rate", type=float, default=10_000_000.0, metavar="BITS/S")
    parser.add_argument("--ready-file", type=Path, help="write the addresses as JSON here")
    parser.add_argument(
        "--rest",
        action="store_true",
        help="INSECURE: also serve qkd-module's REST form on plain HTTP (keys in clear, no "
        "authentication), one more port per module (--rest-port, then +1 ...)",
    )
    parser.add_argument("--rest-port", type=int, default=0, help="first module's REST port")


def run(args: argparse.Namespace) -> int:
    """0 after a clean stop; 2 and one line on stderr for a usage or setup problem."""
    try:
        modules = dict(args.module) if args.module else dict(DEFAULT_MODULES)
        if args.make_pki:
            make_pki(args.make_pki, modules)
            print(f"wrote a CA and certificates for {', '.join(modules)} into {args.make_pki}")
            return 0
        if args.pki is None:
            raise ValueError("--pki DIR (or --make-pki DIR) is required")
        if not 0 <= args.port <= 65535 - len(modules) or not args.rate >= 0:
            raise ValueError("--port or --rate out of range")
        if not 0 <= args.rest_port <= 65535 - len(modules):
            raise ValueError("--rest-port out of range")
        ports = {m: args.port + i if args.port else 0 for i, m in enumerate(modules)}
        rest_ports = {m: args.rest_port + i if args.rest_port else 0 for i, m in enumerate(modules)}
        settings = SimSettings(
            modules=modules,
            host=args.host,
            ports=ports,
            rate_bps=args.rate,
            rest=args.rest,
            rest_ports=rest_ports,
        )
        if args.rest:
            print(
                "qkdm-sim: WARNING: --rest serves keys in clear over plain HTTP to anyone who "
                "can connect (qkd-module's REST form); use it on loopback only",
                file=sys.stderr,
            )
        make_pki(args.pki, modules)
        trio.run(partial(_serve, args.pki, settings, args.ready_file))
        return 0
    except (ValueError, OSError) as exc:
        print(f"qkdm-sim: {exc}", file=sys.stderr)
        return 2


async def _serve(directory: Path, settings: SimSettings, ready_file: Path | None) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            sim: Simulator = await nursery.start(run_simulator, directory, settings)
            for module in sim.describe():
                rest = (
                    f" REST (plain HTTP) {module['rest_address']}"
                    if "rest_address" in module
                    else ""
                )
                print(f"{module['module_id']}: {module['address']}{rest} peer {module['peer']}")
            sys.stdout.flush()
            if ready_file is not None:
                tmp = trio.Path(f"{ready_file}.tmp")
                await tmp.write_text(json.dumps(sim.describe()))
                await tmp.replace(ready_file)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
