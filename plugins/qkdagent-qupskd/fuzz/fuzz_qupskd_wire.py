"""Fuzz target for everything the plugin parses from outside: the peer's answers, the stored
chain state, the link options' addresses and the quPSKd config `migrate` reads.

`target(data)` feeds the bytes to each parser (the first byte picks which); a parser may only
refuse with its own typed error (`WireError`, `ChainError`, `MigrateError`; the address checks
return a message instead). Run it with atheris or standalone:

    python3 plugins/qkdagent-qupskd/fuzz/fuzz_qupskd_wire.py [seconds]
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from qkdagent_qupskd import chain, migrate, settings, wire

from qkdagent.testing import mutation_loop, selecting_target


def _address(parse: Callable[[str], tuple[str, int] | str], data: bytes) -> None:
    result = parse(data.decode("latin-1"))
    assert isinstance(result, str) or (isinstance(result[0], str) and 0 < result[1] < 65536)


PARSERS: tuple[Callable[[bytes], object], ...] = (
    wire.parse_key_answer,
    wire.parse_ack,
    chain.ChainState.decode,
    lambda d: _address(settings.split_peer_url, d),
    lambda d: _address(settings.split_listen, d),
    lambda d: migrate.read_qupskd(d.decode("utf-8", "replace")),
)
ERRORS = (wire.WireError, chain.ChainError, migrate.MigrateError)

SEEDS = (
    b"\x00" + wire.key_answer("0b5fd5a4-1d36-4c1a-9a3b-3b4b0f0e6c2a"),
    b"\x01" + wire.ack_answer(),
    b"\x02" + chain.ChainState(chain.initial("x"), caller=True).encode(),
    b"\x03http://[::1]:5556",
    b"\x04127.0.0.1:5555",
    b"\x05"
    b'qupskd_bind = "localhost"\nqupskd_port = 5555\netsi_url = "http://localhost:5555"\n'
    b'remote_qupskd_url = "http://localhost:5556"\nremote_SAE_ID = "sae_bob"\n'
    b'key_folder = "./psk"\nalias = "bob"\npsk = "x"\nx = [[1], {y = 2}]\n',
)


target = selecting_target(PARSERS, [ERRORS] * len(PARSERS))


def main(seconds: float) -> None:
    mutation_loop(target, SEEDS, seconds, selectors=len(PARSERS))


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 10.0)
