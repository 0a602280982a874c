"""Pure naming and retention rules: labels, object IDs, which objects a rotation keeps.

Nothing here touches a token, so every rule is unit-tested without SoftHSM.

Object IDs encode the epoch in `width` big-endian bytes. Tokens with short IDs (YubiHSM 2: two
bytes, 0x0001-0xFFFE) wrap around, so IDs run through 1 .. 2**(8*width) - 2 (never all-zero, never
all-ones) and "newest" is decided with serial-number arithmetic (RFC 1982) inside the retention
window, which is always far smaller than half the ID space.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import qkdagent

LABEL_FIELDS = ("peer", "local", "link")
"""Placeholders a label template may use."""

MAX_ID_BYTES = 32

DEFAULT_RETIRED_LABEL = "{label}.old"
"""Retained older keys move here, so the plain label always names exactly one object."""


def id_space(width: int) -> int:
    """How many distinct IDs `width` bytes give once all-zero and all-ones are excluded."""
    if not 1 <= width <= MAX_ID_BYTES:
        raise ValueError(f"ID width must be 1..{MAX_ID_BYTES} bytes")
    return 2 ** (8 * width) - 2


def epoch_id(epoch: int, width: int) -> bytes:
    """The CKA_ID of the object holding `epoch`'s secret (equals the epoch while it fits)."""
    if epoch < 0:
        raise ValueError("epoch must not be negative")
    value = 1 + (epoch - 1) % id_space(width)
    return value.to_bytes(width, "big")


def id_value(object_id: bytes) -> int:
    return int.from_bytes(object_id, "big")


def serial_newer(a: bytes, b: bytes) -> bool:
    """True if ID `a` is newer than ID `b` (same width) under serial-number arithmetic."""
    if len(a) != len(b):
        return len(a) > len(b)
    space = id_space(len(a))
    distance = (id_value(a) - id_value(b)) % space
    return 0 < distance < space // 2


def newest(ids: Iterable[bytes]) -> bytes | None:
    """The newest of a set of IDs (all within a window of less than half the ID space)."""
    best: bytes | None = None
    for candidate in ids:
        if best is None or serial_newer(candidate, best):
            best = candidate
    return best


def keep_window(epoch: int, retention: int, width: int) -> list[bytes]:
    """IDs a rotation to `epoch` keeps, newest first: epoch, epoch-1, ..., epoch-retention+1."""
    if retention < 1:
        raise ValueError("retention must be at least 1")
    return [epoch_id(epoch - i, width) for i in range(retention) if epoch - i >= 0]


def check_retention(retention: int, width: int) -> str | None:
    """Why `retention` cannot work with `width`-byte IDs, or None."""
    if retention < 1:
        return "must be at least 1"
    if retention * 2 >= id_space(width):
        return f"is too large for {width}-byte object IDs (must be below {id_space(width) // 2})"
    return None


@dataclass(frozen=True, eq=False)
class Existing:
    """One object of a link as found on the token (handle is opaque here; compared by identity)."""

    label: str
    object_id: bytes
    handle: Any
    """A python-pkcs11 object (token.py uses it; nothing here does)."""


@dataclass(frozen=True)
class Plan:
    """What one rotation does with the objects a link already has."""

    create: bool
    """False when an object with the new ID already holds the same secret (idempotent install)."""
    destroy: tuple[Existing, ...]
    relabel: tuple[Existing, ...]
    """Retained older objects to move to the retired label (only when one is configured)."""


def plan_rotation(
    existing: Sequence[Existing],
    *,
    label: str,
    retired_label: str | None,
    keep: Sequence[bytes],
    same_secret: Existing | None,
) -> Plan:
    """Decide creates, destroys and relabels so exactly the `keep` IDs remain, once each.

    `keep[0]` is the new epoch's ID. `same_secret` is the existing object with that ID under
    `label` that was checked to hold the new secret already (then nothing is created). Any
    duplicate (label, ID), any ID outside the window and any stray object holding the new ID
    is destroyed, so lookups by label and ID always find at most one object.
    """
    new_id, older = keep[0], set(keep[1:])
    destroy: list[Existing] = []
    relabel: list[Existing] = []
    kept_older: set[bytes] = set()
    for obj in existing:
        if obj.object_id == new_id:
            if obj is not same_secret:
                destroy.append(obj)
        elif obj.object_id in older and obj.object_id not in kept_older:
            kept_older.add(obj.object_id)
            if retired_label is not None and obj.label != retired_label:
                relabel.append(obj)
        else:
            destroy.append(obj)
    return Plan(create=same_secret is None, destroy=tuple(destroy), relabel=tuple(relabel))


def check_template(template: str, extra: tuple[str, ...] = ()) -> str | None:
    """Why a label template is unusable (unknown placeholder, format spec), or None."""
    return qkdagent.check_template(template, LABEL_FIELDS + extra)


def render(template: str, *, peer: str, local: str, link: str) -> str:
    return template.format(peer=peer, local=local, link=link)


def check_label(label: str, limit: int, what: str) -> str | None:
    """Why a rendered label cannot go on the token, or None."""
    size = len(label.encode("utf-8"))
    if not label:
        return f"{what} is empty"
    if size > limit:
        return f"{what} {label!r} is {size} bytes, longer than the token's limit of {limit}"
    if not label.isprintable():
        return f"{what} {label!r} contains control characters"
    return None


@dataclass(frozen=True)
class LinkLabels:
    """The labels one link's objects carry: the current key's, and the retained older keys'."""

    label: str
    retired: str | None

    def all(self) -> tuple[str, ...]:
        return (self.label,) if self.retired is None else (self.label, self.retired)


def link_labels(
    template: str,
    retired_template: str | None,
    fixed: Mapping[str, str],
    *,
    link: str,
    peer: str,
    local: str,
) -> LinkLabels:
    """Render a link's labels: `fixed[link]` wins over the template; retired adds `{label}`."""
    label = fixed.get(link) or render(template, peer=peer, local=local, link=link)
    retired = None
    if retired_template is not None:
        retired = retired_template.format(label=label, peer=peer, local=local, link=link)
    return LinkLabels(label, retired)


def check_link_labels(labels: LinkLabels, limit: int, link: str) -> str | None:
    """Why one link's labels cannot go on the token (too long, empty, equal), or None."""
    problem = check_label(labels.label, limit, f"object_label for link {link!r}")
    if problem is None and labels.retired is not None:
        problem = check_label(labels.retired, limit, f"retired_label for link {link!r}")
        if problem is None and labels.retired == labels.label:
            problem = f"retired_label for link {link!r} equals its label {labels.label!r}"
    return problem


def label_clash(owners: Mapping[str, str], link: str, labels: LinkLabels) -> str | None:
    """Why `link` cannot use `labels` when `owners` maps labels to the links using them."""
    for text in labels.all():
        owner = owners.get(text, link)
        if owner != link:
            return (
                f"links {owner!r} and {link!r} both map to label {text!r}; "
                "set object_labels or an object_label template with {link}"
            )
    return None


def check_links(labels: Mapping[str, LinkLabels], limit: int) -> str | None:
    """Why this set of links (name -> labels) cannot share one token, or None."""
    owners: dict[str, str] = {}
    for link, pair in labels.items():
        problem = check_link_labels(pair, limit, link) or label_clash(owners, link, pair)
        if problem:
            return problem
        owners.update((text, link) for text in pair.all())
    return None


def identity(label: str, object_id: bytes) -> str:
    """The TLS-PSK identity naming one object: `pkcs:object=<label>;id=<hex id>`."""
    return f"pkcs:object={label};id={object_id.hex()}"
