"""Sink type `recording` (registered by the `memory` plugin): what a test asserts on.

It keeps each link's current secret in memory and records every install and erasure (the
secret only as a fingerprint); options inject slow, failing or buggy behaviour. A test double:
never configure it on a real gateway.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from ..errors import Misconfigured, SinkError
from ..interfaces import KeyMeta, Link, PluginContext, Sink
from ..options import Options
from ..secret import Secret


@dataclass(frozen=True)
class InstallRecord:
    """What a recording sink saw; the secret is kept only as a fingerprint."""

    time: float
    link: str
    epoch: int
    key_ids: tuple[str, ...]
    fingerprint: str


class RecordingSink(Sink):
    """Sink type `recording`: keeps the current secret per link in memory and records calls."""

    type_name = "recording"

    def __init__(self, name: str, options: Options, context: PluginContext) -> None:
        super().__init__(name, options, context)
        self.delay = options.number("delay", 0.0, min=0)
        self.erase_delay = options.number("erase_delay", 0.0, min=0)
        self.fail = options.boolean("fail", False)
        self.erase_failures = options.integer("erase_failures", 0, min=0)
        """How many of the next erase calls fail (as a full disk or a stopped daemon would);
        tests may also set it while the agent runs."""
        self.prepare_delay = options.number("prepare_delay", 0.0, min=0)
        self.prepare_error = options.string("prepare_error", "")
        self.prepare_bug = options.string("prepare_bug", "")
        """Raise a RuntimeError with this text from prepare(), as a buggy plugin would."""
        self.installs: list[InstallRecord] = []
        self.erasures: list[tuple[float, str, str]] = []
        self.current: dict[str, Secret] = {}
        self.history: list[Secret] = []
        """Every secret installed, kept so leak tests can search logs for all of them."""
        self.calls: list[str] = []
        """Installs and erasures in the order they happened: "install:EPOCH", "erase:REASON"."""

    async def prepare(self) -> None:
        if self.prepare_delay:
            await trio.sleep(self.prepare_delay)
        if self.prepare_error:
            raise Misconfigured(f"recording sink {self.name!r}: {self.prepare_error}")
        if self.prepare_bug:
            raise RuntimeError(self.prepare_bug)

    async def install(self, link: Link, secret: Secret, meta: KeyMeta) -> None:
        if self.delay:
            await trio.sleep(self.delay)
        else:
            await trio.lowlevel.checkpoint()
        if self.fail:
            raise SinkError(f"recording sink {self.name!r} is set to fail")
        self.current[link.name] = Secret(secret.reveal())
        self.history.append(self.current[link.name])
        self.installs.append(
            InstallRecord(
                trio.current_time(), link.name, meta.epoch, meta.key_ids, secret.fingerprint()
            )
        )
        self.calls.append(f"install:{meta.epoch}")

    async def verify(self, link: Link, secret: Secret, meta: KeyMeta) -> bool | None:
        current = self.current.get(link.name)
        return current is not None and current == secret

    async def erase(self, link: Link, reason: str) -> None:
        if self.erase_delay:
            await trio.sleep(self.erase_delay)
        else:
            await trio.lowlevel.checkpoint()
        if self.erase_failures:
            self.erase_failures -= 1
            self.calls.append(f"erase-failed:{reason}")
            raise SinkError(f"recording sink {self.name!r} is set to fail erasing")
        self.current[link.name] = Secret.random(32)
        self.erasures.append((trio.current_time(), link.name, reason))
        self.calls.append(f"erase:{reason}")
