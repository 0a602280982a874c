"""Conformance suites every source and sink plugin runs against itself.

Subclass one in a test module run with pytest-trio (`trio_mode = true`); the base tests then
check the contract of DESIGN §3 against the real component behind the plugin. The suite owns
the component's life as the agent runs it: built from its config table, `links` set, prepared,
its `run()` task started, and after the test the task cancelled and `aclose()` called.

    class TestMySink(SinkContract):
        sink_class = MySink

        @pytest.fixture
        def sink_options(self, tmp_path):          # the [sinks.NAME] table
            return {"path": str(tmp_path / "{peer}.key")}

        @pytest.fixture
        def read_back(self, tmp_path):             # optional: what the consumer now holds
            ...

`SourceContract` is the same with `source_class` and `source_options` (one table for both
sides, or override `responder_options`). A component the table cannot describe (a test token, a
simulator's address) is built by overriding `unprepared_sink` / `unprepared_sources`; overriding
`sink` / `source_pair` instead (yielding prepared components) still works, and then the
subclass owns prepare and aclose itself.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio

from ..errors import KeyNotFound, SourceError
from ..interfaces import KeyMeta, Link, Sink, Source
from ..secret import Secret
from .components import build_component, running

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
    """Base tests for a `Sink`: set `sink_class` and provide `sink_options` (see the module)."""

    secret_size = 32
    sink_class: ClassVar[type[Sink] | None] = None

    @pytest.fixture
    def link(self) -> Link:
        return Link("contract", "alice", "bob", True)

    @pytest.fixture
    def read_back(self) -> ReadBack | None:
        """Override to return `async (link) -> bytes | None` reading the consumer's current key."""
        return None

    @pytest.fixture
    def sink_options(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must provide a `sink_options` fixture")

    @pytest.fixture
    def unprepared_sink(self, sink_options: dict[str, Any], link: Link, tmp_path: Path) -> Sink:
        """The sink under test as the agent constructs it (override for a custom build)."""
        if self.sink_class is None:
            raise NotImplementedError(f"{type(self).__name__} must set `sink_class`")
        return build_component(
            self.sink_class,
            sink_options,
            name="contract",
            links=(link,),
            state_dir=tmp_path / "contract-state",
        )

    @pytest.fixture
    async def sink(self, unprepared_sink: Sink) -> AsyncIterator[Sink]:
        """Prepared and running for the test; its task cancelled and closed after it."""
        async with running(unprepared_sink):
            yield unprepared_sink

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
    """Base tests for a `Source`: set `source_class` and provide `source_options` (see the
    module); the pair is (alice's initiator source, bob's responder source) of one link."""

    source_class: ClassVar[type[Source] | None] = None

    @pytest.fixture
    def links(self) -> tuple[Link, Link]:
        return (Link("contract", "alice", "bob", True), Link("contract", "bob", "alice", False))

    @pytest.fixture
    def source_options(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must provide `source_options`")

    @pytest.fixture
    def responder_options(self, source_options: dict[str, Any]) -> dict[str, Any]:
        """bob's table; the same as alice's unless overridden."""
        return source_options

    @pytest.fixture
    def unprepared_sources(
        self,
        source_options: dict[str, Any],
        responder_options: dict[str, Any],
        links: tuple[Link, Link],
        tmp_path: Path,
    ) -> tuple[Source, Source]:
        """alice's and bob's sources as their agents construct them (override for a custom
        build)."""
        if self.source_class is None:
            raise NotImplementedError(f"{type(self).__name__} must set `source_class`")
        return tuple(  # type: ignore[return-value]
            build_component(
                self.source_class,
                table,
                name="contract",
                links=(link,),
                agent=link.local,
                state_dir=tmp_path / f"contract-{link.local}",
            )
            for table, link in zip((source_options, responder_options), links, strict=True)
        )

    @pytest.fixture
    async def source_pair(
        self, unprepared_sources: tuple[Source, Source]
    ) -> AsyncIterator[tuple[Source, Source]]:
        """Both prepared and running for the test; tasks cancelled and closed after it."""
        async with running(*unprepared_sources):
            yield unprepared_sources

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
