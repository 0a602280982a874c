"""Which identities a PSK file holds, and for how long (pure decision logic, no I/O).

The sink owns its file. Its bookkeeping (`Slot`s: identity, link, epoch, expiry; never key bytes)
is persisted beside the agent's state; key bytes exist only in the PSK file itself. Rotation keeps
the link's previous identity until `expires` so clients that have not yet rotated still connect;
the current identity of every link comes first, which is what stunnel clients use by default.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from .formats import Entry


@dataclass(frozen=True)
class Slot:
    identity: str
    link: str
    epoch: int
    expires: float | None = None
    """Wall-clock time after which a previous identity is removed; None for the current one."""

    @property
    def current(self) -> bool:
        return self.expires is None


PLACEHOLDER_LINK = ""
"""Slots of this pseudo-link hold a random identity and key so a file is never empty (stunnel
refuses an empty PSKsecrets file and would then keep serving its old keys)."""


def after_install(
    slots: list[Slot], link: str, identity: str, epoch: int, now: float, grace: float
) -> list[Slot]:
    """Slots after `identity` became the link's current one.

    The link's previous current identity is kept until now+grace (if grace > 0 and it differs);
    anything older, expired or placeholder is dropped.
    """
    kept: list[Slot] = []
    for slot in slots:
        if slot.link == PLACEHOLDER_LINK or slot.identity == identity:
            continue
        if slot.link != link:
            kept.append(slot)
        elif slot.current and grace > 0:
            kept.append(Slot(slot.identity, link, slot.epoch, now + grace))
    kept.append(Slot(identity, link, epoch))
    return order(expire(kept, now))


def after_erase(slots: list[Slot], link: str, now: float) -> list[Slot]:
    return order(expire([s for s in slots if s.link != link], now))


def expire(slots: list[Slot], now: float) -> list[Slot]:
    return [s for s in slots if s.expires is None or s.expires > now]


def next_expiry(slots: list[Slot]) -> float | None:
    times = [s.expires for s in slots if s.expires is not None]
    return min(times) if times else None


def order(slots: list[Slot]) -> list[Slot]:
    """Current identities first (stable), then previous ones, then placeholders."""
    return sorted(slots, key=lambda s: (s.link == PLACEHOLDER_LINK, not s.current))


def entries(slots: list[Slot], keys: dict[str, bytes]) -> list[Entry]:
    """Pair slots with their keys; slots whose key is unknown are skipped."""
    return [Entry(s.identity, keys[s.identity]) for s in slots if s.identity in keys]


def removed(before: list[Slot], after: list[Slot], keys: dict[str, bytes]) -> list[Entry]:
    """Entries of real links that were in `before` but are gone from `after` (to prove the
    consumer no longer accepts them)."""
    kept = {s.identity for s in after}
    gone = [s for s in before if s.identity not in kept and s.link != PLACEHOLDER_LINK]
    return entries(gone, keys)


def current_slot(slots: list[Slot], link: str) -> Slot | None:
    return next((s for s in slots if s.link == link and s.current), None)


# -- persistence (small JSON, no key bytes) ---------------------------------------------------


def dumps(slots: list[Slot]) -> bytes:
    return json.dumps({"version": 1, "slots": [asdict(s) for s in slots]}, indent=1).encode()


def loads(data: bytes) -> list[Slot]:
    """Parse bookkeeping; raises ValueError on anything unexpected."""
    try:
        doc = json.loads(data)
    except RecursionError:  # nested deeper than the parser recurses
        raise ValueError("slot file nested too deeply") from None
    if (
        not isinstance(doc, dict)
        or doc.get("version") != 1
        or not isinstance(doc.get("slots"), list)
    ):
        raise ValueError("unknown slot file layout")
    slots = []
    for item in doc["slots"]:
        if not isinstance(item, dict) or set(item) != {"identity", "link", "epoch", "expires"}:
            raise ValueError("malformed slot")
        identity, link, epoch, expires = (item[k] for k in ("identity", "link", "epoch", "expires"))
        if not isinstance(identity, str) or not isinstance(link, str):
            raise ValueError("malformed slot")
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise ValueError("malformed slot")
        if expires is not None and (
            isinstance(expires, bool) or not isinstance(expires, (int, float))
        ):
            raise ValueError("malformed slot")
        slots.append(Slot(identity, link, epoch, None if expires is None else float(expires)))
    return slots


def placeholder() -> tuple[Slot, bytes]:
    """A random identity with a random key: matches no client."""
    identity = "qkdagent-none-" + os.urandom(8).hex()
    return Slot(identity, PLACEHOLDER_LINK, 0), os.urandom(32)
