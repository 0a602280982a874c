"""`qkdagent dske-hub`: one security hub as its own process."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import ssl
from pathlib import Path

import trio

from qkdagent import Misconfigured, write_test_pki

from . import wire
from .hubapp import Hub, HubSettings
from .hubserver import serve_hub, server_ssl_context

log = logging.getLogger("qkdagent.dske.hub")


def _name(text: str) -> str:
    if not wire.NAME.fullmatch(text):
        raise argparse.ArgumentTypeError("a hub name is 1..64 letters, digits, '.', '_' or '-'")
    return text


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Serve a DSKE security hub (dske-python's hub API under /<name>/dske/...) over HTTPS "
        "with mutual TLS; PSRD pools and shares in transit are kept in SQLite under --state."
    )
    parser.add_argument("--name", type=_name, help="the hub's name (required to serve)")
    parser.add_argument("--state", type=Path, help="state directory, 0700 (required to serve)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (see --ready-file)")
    parser.add_argument("--cert", type=Path, help="server certificate (PEM)")
    parser.add_argument("--key", type=Path, help="its private key (PEM)")
    parser.add_argument("--ca", type=Path, help="CA that signs client certificates (PEM)")
    parser.add_argument(
        "--plain-http",
        action="store_true",
        help="serve plain HTTP without client identities (labs, interop with dske-python)",
    )
    parser.add_argument("--max-block", type=int, default=1 << 20, help="largest PSRD block")
    parser.add_argument("--share-ttl", type=float, default=3600.0, help="seconds a share is kept")
    parser.add_argument(
        "--ready-file", type=Path, help="written with the port once listening (for supervisors)"
    )
    parser.add_argument(
        "--make-pki",
        type=Path,
        metavar="DIR",
        help="write a throw-away test PKI (ca.pem, <name>.pem/.key for --pki-names) and exit",
    )
    parser.add_argument(
        "--pki-names",
        default="hank,helen,hilary,holly,hugo,alice,bob",
        help="comma-separated names for --make-pki (hubs and clients)",
    )


def run(args: argparse.Namespace) -> int:
    if args.make_pki:
        names = [n for n in args.pki_names.split(",") if n]
        if not names or not all(wire.NAME.fullmatch(n) for n in names):
            log.error("dske-hub: --pki-names is a comma-separated list of names")
            return 2
        write_test_pki(args.make_pki, names)
        print(f"wrote {args.make_pki}/ca.pem and a certificate and key for {', '.join(names)}")
        return 0
    if args.name is None or args.state is None:
        log.error("dske-hub: --name and --state are required")
        return 2
    if not args.plain_http and not (args.cert and args.key and args.ca):
        log.error("dske-hub: --cert, --key and --ca are required (or --plain-http)")
        return 2
    if not 64 <= args.max_block <= wire.MAX_BLOCK_SIZE:
        log.error("dske-hub: --max-block must be in 64..%d", wire.MAX_BLOCK_SIZE)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return trio.run(_main, args)


async def _main(args: argparse.Namespace) -> int:
    if args.plain_http:
        log.warning(
            "dske-hub %s: INSECURE --plain-http: no TLS and no client identities; anyone on "
            "the path can read and forge requests (labs and interop only)",
            args.name,
        )
    # certificate files first: a bad one leaves no state behind
    context = None
    if not args.plain_http:
        try:
            context = await trio.to_thread.run_sync(
                server_ssl_context, args.cert, args.key, args.ca
            )
        except Misconfigured as exc:  # never a passphrase prompt: an encrypted key is refused
            log.error("%s", exc)
            return 2
        except (ssl.SSLError, OSError) as exc:  # the CA file
            log.error("dske-hub: cannot load --ca %s: %s", args.ca, exc)
            return 2
    args.state.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(args.state, 0o700)
    settings = HubSettings(
        args.name,
        max_block=args.max_block,
        share_ttl=args.share_ttl,
        require_tls_identity=not args.plain_http,
    )
    # SQLite off the trio thread; then batches on it (inline: this process only serves the
    # hub, whose every answer waits for its batch anyway)
    db_path = args.state / f"{args.name}.sqlite"
    hub = await trio.to_thread.run_sync(lambda: Hub(settings, db_path, inline=True))
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                lambda task_status: serve_hub(
                    hub,
                    host=args.host,
                    port=args.port,
                    ssl_context=context,
                    task_status=task_status,
                )
            )
            scheme = "http" if context is None else "https"
            log.info(
                "dske-hub %s listening on %s://%s:%d/%s",
                args.name,
                scheme,
                args.host,
                port,
                args.name,
            )
            if args.ready_file:
                tmp = args.ready_file.with_suffix(".tmp")
                tmp.write_text(f"{port}\n")
                tmp.replace(args.ready_file)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    log.info("dske-hub %s stopping", args.name)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        hub.close()
    return 0
