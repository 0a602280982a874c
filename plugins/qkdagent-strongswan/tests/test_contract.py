"""The core's sink conformance suite, run against a real charon over VICI."""

from __future__ import annotations

import pytest
from qkdagent_strongswan import StrongswanPpkSink

from qkdagent import Link
from qkdagent.testing import SinkContract

from .testbed import CONN, PPK_ID, ConnSpec, Testbed


class TestStrongswanPpkSinkUnload(SinkContract):
    """Default erase mode: the PPK is unloaded."""

    @pytest.fixture
    def unprepared_sink(self, bed: Testbed, make_sink, link: Link) -> StrongswanPpkSink:
        return make_sink(bed.a, links=(link,))


class TestStrongswanPpkSinkRandom(SinkContract):
    """Erase mode `random`: a random PPK replaces the real one under the same id."""

    @pytest.fixture
    def unprepared_sink(self, bed: Testbed, make_sink, link: Link) -> StrongswanPpkSink:
        return make_sink(bed.a, links=(link,), erase="random")


class TestStrongswanPpkSinkVersioned(SinkContract):
    """Versioned PPK_IDs: one secret per epoch, older ones unloaded (a responder gateway)."""

    @pytest.fixture
    def lab_conns(self) -> tuple[list[ConnSpec], list[ConnSpec]]:
        return [ConnSpec(CONN, None)], [ConnSpec(CONN, PPK_ID)]

    @pytest.fixture
    def unprepared_sink(self, bed: Testbed, make_sink, link: Link) -> StrongswanPpkSink:
        return make_sink(bed.a, links=(link,), versioned=True, keep_versions=1)
