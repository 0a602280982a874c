"""`qkdagent pqc keygen`: write a static ML-KEM key pair; `qkdagent pqc pubkey`: print the
public key of a private key file (to provision it again)."""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import stat
import sys
from pathlib import Path

from qkdagent import write_secret_file

from . import kem

MAX_KEY_FILE = 4096


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Static ML-KEM key pairs for the mlkem source. The private key stays on this host "
        "(referenced from the config as sources.NAME.private_key = { file = ... }); the public "
        "key goes to the peer's config (sources.NAME.peer_public_keys.THIS_AGENT), like a "
        "WireGuard public key."
    )
    commands = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    keygen = commands.add_parser("keygen", help="write a new static key pair")
    keygen.add_argument("private_key", type=Path, help="private key file to write (mode 0600)")
    keygen.add_argument(
        "--public-key", type=Path, help="also write the public key here (default: PRIVATE.pub)"
    )
    keygen.add_argument("--force", action="store_true", help="replace an existing private key")
    pubkey = commands.add_parser("pubkey", help="print the public key of a private key file")
    pubkey.add_argument("private_key", type=Path)
    for sub in (keygen, pubkey):
        sub.add_argument("--parameter-set", choices=tuple(kem.PARAMETER_SETS), default=kem.DEFAULT)


def run(args: argparse.Namespace) -> int:
    params = kem.PARAMETER_SETS[args.parameter_set]
    try:
        if args.action == "keygen":
            public = _keygen(params, args.private_key, args.public_key, force=args.force)
        else:
            public = params.private_key(_read_seed(args.private_key)).public_key()
    except (OSError, ValueError) as exc:
        print(f"qkdagent pqc {args.action}: {exc}", file=sys.stderr)
        return 2
    raw = public.public_bytes_raw()
    fp = kem.b64url(kem.fingerprint(params, raw))
    print(f"# {params.name} public key, fingerprint {fp}", file=sys.stderr)
    print(base64.b64encode(raw).decode())
    return 0


def _keygen(
    params: kem.ParameterSet, path: Path, public_path: Path | None, *, force: bool
) -> kem.PublicKey:
    if (path.exists() or path.is_symlink()) and not force:
        raise ValueError(f"{path} exists; --force replaces it (the peer then needs the new key)")
    private = params.generate()
    write_secret_file(path, base64.b64encode(private.private_bytes_raw()) + b"\n")
    public = private.public_key()
    target = public_path or path.with_name(path.name + ".pub")
    write_secret_file(target, base64.b64encode(public.public_bytes_raw()) + b"\n", mode=0o644)
    return public


def _read_seed(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file")
        data = os.read(fd, MAX_KEY_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE:
        raise ValueError(f"{path} is larger than a key file ({MAX_KEY_FILE} bytes)")
    try:
        seed = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{path} is not a base64 private key") from None
    if len(seed) != kem.SEED_SIZE:
        raise ValueError(f"{path} does not hold a {kem.SEED_SIZE}-byte ML-KEM seed")
    return seed
