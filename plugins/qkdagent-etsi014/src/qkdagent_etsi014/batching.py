"""Calls for several keys at once: pure decisions (how many keys a call may carry, and when a
shared call's callers go back to one key per call).

Links to the same peer SAE that rotate together (the agent puts rotations on a grid) ask the KME
for keys at the same moment. One Get key with `number` > 1, or one Get key with key IDs naming
several `key_IDs` (POST only: the GET form names one), serves them all with one request (ETSI GS
QKD 014, REFERENCE §1.2, §1.4). A KME's Get status says how many keys one request may carry
(`max_key_per_request`).
"""

from __future__ import annotations

from enum import Enum

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


class Shared(Enum):
    """What becomes of a call for several keys that got no keys."""

    AS_ONE = "as one"  # as a call for one key would be (retried, the method switched, failed)
    AGAIN = "again"  # made again whole, once, after the backoff
    SPLIT = "split"  # ended: its callers each call for their own key


def after_no_keys(
    operation: str, count: int, outcome: Outcome, *, status: int | None, asked_again: bool
) -> Shared:
    """A call for `count` keys answered with `outcome` (not OK: no key was delivered).

    - A refused connect (`status` None) says nothing of the call: retried as it is. So is a
      refused method or a missing route on `enc_keys`, whose both methods carry `number`.
    - A 503 (a KME short of key answers a large `number` with it, or a busy one), a first "not
      found" (the KME may be catching up with its peer, REFERENCE §1.5) and a bare 404 on
      `dec_keys` are asked again whole once; then split, so those that can be served are.
    - Anything else splits at once: one unknown key ID must not fail the other callers, and
      several key IDs go by POST only.
    """
    if count <= 1 or (outcome is Outcome.UNAVAILABLE and status is None):
        return Shared.AS_ONE
    if operation == "enc_keys" and outcome in (Outcome.METHOD, Outcome.NO_ROUTE):
        return Shared.AS_ONE
    if outcome in (Outcome.UNAVAILABLE, Outcome.NOT_FOUND, Outcome.NO_ROUTE):
        return Shared.SPLIT if asked_again else Shared.AGAIN
    return Shared.SPLIT


def counts_toward_pause(outcome: Outcome) -> bool:
    """Whether a split says the KME may refuse shared calls (a shortage of key does not)."""
    return outcome is not Outcome.UNAVAILABLE


def pauses_at_once(operation: str, outcome: Outcome) -> bool:
    """A refusal of our own Get key request (its `number`): no shared calls for a while. On
    `dec_keys` the key IDs come from the peer, so one refusal proves nothing of the form."""
    return operation == "enc_keys" and outcome in (Outcome.REJECTED, Outcome.UNAUTHORIZED)
