"""qkdm-sim's key supplies: the core seam (`qkdagent.KeySupply`, `CsprngSupply`, entry-point
supplies) plus what only the simulator needs, turning `--supply NAME[:KEY=VALUE,...]` into one
supply per module pair before anything listens, so a bad spec or a failing engine is one clear
`ValueError` (exit 2), never a traceback from inside the server.
"""

from __future__ import annotations

from collections.abc import Iterable

from qkdagent import (
    CsprngSupply,
    KeySupply,
    SupplyExhausted,
    SupplyFactory,
    load_supply_factory,
    parse_supply_spec,
)

__all__ = [
    "BUILTIN",
    "CsprngSupply",
    "KeySupply",
    "SupplyExhausted",
    "SupplyFactory",
    "supplies_for",
]

BUILTIN = "csprng"
"""The default supply's name: a CSPRNG link of the rate given by `--rate`."""


def supplies_for(spec: str | None, links: Iterable[tuple[str, str]]) -> SupplyFactory | None:
    """The factory `--supply spec` names, its supplies made now for every link in `links`.

    None for the built-in CSPRNG supply (the simulator makes it from `--rate`). A supply asked
    for a link not made here is made on demand by the same factory.
    """
    if spec is None:
        return None
    name, options = parse_supply_spec(spec)
    if name == BUILTIN:
        if options:
            raise ValueError(f"supply {BUILTIN!r} takes no options (its rate is --rate)")
        return None
    try:
        factory = load_supply_factory(name, options)
    except ValueError as exc:
        raise ValueError(f"--supply {name}: {exc}") from None
    except Exception as exc:  # a broken plugin: one line naming it, not its traceback
        raise ValueError(f"--supply {name}: cannot load it ({type(exc).__name__}: {exc})") from None
    made: dict[tuple[str, str], KeySupply] = {}
    for a, b in links:
        pair = (min(a, b), max(a, b))
        try:
            made[pair] = factory(*pair)
        except Exception as exc:
            raise ValueError(
                f"--supply {name}: no supply for link {pair[0]}-{pair[1]} "
                f"({type(exc).__name__}: {exc})"
            ) from None

    def prebuilt(a: str, b: str) -> KeySupply:
        pair = (min(a, b), max(a, b))
        supply = made.get(pair)
        return supply if supply is not None else factory(*pair)

    return prebuilt
