"""`python -m qkdagent_etsi014 kme-sim ...`: the command without the core CLI."""

from __future__ import annotations

import argparse
import sys

from .cli import configure, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qkdagent_etsi014")
    commands = parser.add_subparsers(dest="command", required=True)
    configure(commands.add_parser("kme-sim", help="run simulated ETSI GS QKD 014 KMEs"))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
