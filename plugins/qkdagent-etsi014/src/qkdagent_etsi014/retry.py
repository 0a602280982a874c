"""What to do with a KME's answer: pure classification and the retry budget.

Keys are single-use on the KME, so a call may only be repeated when the KME certainly did not
hand out a key: the connection was never established, the KME said 503 (nothing delivered), or the
method was refused (405/501, the request was not processed). A 404 whose body is no Error object is
what KMEs built on web frameworks answer for a method they have no route for, so it may be a
refused method too (`NO_ROUTE`: the caller tries the other method once). `dec_keys` "not found"
right after the peer's `enc_keys` is the one business answer that is retried: the slave's KME may
not have synchronised the key yet (REFERENCE §1.5). Timeouts after the request was sent are never
retried.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .wire import MSG_KEYS_NOT_FOUND


class Outcome(Enum):
    OK = "ok"
    UNAVAILABLE = "unavailable"  # connect error or 503: nothing was delivered, retry
    NOT_FOUND = "not found"  # dec_keys: the KME does not (yet) hold the key
    METHOD = "method"  # 405/501: try the other method
    NO_ROUTE = "no route"  # 404 without an Error object: maybe the method, maybe the resource
    UNAUTHORIZED = "unauthorized"  # 401: certificate not accepted for this request
    REJECTED = "rejected"  # any other answer: not retryable


def classify(operation: str, status: int | None, message: str | None) -> Outcome:
    """`status` None means the connection could not be established."""
    if status is None or status == 503:
        return Outcome.UNAVAILABLE
    if status == 200:
        return Outcome.OK
    if status in (405, 501):
        return Outcome.METHOD
    if status == 401:
        return Outcome.UNAUTHORIZED
    if status == 404 and message is None:
        return Outcome.NO_ROUTE
    if operation == "dec_keys":
        if status == 404:
            return Outcome.NOT_FOUND
        if status == 400 and (
            message is None or message == MSG_KEYS_NOT_FOUND or "not found" in message.lower()
        ):
            return Outcome.NOT_FOUND
    return Outcome.REJECTED


def settle_no_route(operation: str) -> Outcome:
    """What a `NO_ROUTE` 404 means once the other method is ruled out: the resource is absent."""
    return Outcome.NOT_FOUND if operation == "dec_keys" else Outcome.REJECTED


@dataclass
class Backoff:
    """Bounded exponential backoff: `next()` is the delay before the next try, None when spent."""

    tries: int
    initial: float
    cap: float
    used: int = 0

    def next(self) -> float | None:
        if self.used >= self.tries:
            return None
        delay = min(self.cap, self.initial * (2**self.used))
        self.used += 1
        return delay
