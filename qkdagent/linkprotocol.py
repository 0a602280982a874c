"""Foreign link protocols (DESIGN v2 §3): a link with `protocol = "<name>"` is run by a plugin.

For migration only: a site upgrading one end of a link at a time runs the other system's peer
protocol on the upgraded end (quPSKd's, say) while keeping qkdagent's sources, sinks, durable
state, fail-closed erase, status and metrics. The plugin registers a `LinkProtocol` subclass
with `qkdagent_register_link_protocols`; the agent builds one instance per link that names it
and runs it with a `ForeignLink`, the link as the core keeps it.

What the core still does for such a link: it erases the sinks when no rotation committed
within `reject_after` (and retries failed erases), refuses a key ID the link already used,
commits each new secret durably before any sink sees it, and keeps the link out of the native
peer API (a native peer's request for it is answered like one for an unknown link). A protocol
that does not authenticate its peer (`authenticated = False`, the default) runs only on a link
that sets `insecure = true`; the agent says so at every start, reload and `qkdagent check`,
in `/status` and in the `qkdagent_link_insecure` metric.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, ClassVar

import trio

from .interfaces import Link, PluginContext
from .options import Options
from .secret import Key, Secret


class ForeignLink(abc.ABC):
    """One link as a foreign protocol drives it: keys from its sources, secrets to its sinks.

    Every method is safe to call from the protocol's tasks; `commit` and `erase` are
    serialised with the agent's own timer (an expiry erase never interleaves with a commit).
    """

    link: Link
    """Name, this agent's name, the peer's name, and whether the config makes this side the
    initiator (`role`; a protocol may ignore it if it has its own rule)."""
    source_ids: tuple[str, ...]
    """The link's source ids, in config order."""
    interval: float
    """The link's rotation interval (s)."""
    reject_after: float
    """The core erases the sinks when no rotation committed for this long (s)."""

    @property
    @abc.abstractmethod
    def epoch(self) -> int:
        """Rotations committed on this link (0: none yet, or the state was reset)."""

    @property
    @abc.abstractmethod
    def erased(self) -> bool:
        """Whether the sinks hold no key of this link (never rotated, expired, or erased)."""

    @property
    @abc.abstractmethod
    def state(self) -> bytes | None:
        """The protocol's state as last committed with `commit` (None before the first)."""

    @abc.abstractmethod
    async def new_key(self, source: str | None = None) -> Key:
        """A fresh key from a source (the first one by default), as an initiator takes it."""

    @abc.abstractmethod
    async def key_by_id(self, key_id: str, source: str | None = None) -> Key:
        """The key a peer's source handed out under `key_id`; a key ID this link already
        committed is refused (`SourceError`) before the source is asked."""

    @abc.abstractmethod
    async def commit(
        self,
        secret: Secret,
        key_ids: Sequence[str],
        *,
        state: bytes | None = None,
        started: float | None = None,
    ) -> int:
        """Make `secret` the link's key: durably commit it (with `state` and the key IDs,
        one per source in order, recorded as used), then install it into every sink. Returns
        the new epoch. `started` (trio time) is when the exchange began, for the duration.
        Raises `KeyReuseError` (changing nothing) if a key ID was used before."""

    @abc.abstractmethod
    async def erase(self, reason: str) -> None:
        """Fail closed now: every sink gets a random secret or loses its key."""

    @abc.abstractmethod
    def report_failure(self, stage: str, message: str) -> None:
        """Report a failed exchange (status, metrics, log, `qkdagent_on_rotation_error`);
        `message` must not hold key bytes."""


class LinkProtocol(abc.ABC):
    """A peer protocol other than qkdagent's own, run on the links that name it."""

    protocol_name: ClassVar[str]
    """The `protocol = "..."` string of a link's table; unique across plugins, not "native"."""
    authenticated: ClassVar[bool] = False
    """Whether the protocol authenticates the peer and its messages. False: a link must set
    `insecure = true` to use it."""

    def __init__(self, name: str, options: Options, context: PluginContext) -> None:
        """Read and validate the link's protocol options (the keys of its table the core does
        not read) without I/O: `qkdagent check` constructs every instance."""
        self.name = name
        self.context = context

    @abc.abstractmethod
    async def run(
        self, link: ForeignLink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve and rotate the link until cancelled; call `task_status.started()` once
        listening. Clean up in `finally`. An exception is logged by type and place and the
        protocol is started again after a backoff (1 s doubling to 60 s)."""

    def describe(self) -> dict[str, Any]:
        """Extra fields for the link's entry in `/status` (no key material)."""
        return {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} link={self.name!r} protocol={self.protocol_name!r}>"


__all__ = ["ForeignLink", "LinkProtocol"]
