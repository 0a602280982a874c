"""The contracts plugins implement: `Source` and `Sink`, and the values they receive.

All I/O happens in the async methods here, never in hooks. The core wraps every call in a
timeout and logs around it without key bytes; implementations only do the work.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import trio

from .errors import SourceError
from .events import ComponentEvent
from .metricstore import PluginMetrics
from .options import Options
from .secret import Key, Secret
from .stash import Stash

_log = logging.getLogger("qkdagent.plugins")


@dataclass(frozen=True)
class Link:
    """A link as sources and sinks see it: this host ↔ one peer host."""

    name: str
    local: str
    """This agent's name."""
    peer: str
    """The peer agent's name."""
    initiator: bool
    """Whether this side obtains new keys (`new_key`) for the link."""


@dataclass(frozen=True)
class KeyMeta:
    """What a sink may know about the secret it installs: never the bytes themselves."""

    epoch: int
    key_ids: tuple[str, ...]
    label: str
    created: float
    """Wall-clock time (Unix seconds) at which the epoch was derived."""


@dataclass(frozen=True)
class PluginContext:
    """What the agent tells a plugin instance about its surroundings."""

    agent_name: str
    state_dir: Path
    config_file: Path | None = None
    stash: Stash = field(default_factory=Stash, repr=False, compare=False)
    """State the components of one plugin share within this agent (DESIGN v2 §3)."""

    reporter: Callable[[ComponentEvent], None] | None = field(
        default=None, repr=False, compare=False
    )
    """Set by the agent: turns reports into a hook call, a metric and a log line."""
    metrics: PluginMetrics = field(default_factory=PluginMetrics, repr=False, compare=False)
    """Counters and gauges the plugin publishes on the agent's `/metrics` (label them by
    component: `context.metrics.gauge("qkdagent_acme_pool_bits", "...", ["source"])`)."""

    def report(self, event: ComponentEvent) -> None:
        """Tell the agent about something noteworthy outside a rotation (never key bytes).

        Without an agent (`qkdagent check`, unit tests) the event is only logged.
        """
        if self.reporter is not None:
            self.reporter(event)
        else:
            _log.warning("%s: %s: %s", event.component, event.kind, event.detail)

    def private_dir(self, owner: str) -> Path:
        """A directory (mode 0700) under the agent's state dir for one plugin instance."""
        path = self.state_dir / "plugins" / owner
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)
        return path


class _Configurable(abc.ABC):
    type_name: ClassVar[str]
    """The `type = "..."` string used in the config file; unique across all plugins."""
    concurrent_prepare: ClassVar[bool] = True
    """False when instances queue on one serial resource (a PKCS#11 worker thread): the agent
    then prepares them one at a time, so each `prepare()` timeout covers only its own work."""

    def __init__(self, name: str, options: Options, context: PluginContext) -> None:
        """Read and validate options here (no I/O): `qkdagent check` constructs every instance."""
        self.name = name
        self.context = context
        self.links: tuple[Link, ...] = ()
        """The links that use this instance; set by the agent before `prepare()` (and again
        after a config reload), so a plugin can check per-link settings up front."""

    async def prepare(self) -> None:
        """Check that the component is reachable and usable; raise a typed, clear error if not.

        The agent prepares its components concurrently (up to 64 at a time), so components
        that share a resource (a token, a daemon's socket) must not assume they go one by one
        (or must set `concurrent_prepare = False`). It may be cancelled: once a component
        earlier in the config has failed, the agent will not start anyway.
        """

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Optional background task of this component (DESIGN v2 §3): define it to watch a
        consumer, refresh a pool or coalesce work. The agent starts it after `prepare()` in its
        own nursery and waits for `task_status.started()`; it is cancelled before `aclose()`
        and when a reload replaces or drops the component. If it raises, the agent logs the
        exception by type, reports a `task_failed` ComponentEvent and starts it again after a
        backoff (1 s doubling to 60 s). Components that do not define it get no task."""
        task_status.started()

    async def aclose(self) -> None:
        """Release connections; called once when the agent stops or the config drops the object,
        and after a refused start or reload, whether `prepare()` succeeded, failed, was
        cancelled or never ran (so it must cope with a component that was never prepared)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} type={self.type_name!r}>"


@dataclass(frozen=True)
class Answered:
    """What an exchange source's responder side returns (DESIGN v2 §3)."""

    key: Key
    answer: bytes = field(default=b"", repr=False)
    """Sent MAC'd to the initiator in the `rotate-reply` (a KEM's next public key, say) and
    bound into the transcript; the initiator's source gets it in `accept_answer`."""
    state: bytes | None = field(default=None, repr=False)
    """The link's new source state, committed with the epoch (None: none kept); it may be a
    private key, so it is never in a repr."""


class Source(_Configurable):
    """A supplier of single-use symmetric keys shared with the peer's source.

    Cancellation: if a call is cancelled after the key was taken from the device, the key is lost
    (QKD keys are single-use); the core then starts a new rotation rather than reuse an ID.

    Exchange sources (a KEM, an interactive protocol) also override `offer`, `answer` and
    `accept_answer`: they see the link's **source state**, opaque bytes the core keeps per link
    and source and commits in the same transaction as the epoch (so a crash never leaves the
    state and the epoch disagreeing, and a state replaced at a commit is gone from disk with
    the old chain key). After a resync the state starts again from None.
    """

    max_key_id: ClassVar[int] = 256
    """Longest key ID (UTF-8 bytes) this source hands out; a KEM ciphertext needs more."""
    fetch_ahead: bool = False
    """Whether `key_by_id` waits on a remote service (a KME, a hub). An initiator whose link
    has such a source announces the next rotation's key IDs when it takes its keys ahead, so
    the peer fetches them before the rotation starts instead of in the middle of it (which
    costs each side one more message per rotation)."""

    @abc.abstractmethod
    async def new_key(self, link: Link) -> Key:
        """Initiator side: obtain a fresh key and its ID."""

    @abc.abstractmethod
    async def key_by_id(self, link: Link, key_id: str) -> Key:
        """Responder side: obtain the key the peer's source handed out under `key_id`.

        Raise `KeyNotFound` if the source does not hold it (after any safe retries).
        """

    async def offer(self, link: Link, state: bytes | None) -> Key:
        """Initiator side of an exchange source: `new_key` that sees the link's committed
        source state (None before the first rotation and after a resync)."""
        return await self.new_key(link)

    async def answer(self, link: Link, key_id: str, state: bytes | None) -> Answered:
        """Responder side of an exchange source: `key_by_id` that may answer and replace the
        link's source state (both take effect only if the epoch commits)."""
        return Answered(await self.key_by_id(link, key_id), b"", state)

    async def accept_answer(self, link: Link, answer: bytes, state: bytes | None) -> bytes | None:
        """Initiator side: the responder's answer, before the epoch is derived; returns the
        link's new source state. A plain source refuses a non-empty answer."""
        if answer:
            raise SourceError(f"source {self.name!r} takes no answer from the peer")
        return state


class Sink(_Configurable):
    """A consumer of derived secrets (a WireGuard peer, a PSK file, a token...)."""

    async def verify(self, link: Link, secret: Secret, meta: KeyMeta) -> bool | None:
        """Read back from the consumer and compare; None when the consumer cannot tell."""
        return None

    @abc.abstractmethod
    async def install(self, link: Link, secret: Secret, meta: KeyMeta) -> None:
        """Make `secret` the link's key in the consumer. Must be idempotent."""

    @abc.abstractmethod
    async def erase(self, link: Link, reason: str) -> None:
        """Fail closed: replace the link's key by a random non-matching one, or remove it."""


__all__ = ["Answered", "Key", "KeyMeta", "Link", "PluginContext", "Secret", "Sink", "Source"]
