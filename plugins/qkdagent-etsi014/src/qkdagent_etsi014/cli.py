"""`qkdagent kme-sim`: run simulated KMEs, or write a throw-away PKI for them (`--make-pki`)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from functools import partial
from pathlib import Path

import trio

from qkdagent import Misconfigured, extend_test_pki, leaf_errors

from .app import Quirks
from .identity import MODES, IdentityRule
from .network import Limits
from .sim import DEFAULT_KMES, SimSettings, Simulator, make_pki, run_simulator
from .supply import BUILTIN, supplies_for


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
        help="secret key rate of every simulated link (the csprng supply)",
    )
    parser.add_argument(
        "--initial-fill",
        type=float,
        default=1.0,
        help="store fill at start, 0..1 (the csprng supply)",
    )
    parser.add_argument(
        "--supply",
        metavar="NAME[:KEY=VALUE,...]",
        help=f"where each link's key bits come from: {BUILTIN!r} (default: a CSPRNG at --rate) "
        "or a supply installed by a plugin (entry-point group qkdagent.supplies), e.g. "
        "bb84:distance_km=10",
    )
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


def _check_numbers(args: argparse.Namespace, count: int) -> None:
    if not 0 <= args.port <= 65535 - count + 1:
        raise ValueError(f"--port {args.port}: must leave room for {count} ports below 65536")
    if not args.rate >= 0:
        raise ValueError(f"--rate {args.rate}: must be 0 or more bits/s")
    if not 0 <= args.initial_fill <= 1:
        raise ValueError(f"--initial-fill {args.initial_fill}: must be between 0 and 1")
    if not 0 <= args.sync_delay <= 3600:
        raise ValueError(f"--sync-delay {args.sync_delay}: must be between 0 and 3600 s")
    if not 0 < args.max_body <= 64 * 1024 * 1024:
        raise ValueError(f"--max-body {args.max_body}: must be between 1 and 64 MiB")


def settings_from(args: argparse.Namespace) -> SimSettings:
    """Validated settings (ValueError naming the flag)."""
    kmes = dict(args.kme) if args.kme else dict(DEFAULT_KMES)
    seen: dict[str, str] = {}
    for kme, saes in kmes.items():
        for sae in saes:
            if sae in seen and seen[sae] != kme:
                raise ValueError(f"--kme: SAE {sae!r} is attached to both {seen[sae]} and {kme}")
            seen[sae] = kme
    if len(kmes) != len(args.kme or kmes):
        raise ValueError("--kme: a KME ID is given twice")
    _check_numbers(args, len(kmes))
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
    names = sorted(kmes)  # every pair, a KME with itself too (its SAEs share a local store)
    supply_factory = supplies_for(
        args.supply, [(a, b) for i, a in enumerate(names) for b in names[i:]]
    )
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
        supply_factory=supply_factory,
    )


def run(args: argparse.Namespace) -> int:
    """0 after a clean stop; 2 and one line on stderr for a usage, PKI or address problem."""
    try:
        return _run(args)
    except BaseException as exc:  # only the expected kinds become one line, the rest re-raise
        problem = _expected(exc)
        if problem is None:
            raise
        print(f"kme-sim: {problem}", file=sys.stderr)
        return 2


def _expected(exc: BaseException) -> str | None:
    """The message of a usage or setup error (also alone inside trio's exception groups)."""
    leaves = leaf_errors(exc)
    if leaves and all(isinstance(leaf, (ValueError, OSError, Misconfigured)) for leaf in leaves):
        first = leaves[0]
        if isinstance(first, OSError) and first.filename is not None:
            return f"{first.filename}: {first.strerror or first}"
        return " ".join(str(first).split()) or type(first).__name__
    return None


def _run(args: argparse.Namespace) -> int:
    if args.make_pki:
        kmes = dict(args.kme) if args.kme else dict(DEFAULT_KMES)
        directory = make_pki(args.make_pki, kmes)
        print(
            f"wrote {directory}/ca.pem and a certificate and key per KME and SAE: "
            + ", ".join([*kmes, *(s for v in kmes.values() for s in v)])
        )
        return 0
    if args.pki is None:
        raise ValueError("--pki DIR (or --make-pki DIR) is required")
    settings = settings_from(args)
    if (args.pki / "ca.pem").is_file():  # before trio starts: a PKI problem is one clear line
        added = extend_test_pki(
            args.pki, [*settings.kmes, *(s for v in settings.kmes.values() for s in v)]
        )
        if added:
            print(f"issued certificates for {', '.join(added)} in {args.pki}")
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
