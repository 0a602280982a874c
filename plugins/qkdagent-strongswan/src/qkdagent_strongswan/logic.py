"""Pure decisions of the strongSwan PPK sink: names, versions, when to reauthenticate, progress.

Nothing here talks to charon, so every rule is unit-tested without a daemon.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from qkdagent import Link, decimal

from .config import PpkConfig, render


@dataclass(frozen=True)
class Names:
    """Where one epoch of one link goes: VICI secret id, PPK_ID (owner), IKE connection."""

    secret_id: str
    ppk_id: str
    ike: str | None


def names(cfg: PpkConfig, link: Link, sink: str, epoch: int) -> Names:
    secret_id = render(cfg.secret_id, link=link.name, sink=sink)
    ppk_id = render(cfg.ppk_id, link=link.name, sink=sink)
    ike = render(cfg.ike, link=link.name, sink=sink) if cfg.ike is not None else None
    if cfg.versioned:
        return Names(f"{secret_id}-{epoch}", f"{ppk_id}-{epoch}", ike)
    return Names(secret_id, ppk_id, ike)


def version_prefix(cfg: PpkConfig, link: Link, sink: str) -> str:
    return render(cfg.secret_id, link=link.name, sink=sink) + "-"


def stale_versions(loaded: Iterable[str], prefix: str, current: int, keep: int) -> list[str]:
    """Ids of this link's versioned secrets that fall out of the newest `keep` epochs.

    Ids of other links or of operators (not `<prefix><digits>`) are never touched.
    """
    pattern = re.compile(re.escape(prefix) + r"([0-9]{1,20})")  # ASCII: \d takes any script's
    stale = []
    for secret_id in loaded:
        match = pattern.fullmatch(secret_id)
        if match and int(match.group(1)) <= current - keep:
            stale.append(secret_id)
    return sorted(stale)


def link_versions(loaded: Iterable[str], prefix: str) -> list[str]:
    pattern = re.compile(re.escape(prefix) + r"[0-9]{1,20}")
    return sorted(s for s in loaded if pattern.fullmatch(s))


def should_reauth(cfg: PpkConfig, link: Link) -> bool:
    """Reauthenticate only on the side that installs last.

    The core commits on the link's initiator, installs there, then sends `commit`; the responder
    installs after it (DESIGN §4 steps 4-5). When the responder's install runs, both charons hold
    the new PPK, so a reauthentication started there can succeed. Starting it on the initiator
    would race the responder's install (and block the commit message behind it).
    """
    return cfg.reauth == "responder" and not link.initiator and cfg.ike is not None


TERMINAL_WORDS = ("established", "fail", "FAIL", "giving up", "delet", "NO_PROPOSAL", "invalid")
"""Log text that may mark the end of an IKE SA attempt (checked with `list-sas` afterwards)."""


class Outcome(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


@dataclass
class ReauthTracker:
    """Follows `list-sas` snapshots after a reauth request until a new IKE SA is up or failed.

    `before`: unique ids of the connection's IKE SAs when the reauth was requested. A new SA that
    appears and vanishes without reaching ESTABLISHED means authentication failed (for example
    AUTH_FAILED because the peer holds a different PPK).
    """

    before: frozenset[str]
    seen: set[str] = field(default_factory=set)
    established: str | None = None
    ppk: str | None = None
    """'yes'/'no' as list-sas reports it for the new SA; None if the daemon does not say."""
    gap: bool = False
    """At some point no IKE SA of the connection was ESTABLISHED (break-before-make)."""

    def note(self, event: Mapping[str, object], ike: str) -> bool:
        """Record a new IKE SA of connection `ike` named by a VICI log event.

        True when the event may end the attempt (established, failed, deleted), so it is
        worth looking at `list-sas` now rather than at the next poll.
        """
        uid = event.get("ikesa-uniqueid")
        if event.get("ikesa-name") != ike or not isinstance(uid, str) or uid in self.before:
            return False
        self.seen.add(uid)
        text = str(event.get("msg", ""))
        return any(word in text for word in TERMINAL_WORDS)

    def update(self, sas: Iterable[Mapping[str, object]]) -> Outcome:
        current = {str(sa.get("uniqueid")): sa for sa in sas}
        if not any(sa.get("state") == "ESTABLISHED" for sa in current.values()):
            self.gap = True
        for uid, sa in current.items():
            if uid in self.before:
                continue
            self.seen.add(uid)
            if sa.get("state") == "ESTABLISHED":
                self.established = uid
                ppk = sa.get("ppk")
                self.ppk = ppk if isinstance(ppk, str) else None
                return Outcome.DONE
        if self.seen - set(current):
            return Outcome.FAILED
        return Outcome.PENDING


def sa_uses_ppk(sa: Mapping[str, object]) -> bool | None:
    """Whether an IKE SA reports PPK in use; None when the daemon does not report it."""
    value = sa.get("ppk")
    if value is None:
        return None
    return value == "yes"


def parse_uid(value: object) -> int | None:
    """charon's unique id of an IKE SA (`uniqueid` in list-sas), None if it is not a number."""
    text = str(value)
    return decimal(text, 20)


def newest_uid(sas: Iterable[Mapping[str, object]]) -> int:
    """The highest unique id among `sas` (0 for none)."""
    uids = (parse_uid(sa.get("uniqueid")) for sa in sas)
    return max((uid for uid in uids if uid is not None), default=0)


def ppk_in_effect(sas: Iterable[Mapping[str, object]], need_uid: int | None) -> bool:
    """Whether a connection's IKE SAs show the current PPK in effect.

    No established SA may report `ppk: no`. `need_uid` is set once a reauthentication was
    requested for the current PPK: then an established SA with unique id >= `need_uid` must be
    up. charon numbers IKE SAs in increasing order, so such an SA was created after the PPK was
    loaded (the reauthenticated SA, or a later one or its rekey, which inherits its keys); an
    older SA reporting `ppk: yes` still runs on the previous PPK and does not count.
    """
    established = [sa for sa in sas if sa.get("state") == "ESTABLISHED"]
    if any(sa_uses_ppk(sa) is False for sa in established):
        return False
    if need_uid is None:
        return True
    return any((parse_uid(sa.get("uniqueid")) or 0) >= need_uid for sa in established)


def decode(value: object) -> object:
    """VICI answers hold bytes; turn them into str recursively (ids, states, flags)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, Mapping):
        return {str(k): decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


def flatten_sas(answer: Iterable[Mapping[str, object]]) -> list[dict[str, object]]:
    """`list-sas` yields one {name: sa} dict per IKE SA; return decoded SA dicts with `name`."""
    out: list[dict[str, object]] = []
    for entry in answer:
        for name, sa in entry.items():
            item = decode(sa)
            if isinstance(item, dict):
                item["name"] = decode(name)
                out.append(item)
    return out


def version_at_least(version: str, wanted: tuple[int, ...]) -> bool:
    """Compare a daemon version string ('5.9.8', '6.0.0dr1') with `wanted`."""
    parts = []
    for chunk in version.split("."):
        digits = re.match(r"[0-9]{1,20}", chunk)
        if not digits:
            break
        parts.append(int(digits.group()))
    return tuple(parts) >= wanted


MBB_RE = re.compile(r"^\s*make_before_break\s*=\s*(\S+)", re.MULTILINE)


def make_before_break_setting(texts: Iterable[str]) -> bool | None:
    """The last `make_before_break` value in strongswan.conf texts (None when never set).

    A plain scan, good enough to warn: it does not resolve sections (the option exists only in
    the `charon` section) and reads values the way strongSwan reads booleans.
    """
    value: bool | None = None
    for text in texts:
        for match in MBB_RE.finditer(text):
            value = match.group(1).lower() in ("yes", "true", "1", "enabled")
    return value


def parse_conn_message(text: str, ike: str) -> dict[str, object]:
    """Validate a JSON `load-conn` message `{ike: {...}}` (strings, lists of strings, tables).

    Raises ValueError with a message naming what is wrong.
    """
    import json

    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or list(data) != [ike]:
        raise ValueError(f"must be a JSON object with the single key {ike!r} (the connection)")
    _check_vici_value(data[ike], ike)
    if not isinstance(data[ike], dict):
        raise ValueError(f"{ike}: must be an object")
    return data


def _check_vici_value(value: object, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _check_vici_value(item, f"{where}.{key}")
    elif isinstance(value, list):
        if not all(isinstance(item, (str, int)) and not isinstance(item, bool) for item in value):
            raise ValueError(f"{where}: lists may only hold strings or numbers")
    elif not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ValueError(f"{where}: must be a string, a number, a list or an object")


def with_ppk_id(message: Mapping[str, object], ike: str, ppk_id: str) -> dict[str, object]:
    """A copy of a `load-conn` message whose connection sends `ppk_id`."""
    conn = dict(message[ike])  # type: ignore[call-overload]
    conn["ppk_id"] = ppk_id
    return {ike: conn}
