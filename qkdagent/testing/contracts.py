"""Conformance suites every source and sink plugin runs against itself.

Subclass `SinkContract` (provide a `sink` fixture yielding a prepared sink, optionally `read_back`)
or `SourceContract` (provide `source_pair` yielding `(initiator_source, responder_source)`), in a
test module run with pytest-trio (`trio_mode = true`). The base tests then check the contract of
DESIGN §3 against the real component behind the plugin.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from ..errors import KeyNotFound, SourceError
from ..interfaces import KeyMeta, Link, Sink, Source
from ..secret import Secret

ReadBack = Callable[[Link], Awaitable[bytes | None]]


def secret_spellings(secret: Secret) -> list[str]:
    """Every way a secret could plausibly appear in text: hex (both cases) and base64 variants."""
    raw = secret.reveal()
    b64 = base64.b64encode(raw).decode()
    return [
        raw.hex(),
        raw.hex().upper(),
        b64,
        b64.rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        repr(raw)[2:-1],
    ]


def assert_not_leaked(text: str, secrets: list[Secret]) -> None:
    for secret in secrets:
        for spelling in secret_spellings(secret):
            assert spelling not in text, "key material appears in text"


def _meta(epoch: int, label: str = "contract") -> KeyMeta:
    return KeyMeta(epoch, (f"key-{epoch}",), label, time.time())


class SinkContract:
    """Base tests for a `Sink`. Subclasses provide the `sink` fixture."""

    secret_size = 32

    @pytest.fixture
    def link(self) -> Link:
        return Link("contract", "alice", "bob", True)

    @pytest.fixture
    def read_back(self) -> ReadBack | None:
        """Override to return `async (link) -> bytes | None` reading the consumer's current key."""
        return None

    @pytest.fixture
    async def sink(self) -> Any:  # pragma: no cover - must be overridden
        raise NotImplementedError("subclasses of SinkContract must provide a `sink` fixture")

    def new_secret(self) -> Secret:
        return Secret.random(self.secret_size)

    async def _holds(
        self, sink: Sink, link: Link, read_back: ReadBack | None, secret: Secret, epoch: int
    ) -> bool:
        verified = await sink.verify(link, secret, _meta(epoch, sink.name))
        if read_back is not None:
            held = await read_back(link)
            return held == secret.reveal()
        assert verified is not None, "a sink without read-back must still answer verify()"
        return verified

    async def test_install_then_verify(
        self, sink: Sink, link: Link, read_back: ReadBack | None
    ) -> None:
        secret = self.new_secret()
        await sink.install(link, secret, _meta(1, sink.name))
        assert await self._holds(sink, link, read_back, secret, 1)
        assert await sink.verify(link, secret, _meta(1, sink.name)) in (True, None)

    async def test_reinstall_is_idempotent(
        self, sink: Sink, link: Link, read_back: ReadBack | None
    ) -> None:
        secret = self.new_secret()
        await sink.install(link, secret, _meta(1, sink.name))
        await sink.install(link, secret, _meta(1, sink.name))
        assert await self._holds(sink, link, read_back, secret, 1)

    async def test_new_secret_replaces_old(
        self, sink: Sink, link: Link, read_back: ReadBack | None
    ) -> None:
        old, new = self.new_secret(), self.new_secret()
        await sink.install(link, old, _meta(1, sink.name))
        await sink.install(link, new, _meta(2, sink.name))
        assert await self._holds(sink, link, read_back, new, 2)
        assert await sink.verify(link, old, _meta(1, sink.name)) is not True

    async def test_erase_leaves_no_usable_key(
        self, sink: Sink, link: Link, read_back: ReadBack | None
    ) -> None:
        secret = self.new_secret()
        await sink.install(link, secret, _meta(1, sink.name))
        await sink.erase(link, "contract")
        assert await sink.verify(link, secret, _meta(1, sink.name)) is not True
        if read_back is not None:
            assert await read_back(link) != secret.reveal()

    async def test_no_key_bytes_in_logs_or_reprs(
        self,
        sink: Sink,
        link: Link,
        read_back: ReadBack | None,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        caplog.set_level(logging.DEBUG)
        first, second = self.new_secret(), self.new_secret()
        await sink.install(link, first, _meta(1, sink.name))
        await sink.verify(link, first, _meta(1, sink.name))
        await sink.install(link, second, _meta(2, sink.name))
        await sink.verify(link, first, _meta(1, sink.name))
        await sink.erase(link, "contract")
        text = caplog.text + repr(sink) + str(sink) + repr(vars(sink))
        assert_not_leaked(text, [first, second])

    async def test_cancelled_install_leaves_consistent_state(
        self, sink: Sink, link: Link, read_back: ReadBack | None
    ) -> None:
        old, interrupted, final = self.new_secret(), self.new_secret(), self.new_secret()
        await sink.install(link, old, _meta(1, sink.name))
        with trio.CancelScope() as scope:
            scope.cancel()
            await sink.install(link, interrupted, _meta(2, sink.name))
        if read_back is not None:
            assert await read_back(link) in (old.reveal(), interrupted.reveal())
        await sink.install(link, final, _meta(3, sink.name))
        assert await self._holds(sink, link, read_back, final, 3)


class SourceContract:
    """Base tests for a `Source`. Subclasses provide `source_pair` (initiator, responder)."""

    @pytest.fixture
    def links(self) -> tuple[Link, Link]:
        return (Link("contract", "alice", "bob", True), Link("contract", "bob", "alice", False))

    @pytest.fixture
    async def source_pair(self) -> Any:  # pragma: no cover - must be overridden
        raise NotImplementedError("subclasses of SourceContract must provide `source_pair`")

    async def test_both_sides_get_the_same_key(
        self, source_pair: tuple[Source, Source], links: tuple[Link, Link]
    ) -> None:
        initiator, responder = source_pair
        key = await initiator.new_key(links[0])
        same = await responder.key_by_id(links[1], key.key_id)
        assert same.key_id == key.key_id
        assert same.value == key.value
        assert len(key.value) >= 16

    async def test_key_ids_are_unique(
        self, source_pair: tuple[Source, Source], links: tuple[Link, Link]
    ) -> None:
        initiator, responder = source_pair
        ids = []
        for _ in range(10):
            key = await initiator.new_key(links[0])
            ids.append(key.key_id)
            await responder.key_by_id(links[1], key.key_id)
        assert len(set(ids)) == len(ids)

    async def test_key_is_single_use(
        self, source_pair: tuple[Source, Source], links: tuple[Link, Link]
    ) -> None:
        initiator, responder = source_pair
        key = await initiator.new_key(links[0])
        await responder.key_by_id(links[1], key.key_id)
        with pytest.raises(SourceError):
            await responder.key_by_id(links[1], key.key_id)

    async def test_unknown_key_id_is_not_found(
        self, source_pair: tuple[Source, Source], links: tuple[Link, Link]
    ) -> None:
        _, responder = source_pair
        with pytest.raises(KeyNotFound):
            await responder.key_by_id(links[1], "00000000-0000-4000-8000-000000000000")

    async def test_no_key_bytes_in_logs_or_reprs(
        self,
        source_pair: tuple[Source, Source],
        links: tuple[Link, Link],
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        caplog.set_level(logging.DEBUG)
        initiator, responder = source_pair
        key = await initiator.new_key(links[0])
        same = await responder.key_by_id(links[1], key.key_id)
        text = caplog.text + repr(key) + str(key) + repr(same) + repr(initiator) + repr(responder)
        assert_not_leaked(text, [key.value])

    async def test_cancelled_call_does_not_break_the_source(
        self, source_pair: tuple[Source, Source], links: tuple[Link, Link]
    ) -> None:
        initiator, responder = source_pair
        with trio.CancelScope() as scope:
            scope.cancel()
            await initiator.new_key(links[0])
        key = await initiator.new_key(links[0])
        assert (await responder.key_by_id(links[1], key.key_id)).value == key.value
