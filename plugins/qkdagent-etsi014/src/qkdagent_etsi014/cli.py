"""`qkdagent kme-sim`: run simulated KMEs, or write a throw-away PKI for them (`--make-pki`)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from functools import partial
from pathlib import Path

import trio

from .app import Quirks
from .identity import MODES, IdentityRule
from .network import Limits
from .sim import DEFAULT_KMES, SimSettings, Simulator, make_pki, run_simulator


def _kme(text: str) -> tuple[str, list[str]]:
    kme, sep, saes = text.partition("=")
    names = [s for s in saes.split(",") if s]
    if not sep or not kme or not names:
        raise argparse.ArgumentTypeError(f"expected KME_ID=SAE[,SAE...], got {text!r}")
    return kme, names


def _fingerprint(text: str) -> tuple[str, str]:
    fp, sep, sae = text.rpartition("=")
    if not sep or not fp or not sae:
        raise argparse.ArgumentTypeError(f"expected SHA256=SAE_ID, got {text!r}")
    return fp, sae


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Serve simulated ETSI GS QKD 014 KMEs over HTTPS with mutual TLS. The calling SAE is "
        "identified from its client certificate. Key supply emulates a QKD link of fixed rate "
        "into a bounded store; requests beyond it get 503."
    )
    parser.add_argument(
        "--make-pki",
        metavar="DIR",
        type=Path,
        help="write a CA, KME and SAE certificates into DIR and exit",
    )
    parser.add_argument(
        "--pki",
        metavar="DIR",
        type=Path,
        help="certificates to serve with (created like --make-pki if DIR has no ca.pem)",
    )
    parser.add_argument(
        "--kme",
        metavar="ID=SAE[,SAE]",
        type=_kme,
        action="append",
        help="a KME and the SAEs attached to it (repeat; default KME_A=alice KME_B=bob)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--port",
        type=int,
        default=0,
        help="port of the first KME, the next "
        "ones count up (default: free ports, printed at start)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=1_000_000.0,
        metavar="BITS/S",
        help="secret key rate of every simulated link",
    )
    parser.add_argument("--initial-fill", type=float, default=1.0, help="store fill at start, 0..1")
    parser.add_argument(
        "--sync-delay",
        type=float,
        default=0.0,
        metavar="S",
        help="keys reach the slave's KME this long after Get key",
    )
    lim = Limits()
    for name in (
        "key_size",
        "min_key_size",
        "max_key_size",
        "max_key_per_request",
        "max_key_count",
        "max_sae_id_count",
    ):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(lim, name))
    parser.add_argument(
        "--identity", choices=MODES, default="cn", help="certificate field holding the SAE ID"
    )
    parser.add_argument(
        "--fingerprint",
        type=_fingerprint,
        action="append",
        default=[],
        metavar="SHA256=SAE",
        help="for --identity fingerprint",
    )
    parser.add_argument(
        "--only-method",
        choices=("GET", "POST"),
        help="quirk: refuse the other method on enc_keys/dec_keys with 405",
    )
    parser.add_argument(
        "--method-refusal-status",
        type=int,
        choices=(405, 404),
        default=405,
        help='quirk: status for a refused method (404 answers {"detail": "Not Found"})',
    )
    parser.add_argument(
        "--not-found-status",
        type=int,
        choices=(400, 404),
        default=400,
        help="quirk: status for unknown key IDs",
    )
    parser.add_argument("--max-body", type=int, default=64 * 1024, help="largest request body")
    parser.add_argument(
        "--ready-file", type=Path, help="write the KME URLs as JSON here once listening"
    )


def settings_from(args: argparse.Namespace) -> SimSettings:
    kmes = dict(args.kme) if args.kme else dict(DEFAULT_KMES)
    ports = {k: args.port + i if args.port else 0 for i, k in enumerate(kmes)}
    limits = Limits(
        args.key_size,
        args.min_key_size,
        args.max_key_size,
        args.max_key_per_request,
        args.max_key_count,
        args.max_sae_id_count,
    )
    limits.check()
    identity = IdentityRule(args.identity, dict((fp, sae) for fp, sae in args.fingerprint))
    quirks = Quirks(
        only_method=args.only_method,
        not_found_status=args.not_found_status,
        method_refusal_status=args.method_refusal_status,
    )
    return SimSettings(
        kmes,
        args.host,
        ports,
        limits,
        args.rate,
        args.initial_fill,
        args.sync_delay,
        identity,
        quirks,
        args.max_body,
    )


def run(args: argparse.Namespace) -> int:
    if args.make_pki:
        kmes = dict(args.kme) if args.kme else dict(DEFAULT_KMES)
        directory = make_pki(args.make_pki, kmes)
        print(
            f"wrote {directory}/ca.pem and a certificate and key per KME and SAE: "
            + ", ".join([*kmes, *(s for v in kmes.values() for s in v)])
        )
        return 0
    if args.pki is None:
        print("kme-sim: --pki DIR (or --make-pki DIR) is required", file=sys.stderr)
        return 2
    try:
        settings = settings_from(args)
    except ValueError as exc:
        print(f"kme-sim: {exc}", file=sys.stderr)
        return 2
    trio.run(partial(_serve, args.pki, settings, args.ready_file))
    return 0


async def _serve(directory: Path, settings: SimSettings, ready_file: Path | None) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            sim: Simulator = await nursery.start(run_simulator, directory, settings)
            for kme in sim.describe():
                print(f"{kme['kme_id']}: {kme['url']} serving SAEs {', '.join(kme['saes'])}")
            print(f"certificates: {directory} (CA {directory / 'ca.pem'})", flush=True)
            if ready_file is not None:  # write then rename: a reader never sees half of it
                partial_file = trio.Path(f"{ready_file}.tmp")
                await partial_file.write_text(json.dumps(sim.describe()))
                await partial_file.replace(ready_file)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
