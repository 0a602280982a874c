"""Calls for several keys at once: pure decisions (how many keys a call may carry, and when a
shared call's callers go back to one key per call).

Links to the same peer SAE that rotate together (the agent puts rotations on a grid) ask the KME
for keys at the same moment. One `enc_keys` with `number` > 1, or one `dec_keys` naming several
`key_IDs`, serves them all with one request: at 10,000 links the KME calls were 10-12 % of each
agent's CPU. The standard has both forms (ETSI GS QKD 014 §6.1, §6.2); a KME's Get status says
how many keys one request may carry (`max_key_per_request`).
"""

from __future__ import annotations

from .retry import Outcome

KEY_OVERHEAD_BYTES = 200
"""A key's JSON beside its base64 value (its key_ID, names, extensions), for the answer's bound."""


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
    `max_key_per_request` (unknown: one), the answer's byte bound, and one while batches are
    paused or the method carries one key ID only (`dec_keys` by GET)."""
    if kme_max is None or one_id_only or paused:
        return 1
    per_key = 4 * -(-key_size // 24) + KEY_OVERHEAD_BYTES  # base64 of key_size bits, and more
    return max(1, min(option, kme_max, response_limit // per_key))


def must_split(count: int, outcome: Outcome) -> bool:
    """A call for several keys that got neither keys nor 503 (which delivered nothing, and is
    retried as it is): its callers each call for their own key. One unknown key ID in a shared
    `dec_keys`, or a KME that refuses `number` > 1, must not fail the other callers."""
    return count > 1 and outcome not in (Outcome.OK, Outcome.UNAVAILABLE)


def pauses_batches(outcome: Outcome) -> bool:
    """The KME refused the shared call itself (not a key's absence or the method): ask for one key
    per call for a while."""
    return outcome in (Outcome.REJECTED, Outcome.UNAUTHORIZED)
