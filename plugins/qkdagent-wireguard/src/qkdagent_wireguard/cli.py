"""`qkdagent-wireguard broker`: the privileged PSK setter an unprivileged agent talks to."""

from __future__ import annotations

import argparse
import grp
import logging
import pwd
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from qkdagent import decimal

from .auto import AutoBackend
from .backend import Backend
from .broker import Broker, bind_socket, parse_allow, serve
from .netlink import NetlinkBackend
from .uapi import UapiBackend


def _uid(text: str) -> int:
    number = decimal(text, 10)
    return number if number is not None else pwd.getpwnam(text).pw_uid


def _gid(text: str) -> int:
    number = decimal(text, 10)
    return number if number is not None else grp.getgrnam(text).gr_gid


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qkdagent-wireguard")
    commands = parser.add_subparsers(dest="command", required=True)
    broker = commands.add_parser(
        "broker", help="serve PSK updates for listed interface/peer pairs over a unix socket"
    )
    broker.add_argument("--socket", required=True, type=Path, help="unix socket to listen on")
    broker.add_argument(
        "--allow",
        action="append",
        required=True,
        metavar="IFACE:PEER",
        help="an interface and a peer public key (base64) callers may set; repeatable",
    )
    broker.add_argument(
        "--user",
        action="append",
        default=[],
        help="user name or uid allowed to call (repeatable; default: root only)",
    )
    broker.add_argument(
        "--group",
        action="append",
        default=[],
        help="group name or gid allowed to call (repeatable); matches the caller's primary gid "
        "only (SO_PEERCRED carries no supplementary groups)",
    )
    broker.add_argument(
        "--socket-group", help="group owning the socket (mode 0660), e.g. the agent's group"
    )
    broker.add_argument("--backend", choices=("auto", "netlink", "uapi"), default="auto")
    broker.add_argument("--uapi-dir", type=Path, default=Path("/run/wireguard"))
    broker.add_argument("-v", "--verbose", action="store_true")
    return parser


def run_broker(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="qkdagent-wireguard broker: %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    log = logging.getLogger("qkdagent_wireguard.broker")
    try:
        allow = parse_allow(args.allow)
        uids = frozenset(_uid(u) for u in args.user) if args.user else frozenset({0})
        gids = frozenset(_gid(g) for g in args.group)
        socket_group = _gid(args.socket_group) if args.socket_group else None
    except (ValueError, KeyError) as exc:
        print(f"qkdagent-wireguard broker: {exc}", file=sys.stderr)
        return 2
    backend: Backend
    if args.backend == "uapi":
        backend = UapiBackend(args.uapi_dir)
    elif args.backend == "netlink":
        backend = NetlinkBackend()
    else:
        backend = AutoBackend(args.uapi_dir)
    broker = Broker(backend, allow, uids, gids)
    try:
        listener = bind_socket(args.socket, group=socket_group)
    except OSError as exc:
        print(f"qkdagent-wireguard broker: cannot listen on {args.socket}: {exc}", file=sys.stderr)
        return 1

    wake, waker = socket.socketpair()

    def stop(signum: int, frame: object) -> None:
        waker.send(b"x")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info(
        "listening on %s for %d interface/peer pairs, uids %s gids %s",
        args.socket,
        len(allow),
        sorted(uids),
        sorted(gids),
    )
    try:
        serve(broker, listener, wake)
    finally:
        listener.close()
        wake.close()
        waker.close()
        backend.close()
        try:
            args.socket.unlink()
        except FileNotFoundError:
            pass
    log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "broker":
        return run_broker(args)
    return 2  # pragma: no cover - argparse enforces the choices


if __name__ == "__main__":
    sys.exit(main())
