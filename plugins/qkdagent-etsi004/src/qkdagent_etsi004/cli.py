"""`qkdagent qkdm-sim`: run simulated QKD modules (004, both binary dialects, mutual TLS)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from functools import partial
from pathlib import Path

import trio

from qkdagent import Misconfigured, leaf_errors

from .sim import DEFAULT_MODULES, SimSettings, Simulator, default_pairs, make_pki, run_simulator
from .supply import BUILTIN, supplies_for


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
    parser.add_argument(
        "--rate",
        type=float,
        default=10_000_000.0,
        metavar="BITS/S",
        help="key rate of every simulated link (and the most a stream is granted)",
    )
    parser.add_argument(
        "--supply",
        metavar="NAME[:KEY=VALUE,...]",
        help=f"where each link's key bits come from: {BUILTIN!r} (default: a CSPRNG at --rate) "
        "or a supply installed by a plugin (entry-point group qkdagent.supplies), e.g. "
        "bb84:distance_km=10",
    )
    parser.add_argument(
        "--ready-file",
        type=Path,
        help="once every module listens, write per module its address, dialects, module_id, "
        "CA and the applications' certificate/key paths here as JSON (atomically)",
    )
    parser.add_argument(
        "--rest",
        action="store_true",
        help="INSECURE: also serve qkd-module's REST form on plain HTTP (keys in clear, no "
        "authentication), one more port per module (--rest-port, then +1 ...)",
    )
    parser.add_argument("--rest-port", type=int, default=0, help="first module's REST port")
    parser.add_argument(
        "--close-after-request",
        action="store_true",
        help="close each connection after one answer, as the ETSI reference module does "
        "(default: connections stay open for further requests)",
    )


def settings_from(args: argparse.Namespace) -> SimSettings:
    """Validated settings (ValueError naming the flag); `--supply` is loaded here, before
    anything listens."""
    modules = dict(args.module) if args.module else dict(DEFAULT_MODULES)
    if len(modules) != len(args.module or modules):
        raise ValueError("--module: a module ID is given twice")
    seen: dict[str, str] = {}
    for module, apps in modules.items():
        for app in apps:
            if seen.setdefault(app, module) != module:
                raise ValueError(f"--module: application {app!r} is on {seen[app]} and {module}")
    if not 0 <= args.port <= 65535 - len(modules) or not args.rate >= 0:
        raise ValueError("--port or --rate out of range")
    if not 0 <= args.rest_port <= 65535 - len(modules):
        raise ValueError("--rest-port out of range")
    supply_factory = supplies_for(args.supply, default_pairs(modules))
    return SimSettings(
        modules=modules,
        host=args.host,
        ports={m: args.port + i if args.port else 0 for i, m in enumerate(modules)},
        rate_bps=args.rate,
        supply_factory=supply_factory,
        rest=args.rest,
        close_after_request=args.close_after_request,
        rest_ports={m: args.rest_port + i if args.rest_port else 0 for i, m in enumerate(modules)},
    )


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
        settings = settings_from(args)
        if args.rest:
            print(
                "qkdm-sim: WARNING: --rest serves keys in clear over plain HTTP to anyone who "
                "can connect (qkd-module's REST form); use it on loopback only",
                file=sys.stderr,
            )
        make_pki(args.pki, settings.modules)
        trio.run(partial(_serve, args.pki, settings, args.ready_file))
        return 0
    except BaseException as exc:  # only usage/setup errors become one line, the rest re-raise
        problem = _expected(exc)
        if problem is None:
            raise
        print(f"qkdm-sim: {problem}", file=sys.stderr)
        return 2


def _expected(exc: BaseException) -> str | None:
    """The message of a ValueError/OSError/Misconfigured (an unusable key), also alone inside
    trio's exception groups (a port in use is raised inside the server's nursery)."""
    leaves = leaf_errors(exc)
    if leaves and all(isinstance(leaf, (ValueError, OSError, Misconfigured)) for leaf in leaves):
        return " ".join(str(leaves[0]).split()) or type(leaves[0]).__name__
    return None


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
