"""The core's sink conformance suite against a real SoftHSM2 token, in each storage mode."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from qkdagent_hsm import Pkcs11Sink

from qkdagent import Link
from qkdagent.testing import SinkContract


class TestSensitiveKeys(SinkContract):
    """Non-extractable, sensitive objects: verify() relies on the in-token HMAC alone."""

    sink_class = Pkcs11Sink

    @pytest.fixture
    def sink_options(
        self, make_token: Callable[[], Any], token_table: Callable[..., dict[str, Any]]
    ) -> dict[str, Any]:
        return token_table(make_token())


class TestExtractableKeys(SinkContract):
    """Readable objects (for a consumer that reads CKA_VALUE): checked by reading back."""

    sink_class = Pkcs11Sink

    @pytest.fixture
    def sink_options(
        self, make_token: Callable[[], Any], token_table: Callable[..., dict[str, Any]]
    ) -> dict[str, Any]:
        return token_table(make_token(), sensitive=False, extractable=True)

    @pytest.fixture
    def read_back(self, sink: Pkcs11Sink) -> Any:
        async def read(link: Link) -> bytes | None:
            current = await sink.read_current(link)
            return None if current is None else current.reveal()

        return read


class TestYubiHsmShape(SinkContract):
    """What a YubiHSM 2 needs: 2-byte IDs, HMAC key type, retired objects relabelled."""

    sink_class = Pkcs11Sink

    @pytest.fixture
    def sink_options(
        self, make_token: Callable[[], Any], token_table: Callable[..., dict[str, Any]]
    ) -> dict[str, Any]:
        return token_table(
            make_token(),
            id_bytes=2,
            key_type="sha256_hmac",
            max_label_bytes=40,
            retention=3,
            retired_label="{label}.old",
        )
