"""The core's sink conformance suite, run against a real charon over VICI."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from qkdagent_strongswan import StrongswanPpkSink

from qkdagent.testing import SinkContract

from .testbed import CONN, PPK_ID, ConnSpec, Testbed


class TestStrongswanPpkSinkUnload(SinkContract):
    """Default erase mode: the PPK is unloaded."""

    @pytest.fixture
    async def sink(self, bed: Testbed, make_sink) -> AsyncIterator[StrongswanPpkSink]:
        sink = make_sink(bed.a)
        await sink.prepare()
        yield sink
        await sink.aclose()


class TestStrongswanPpkSinkRandom(SinkContract):
    """Erase mode `random`: a random PPK replaces the real one under the same id."""

    @pytest.fixture
    async def sink(self, bed: Testbed, make_sink) -> AsyncIterator[StrongswanPpkSink]:
        sink = make_sink(bed.a, erase="random")
        await sink.prepare()
        yield sink
        await sink.aclose()


class TestStrongswanPpkSinkVersioned(SinkContract):
    """Versioned PPK_IDs: one secret per epoch, older ones unloaded (a responder gateway)."""

    @pytest.fixture
    def lab_conns(self) -> tuple[list[ConnSpec], list[ConnSpec]]:
        return [ConnSpec(CONN, None)], [ConnSpec(CONN, PPK_ID)]

    @pytest.fixture
    async def sink(self, bed: Testbed, make_sink) -> AsyncIterator[StrongswanPpkSink]:
        sink = make_sink(bed.a, versioned=True, keep_versions=1)
        await sink.prepare()
        yield sink
        await sink.aclose()
