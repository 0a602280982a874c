"""`qkdagent migrate qupskd QUPSKD.toml [--peer-url URL] [-o DIR]`: write the two configs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qkdagent import write_secret_file

from .migrate import MAX_CONFIG_BYTES, MigrateError, plan, read_qupskd


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Read a quPSKd config and write a phase-1 qkdagent config (quPSKd's protocol, insecure, "
        "beside the peer's quPSKd) and a phase-2 config (the native protocol), then list what "
        "could not be carried over. See docs/migrating-from-qupskd.md."
    )
    parser.add_argument("system", choices=["qupskd"], help="what to migrate from")
    parser.add_argument("config", type=Path, help="the quPSKd TOML file")
    parser.add_argument("--peer-url", help="phase 2: the peer agent's https://HOST:PORT")
    parser.add_argument("--name", help="this agent's name (default: from master_SAE_ID)")
    parser.add_argument("--peer", help="the peer agent's name (default: from remote_SAE_ID)")
    parser.add_argument("--state-dir", default="/var/lib/qkdagent")
    parser.add_argument("--tls-dir", default="/etc/qkdagent", help="where [agent.tls] files go")
    parser.add_argument("-o", "--output", type=Path, default=Path("."), help="directory to write")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")


def run(args: argparse.Namespace) -> int:
    try:
        with open(args.config, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise MigrateError(f"the quPSKd config is larger than {MAX_CONFIG_BYTES} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MigrateError("the quPSKd config is not UTF-8") from None
        if args.peer_url is not None and not args.peer_url.startswith("https://"):
            raise MigrateError("--peer-url: the native protocol needs an https:// URL")
        made = plan(
            read_qupskd(text),
            source=args.config.name,
            name=args.name,
            peer=args.peer,
            peer_native_url=args.peer_url,
            state_dir=args.state_dir,
            tls_dir=args.tls_dir,
        )
        out: Path = args.output
        files = {
            out / f"{made.name}-phase1.toml": made.phase1.encode(),
            out / f"{made.name}-phase2.toml": made.phase2.encode(),
        }
        if made.psk is not None:
            files[out / made.psk_file] = made.psk.encode()
        existing = [str(p) for p in files if p.exists()]
        if existing and not args.force:
            raise MigrateError(f"{', '.join(existing)} exist; use --force to overwrite")
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        for path, data in files.items():
            if path.name.endswith(".qupskd-psk.key"):
                write_secret_file(path, data)
            else:
                path.write_bytes(data)
    except (OSError, MigrateError) as exc:
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"qkdagent migrate: {args.config}: {message}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(str(p) for p in files)}")
    print(f"link {made.link}: {made.name} <-> {made.peer}")
    print(f"phase 2 needs {made.bootstrap_file} from `qkdagent gen-bootstrap` on both sides")
    if made.notes:
        print("not carried over exactly (check these):")
        for note in made.notes:
            print(f"  - {note}")
    return 0
