"""Calls for several keys at once: pure decisions (how many keys a call may carry, and when a
shared call's callers go back to one key per call).

Links to the same peer SAE that rotate together (the agent puts rotations on a grid) ask the KME
for keys at the same moment. One Get key with `number` > 1, or one Get key with key IDs naming
several `key_IDs` (POST only: the GET form names one), serves them all with one request (ETSI GS
QKD 014, REFERENCE §1.2, §1.4). A KME's Get status says how many keys one request may carry
(`max_key_per_request`).
"""

from __future__ import annotations

from .retry import Outcome

KEY_OVERHEAD_BYTES = 200
"""A key's JSON beside its base64 value (its key_ID, names, extensions), for the answer's bound."""
SPLITS_BEFORE_PAUSE = 3
"""Shared calls in a row to one SAE that ended with their callers calling one by one: then one
key per call for a while (a KME that refuses several keys in a way no single answer tells)."""


def keys_per_call(
    option: int,
    kme_max: int | None,
    *,
    key_size: int,
    response_limit: int,
    one_id_only: bool = False,
    paused: bool = False,
) -> int:
    """Most keys one call may ask for: the `max_keys_per_call` option within the KME's
    `max_key_per_request` (unknown: one), the answer's byte bound, and one while shared calls
    are paused or the method carries one key ID only (`dec_keys` by GET)."""
    if kme_max is None or one_id_only or paused:
        return 1
    per_key = 4 * -(-key_size // 24) + KEY_OVERHEAD_BYTES  # base64 of key_size bits, and more
    return max(1, min(option, kme_max, response_limit // per_key))


def must_split(count: int, outcome: Outcome, *, status: int | None, not_found_before: bool) -> bool:
    """Whether a call for `count` keys that got `outcome` ends, its callers each calling for
    their own key. Such an answer delivered no key, and one unknown key ID in a shared
    `dec_keys` must not fail the others. A refused connect is retried as it is (it says nothing
    of the call); a 503 is not, as a KME short of key answers a large `number` with it (those it
    can serve are then served); a first "not found" is, once, as the KME may be catching up with
    its peer (REFERENCE §1.5)."""
    if count <= 1 or outcome is Outcome.OK:
        return False
    if outcome is Outcome.UNAVAILABLE:
        return status is not None
    if outcome is Outcome.NOT_FOUND:
        return not_found_before
    return True


def pauses_at_once(operation: str, outcome: Outcome) -> bool:
    """A refusal of our own Get key request (its `number`): no shared calls for a while. On
    `dec_keys` the key IDs come from the peer, so one refusal proves nothing of the form."""
    return operation == "enc_keys" and outcome in (Outcome.REJECTED, Outcome.UNAUTHORIZED)
