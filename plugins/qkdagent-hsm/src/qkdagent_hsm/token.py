"""Blocking PKCS#11 operations; every function here runs on the worker thread (see worker.py).

An agent keeps one logged-in session per token, shared by its sinks on that token: the `opened`
table the caller passes in, held in the agent's stash (state.py), so two agents in one process
share nothing of it. What is process-wide is the module's own state: it is loaded and
C_Initialize'd once per process (`_libs`), and it may be re-initialised only while no agent has
a session on it (`_sessions`). Login state belongs to the application too: a second agent on the
same token finds it logged in (CKR_USER_ALREADY_LOGGED_IN) and opens its session without a PIN,
and keeps the login only while the first agent's session stays open. Each open token keeps an index
label -> objects, built with one scan when the token is opened and maintained by our own creates
and destroys: SoftHSM's C_FindObjects costs O(objects on the token) (≈50 ms at 2,000 objects),
which would dominate every rotation. A stale handle (someone else deleted an object) makes the
operation rebuild the index and retry once.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from qkdagent import Misconfigured, NotInstalled, Secret, SinkError

from . import naming
from .naming import Existing
from .uri import TokenSelector
from .worker import in_worker

log = logging.getLogger(__name__)
T = TypeVar("T")

YUBICO_LABEL_LIMIT = 40
YUBICO_ID_BYTES = 2
DEFAULT_LABEL_LIMIT = 255
"""PKCS#11 sets no label limit; 255 keeps `pkcs:object=...` identities usable as TLS-PSK ids."""


@dataclass(frozen=True)
class TokenSpec:
    module: str
    selector: TokenSelector


@dataclass(frozen=True)
class TokenInfo:
    """Public facts about the token (no secrets): used in messages and limit checks."""

    label: str
    serial: str
    manufacturer: str
    model: str
    slot_id: int

    @property
    def is_yubihsm(self) -> bool:
        return "yubico" in self.manufacturer.lower() or "yubihsm" in self.model.lower()

    @property
    def label_limit(self) -> int | None:
        return YUBICO_LABEL_LIMIT if self.is_yubihsm else None

    @property
    def id_limit(self) -> int | None:
        return YUBICO_ID_BYTES if self.is_yubihsm else None


@dataclass
class OpenToken:
    """A logged-in session on one token, shared by the sinks of one agent using the token."""

    key: TokenKey
    session: Any
    info: TokenInfo
    users: int = 0
    _index: dict[str, list[Existing]] | None = field(default=None, repr=False)

    def index(self) -> dict[str, list[Existing]]:
        if self._index is None:
            self._index = _scan(self.session)
        return self._index

    def forget_index(self) -> None:
        self._index = None


@dataclass(frozen=True)
class KeyPolicy:
    """How objects are created: attributes chosen by the operator's config."""

    key_type: str
    sensitive: bool
    extractable: bool


@dataclass(frozen=True)
class InstallResult:
    created: bool
    destroyed: int
    relabelled: int


TokenKey = tuple[str, str, int]
"""(module, serial, slot ID): which token an `OpenToken` is on."""

_libs: dict[str, Any] = {}
"""Loaded modules by path: C_Initialize happens once per process, whichever agent loads it."""
_sessions: dict[str, int] = {}
"""Sessions open on each module, all agents of the process together (see `_select`)."""


def _pkcs11() -> Any:
    try:
        import pkcs11
    except ImportError as exc:  # pragma: no cover - dependency of the distribution
        raise NotInstalled("python-pkcs11 is not installed (pip install python-pkcs11)") from exc
    return pkcs11


def _load(module: str) -> Any:
    lib = _libs.get(module)
    if lib is not None:
        return lib
    pkcs11 = _pkcs11()
    if not os.path.exists(module):
        raise NotInstalled(f"PKCS#11 module {module} does not exist")
    try:
        lib = pkcs11.lib(module)
    except pkcs11.PKCS11Error as exc:
        raise NotInstalled(f"PKCS#11 module {module} cannot be loaded: {exc}") from exc
    _libs[module] = lib
    return lib


def _token_info(token: Any, slot_id: int) -> TokenInfo:
    serial = token.serial
    if isinstance(serial, bytes):
        serial = serial.decode("ascii", "replace")
    return TokenInfo(
        label=token.label.strip(),
        serial=serial.strip(),
        manufacturer=token.manufacturer_id.strip(),
        model=token.model.strip(),
        slot_id=slot_id,
    )


def _candidates(lib: Any) -> list[tuple[Any, TokenInfo]]:
    pkcs11 = _pkcs11()
    found = []
    for slot in lib.get_slots(token_present=True):
        try:
            token = slot.get_token()
        except pkcs11.PKCS11Error:
            # Not present, not recognised, or (SoftHSM) deleted since C_Initialize.
            continue
        found.append((token, _token_info(token, slot.slot_id)))
    return found


def _select(spec: TokenSpec) -> tuple[Any, TokenInfo]:
    lib = _load(spec.module)
    for attempt in range(2):
        tokens = _candidates(lib)
        hits = [
            (tok, info)
            for tok, info in tokens
            if spec.selector.matches(
                label=info.label,
                manufacturer=info.manufacturer,
                serial=info.serial,
                model=info.model,
                slot_id=info.slot_id,
            )
        ]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise Misconfigured(
                f"{len(hits)} tokens in {spec.module} match {spec.selector.describe()}; "
                "add serial= to the token URI"
            )
        if attempt == 0 and not _sessions.get(spec.module):
            # Modules such as SoftHSM list tokens only as of C_Initialize; a token initialised
            # since then appears after a re-initialisation, which is safe with no open sessions.
            lib.reinitialize()
    present = ", ".join(repr(info.label) for _, info in tokens if info.label) or "none"
    raise NotInstalled(
        f"no token matching {spec.selector.describe()} in {spec.module} "
        f"(initialised tokens: {present})"
    )


def acquire(opened: dict[TokenKey, OpenToken], spec: TokenSpec, pin: Secret) -> OpenToken:
    """Open (or share, from the agent's `opened`) the logged-in session on the selected token;
    errors say what to fix."""
    assert in_worker()
    pkcs11 = _pkcs11()
    token, info = _select(spec)
    key = (spec.module, info.serial, info.slot_id)
    entry = opened.get(key)
    if entry is not None:
        entry.users += 1
        return entry
    flags = pkcs11.TokenFlag(token.flags)
    name = f"token {info.label!r} ({spec.module})"
    if not flags & pkcs11.TokenFlag.TOKEN_INITIALIZED:
        raise Misconfigured(f"{name} is not initialised")
    if flags & pkcs11.TokenFlag.USER_PIN_LOCKED:
        raise Misconfigured(f"{name}: the user PIN is locked; unlock it with the SO PIN")
    if flags & pkcs11.TokenFlag.WRITE_PROTECTED:
        raise Misconfigured(f"{name} is write-protected")
    try:
        pin_text = pin.reveal().decode("utf-8")
    except UnicodeDecodeError:
        raise Misconfigured(f"{name}: the PIN is not valid UTF-8") from None
    try:
        session = token.open(rw=True, user_pin=pin_text)
    except pkcs11.PinIncorrect:
        raise Misconfigured(f"{name}: the PIN was rejected (CKR_PIN_INCORRECT)") from None
    except pkcs11.PinLocked:
        raise Misconfigured(f"{name}: the user PIN is locked (CKR_PIN_LOCKED)") from None
    except (pkcs11.PinInvalid, pkcs11.PinLenRange):
        raise Misconfigured(f"{name}: the PIN has an invalid form or length") from None
    except pkcs11.UserPinNotInitialized:
        raise Misconfigured(f"{name}: the user PIN is not initialised") from None
    except pkcs11.UserAlreadyLoggedIn:
        # Another part of this process logged in already; the login is application-wide.
        session = token.open(rw=True)
    except pkcs11.PKCS11Error as exc:
        raise Misconfigured(f"{name}: cannot open a session: {type(exc).__name__}") from None
    finally:
        del pin_text
    entry = OpenToken(key, session, info, users=1)
    opened[key] = entry
    _sessions[spec.module] = _sessions.get(spec.module, 0) + 1
    return entry


def release(opened: dict[TokenKey, OpenToken], entry: OpenToken) -> None:
    """Drop one user of the agent's session; the last one closes it."""
    assert in_worker()
    entry.users -= 1
    if entry.users > 0:
        return
    if opened.get(entry.key) is entry:
        del opened[entry.key]
    module = entry.key[0]
    _sessions[module] -= 1
    if not _sessions[module]:
        del _sessions[module]
    entry.forget_index()
    try:
        entry.session.close()
    except _pkcs11().PKCS11Error as exc:
        log.warning("closing the session on token %r failed: %s", entry.info.label, exc)


def _scan(session: Any) -> dict[str, list[Existing]]:
    pkcs11 = _pkcs11()
    index: dict[str, list[Existing]] = {}
    for obj in session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY}):
        try:
            label = obj[pkcs11.Attribute.LABEL]
            object_id = bytes(obj[pkcs11.Attribute.ID])
        except pkcs11.PKCS11Error:
            continue
        index.setdefault(label, []).append(Existing(label, object_id, obj))
    return index


def _with_retry(entry: OpenToken, op: Callable[[], T]) -> T:
    """Run `op`; on a stale handle rebuild the index and run it once more."""
    assert in_worker()
    pkcs11 = _pkcs11()
    stale = (pkcs11.ObjectHandleInvalid, pkcs11.KeyHandleInvalid)
    try:
        try:
            return op()
        except stale:
            log.info("token %r changed behind our back; rescanning it", entry.info.label)
            entry.forget_index()
            return op()
    except (Misconfigured, NotInstalled, SinkError):
        raise
    except pkcs11.PKCS11Error as exc:
        entry.forget_index()
        raise SinkError(f"token {entry.info.label!r}: {type(exc).__name__} {exc}".strip()) from None


def _token_mac(obj: Existing, challenge: bytes) -> bytes:
    return bytes(obj.handle.sign(challenge, mechanism=_pkcs11().Mechanism.SHA256_HMAC))


def _holds(obj: Existing, value: bytes) -> bool:
    """Whether the object holds `value`: an HMAC inside the token (works when sensitive)."""
    challenge = os.urandom(32)
    try:
        mac = _token_mac(obj, challenge)
    except _pkcs11().PKCS11Error:
        return False
    return hmac.compare_digest(mac, hmac.new(value, challenge, hashlib.sha256).digest())


def _key_type(name: str) -> Any:
    types = _pkcs11().KeyType
    return {"generic_secret": types.GENERIC_SECRET, "sha256_hmac": types.SHA256_HMAC}[name]


def _link_objects(entry: OpenToken, labels: tuple[str, ...]) -> list[Existing]:
    index = entry.index()
    return [obj for label in labels for obj in index.get(label, ())]


def install(
    entry: OpenToken,
    *,
    label: str,
    retired_label: str | None,
    keep: list[bytes],
    secret: Secret,
    policy: KeyPolicy,
) -> InstallResult:
    """Store `secret` under (label, keep[0]) and apply the retention plan, in that order.

    The new object exists before any old one is relabelled or destroyed, so the link is never
    without a key; all of it runs in one worker job, so no other token call interleaves.
    """
    pkcs11 = _pkcs11()
    Attribute = pkcs11.Attribute
    labels = (label,) if retired_label is None else (label, retired_label)

    def op() -> InstallResult:
        value = secret.reveal()
        existing = _link_objects(entry, labels)
        same = next(
            (
                obj
                for obj in existing
                if obj.label == label and obj.object_id == keep[0] and _holds(obj, value)
            ),
            None,
        )
        plan = naming.plan_rotation(
            existing, label=label, retired_label=retired_label, keep=keep, same_secret=same
        )
        index = entry.index()
        created: Existing | None = None
        if plan.create:
            handle = entry.session.create_object(
                {
                    Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: _key_type(policy.key_type),
                    Attribute.VALUE: value,
                    Attribute.LABEL: label,
                    Attribute.ID: keep[0],
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: policy.sensitive,
                    Attribute.EXTRACTABLE: policy.extractable,
                    Attribute.SIGN: True,
                    Attribute.VERIFY: True,
                }
            )
            created = Existing(label, keep[0], handle)
            index.setdefault(label, []).append(created)
        for obj in plan.relabel:
            assert retired_label is not None
            _relabel(entry, obj, retired_label, undo=created)
            index[obj.label].remove(obj)
            index.setdefault(retired_label, []).append(
                Existing(retired_label, obj.object_id, obj.handle)
            )
        for obj in plan.destroy:
            obj.handle.destroy()
            index[obj.label].remove(obj)
        return InstallResult(plan.create, len(plan.destroy), len(plan.relabel))

    return _with_retry(entry, op)


_UNMAPPED_CKR = {0x1B: "CKR_ACTION_PROHIBITED"}
"""Return values python-pkcs11 raises as a bare PKCS11Error("Unmapped error code 0x..")."""


def _ckr(exc: Exception) -> str:
    """A short name for a PKCS#11 error, for messages."""
    if type(exc) is not _pkcs11().PKCS11Error:
        return type(exc).__name__
    text = str(exc)
    code = text.rpartition("0x")[2]
    try:
        return _UNMAPPED_CKR.get(int(code, 16), text)
    except ValueError:
        return text


def _relabel(entry: OpenToken, obj: Existing, retired_label: str, undo: Existing | None) -> None:
    """Move a retained older key to `retired_label`, or fail clearly and leave the label as it was.

    A token that refuses to change CKA_LABEL (CKA_MODIFIABLE false, CKR_ACTION_PROHIBITED, a
    module without C_SetAttributeValue) would otherwise leave two keys under the label, so the
    object created by this rotation (`undo`) is destroyed again before the error is raised.
    """
    pkcs11 = _pkcs11()
    try:
        obj.handle[pkcs11.Attribute.LABEL] = retired_label
    except (pkcs11.ObjectHandleInvalid, pkcs11.KeyHandleInvalid):
        raise  # stale handle: _with_retry rescans and runs the rotation again
    except pkcs11.PKCS11Error as exc:
        entry.forget_index()
        if undo is not None:
            try:
                undo.handle.destroy()
            except pkcs11.PKCS11Error:
                log.warning(
                    "token %r: could not roll back %s after a refused relabel",
                    entry.info.label,
                    naming.identity(undo.label, undo.object_id),
                )
        raise SinkError(
            f"token {entry.info.label!r} refused to relabel "
            f"{naming.identity(obj.label, obj.object_id)} to {retired_label!r} ({_ckr(exc)}); "
            "the new key was not stored. Set retired_label = false (older keys keep the label; "
            "consumers then look keys up by label and ID) or retention = 1"
        ) from None


def current_mac(entry: OpenToken, *, label: str, challenge: bytes) -> tuple[bytes, bytes] | None:
    """(ID, HMAC-SHA256 over `challenge`) of the link's newest object under `label`, or None."""

    def op() -> tuple[bytes, bytes] | None:
        objects = _link_objects(entry, (label,))
        newest_id = naming.newest(obj.object_id for obj in objects)
        if newest_id is None:
            return None
        matching = [obj for obj in objects if obj.object_id == newest_id]
        if len(matching) != 1:
            raise SinkError(f"token {entry.info.label!r}: label {label!r} is ambiguous")
        return newest_id, _token_mac(matching[0], challenge)

    return _with_retry(entry, op)


def current_value(entry: OpenToken, *, label: str) -> Secret | None:
    """The newest object's value if the token lets it be read (SENSITIVE false), else None."""
    pkcs11 = _pkcs11()

    def op() -> Secret | None:
        objects = _link_objects(entry, (label,))
        newest_id = naming.newest(obj.object_id for obj in objects)
        for obj in objects:
            if obj.object_id == newest_id:
                try:
                    return Secret(bytes(obj.handle[pkcs11.Attribute.VALUE]))
                except pkcs11.AttributeSensitive:
                    return None
        return None

    return _with_retry(entry, op)


def link_ids(entry: OpenToken, *, labels: tuple[str, ...]) -> dict[str, list[bytes]]:
    """IDs held under each label, from an authoritative C_FindObjects (slow; tests, status)."""
    pkcs11 = _pkcs11()

    def op() -> dict[str, list[bytes]]:
        found: dict[str, list[bytes]] = {}
        for label in labels:
            template = {
                pkcs11.Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY,
                pkcs11.Attribute.LABEL: label,
            }
            found[label] = sorted(
                bytes(obj[pkcs11.Attribute.ID]) for obj in entry.session.get_objects(template)
            )
        return found

    return _with_retry(entry, op)


def erase(entry: OpenToken, *, labels: tuple[str, ...]) -> int:
    """Destroy every secret-key object under the link's labels; returns how many."""
    pkcs11 = _pkcs11()

    def op() -> int:
        # Fail closed: an authoritative search, not only the index, finds every copy.
        count = 0
        for label in labels:
            template = {
                pkcs11.Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY,
                pkcs11.Attribute.LABEL: label,
            }
            for obj in list(entry.session.get_objects(template)):
                obj.destroy()
                count += 1
            if entry._index is not None:
                entry._index.pop(label, None)
        return count

    return _with_retry(entry, op)
