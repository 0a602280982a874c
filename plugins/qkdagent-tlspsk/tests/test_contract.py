"""The core's sink contract, once per file format (file only, no consumer process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from qkdagent_tlspsk import TlsPskSink

from qkdagent import KeyMeta, Link
from qkdagent.testing import SinkContract


class TestTlsPskContract(SinkContract):
    sink_class = TlsPskSink

    @pytest.fixture(params=["stunnel", "nghttpx", "gnutls", "openssl", "nginx-patch"])
    def sink_options(self, request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
        return {"format": request.param, "path": str(tmp_path / "psk.txt")}

    @pytest.fixture
    def read_back(self, sink: TlsPskSink) -> Any:
        async def read(link: Link) -> bytes | None:
            return sink.current_key(link)

        return read

    async def test_file_is_private_and_holds_only_hex(
        self, sink: TlsPskSink, link: Link, h: Any
    ) -> None:
        secret = self.new_secret()

        await sink.install(link, secret, KeyMeta(5, ("k",), "x", 0.0))
        assert h.file_mode(sink.path) == 0o600
        text = sink.path.read_text()
        assert secret.reveal().hex() in text
        assert sink.current_key(link) == secret.reveal()
