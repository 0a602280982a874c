"""Issue 11, defects 5 and 7 on the KME side: every KME call is bounded in time and in bytes.

A KME that trickles its answer one byte at a time never trips httpx's read timeout (it is per
read). The source gives each exchange a total deadline, and the agent's own timeout (or shutdown)
cancels a call at once: a shielded exchange used to hold a 2 s call for 13 s (and with
`request_timeout = 30`, a rotation and SIGTERM for over a minute). Answers are read raw, with a
bound, while streaming.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from qkdagent_etsi014.source import MAX_RESPONSE_BYTES, Etsi014Source

from qkdagent import Link, SourceError, SourceUnavailable
from qkdagent.testing import build_component, config_toml, pair_configs

from .fake_kme import MiB, fake_kme, flood, gzip_bomb, trickle
from .httpx_kme import HttpxKme

ALICE = Link("l", "alice", "bob", True)
BOB = Link("l", "bob", "alice", False)
KID = "3fa85f64-5717-4562-b3fc-2c963f66afa6"


def source_for(url: str, pki: Path, state_dir: Path, **options: Any) -> Etsi014Source:
    table = {
        "kme_url": url,
        "cert": str(pki / "alice.pem"),
        "key": str(pki / "alice.key"),
        "ca": str(pki / "ca.pem"),
        "retries": 0,
        "not_found_retries": 0,
        **options,
    }
    return build_component(Etsi014Source, table, name="qkd", agent="alice", state_dir=state_dir)


async def call(source: Etsi014Source, operation: str) -> object:
    if operation == "new_key":
        return await source.new_key(ALICE)
    return await source.key_by_id(BOB, KID)


# -- in process, on trio's virtual clock ------------------------------------------------------


class Trickle(httpx.AsyncByteStream):
    """An answer body of `total` bytes, one byte per virtual second."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.sent = 0
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.sent < self.total:
            await trio.sleep(1)
            self.sent += 1
            yield b" "

    async def aclose(self) -> None:
        self.closed = True


class TrickleTransport(httpx.AsyncBaseTransport):
    def __init__(self, total: int = 100_000) -> None:
        self.stream = Trickle(total)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        headers = {"content-length": str(self.stream.total)}
        return httpx.Response(200, headers=headers, stream=self.stream)


def trickling_source(tmp_path: Path, transport: TrickleTransport, **options: Any) -> Etsi014Source:
    source = source_for("https://kme.example:8443", tmp_path, tmp_path, **options)
    source._client = HttpxKme(httpx.AsyncClient(transport=transport))
    return source


@pytest.mark.parametrize("operation", ["new_key", "key_by_id"])
async def test_trickled_answer_is_cut_at_the_exchange_deadline(
    tmp_path: Path, autojump_clock: Any, operation: str
) -> None:
    transport = TrickleTransport()
    source = trickling_source(tmp_path, transport, request_timeout=5, connect_timeout=1)
    start = trio.current_time()
    try:
        with pytest.raises(SourceUnavailable, match="no answer within the timeout"):
            await call(source, operation)
        # the whole exchange, not each read, is bounded: connect_timeout + request_timeout
        assert trio.current_time() - start == pytest.approx(6)
        assert transport.stream.closed and transport.stream.sent < transport.stream.total
    finally:
        await source.aclose()


@pytest.mark.parametrize("operation", ["new_key", "key_by_id"])
async def test_the_callers_deadline_ends_the_call_at_once(
    tmp_path: Path, autojump_clock: Any, operation: str
) -> None:
    """What the agent does around every source call (`fail_after(timeout)`) is obeyed, even with
    an answer on the wire and a long `request_timeout`."""
    transport = TrickleTransport()
    source = trickling_source(tmp_path, transport, request_timeout=600)
    start = trio.current_time()
    try:
        with pytest.raises(trio.TooSlowError):
            with trio.fail_after(2):
                await call(source, operation)
        assert trio.current_time() - start == pytest.approx(2)
        assert transport.stream.sent <= 2 and not transport.stream.closed  # still in flight
    finally:
        await source.aclose()
    assert transport.stream.closed  # closing the source ended the exchange
    assert trio.current_time() - start == pytest.approx(2)


# -- over real mutual TLS ----------------------------------------------------------------------


async def test_caller_leaves_a_trickling_kme_before_its_answer_ends(
    pki: Path, tmp_path: Path
) -> None:
    async with fake_kme(pki, trickle(total=200, every=0.05)) as kme:  # a 10 s answer
        source = source_for(kme.url, pki, tmp_path, request_timeout=600)
        try:
            with pytest.raises(trio.TooSlowError):
                with trio.fail_after(2):  # the answer takes 10 s; the request is in by then
                    await source.new_key(ALICE)
            assert kme.requests and not kme.completed  # left while the KME was still sending
        finally:
            await source.aclose()
        with trio.fail_after(20):
            await kme.ended.wait()
    assert kme.aborted and not kme.completed  # closing the source hung up on the KME


async def test_trickling_kme_is_cut_at_the_sources_deadline(pki: Path, tmp_path: Path) -> None:
    async with fake_kme(pki, trickle(total=200, every=0.05)) as kme:  # a 10 s answer
        source = source_for(kme.url, pki, tmp_path, request_timeout=1, connect_timeout=1)
        try:
            with pytest.raises(SourceUnavailable, match="no answer within the timeout"):
                await source.new_key(ALICE)
            with trio.fail_after(20):
                await kme.ended.wait()
        finally:
            await source.aclose()
    assert kme.aborted and not kme.completed and kme.sent < 200


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_huge_answer_is_refused_while_streaming(
    pki: Path, tmp_path: Path, chunked: bool
) -> None:
    total = 100 * MiB
    async with fake_kme(pki, flood(total, chunked=chunked)) as kme:
        source = source_for(kme.url, pki, tmp_path)
        try:
            with pytest.raises(SourceError, match=f"larger than {MAX_RESPONSE_BYTES} bytes"):
                await source.new_key(ALICE)
        finally:
            await source.aclose()
        with trio.fail_after(20):
            await kme.ended.wait()
    # the client stopped reading early: what the KME got out is the bound plus socket buffers
    assert kme.aborted and kme.sent < total // 8


async def test_compressed_answer_is_refused_unread(pki: Path, tmp_path: Path) -> None:
    """A small gzip body could expand past any bound within one read: identity is asked for,
    and an encoded answer refused."""
    async with fake_kme(pki, gzip_bomb(64 * MiB)) as kme:
        source = source_for(kme.url, pki, tmp_path)
        try:
            with pytest.raises(SourceError, match="content encoding \\('gzip'\\)"):
                await source.new_key(ALICE)
        finally:
            await source.aclose()
    assert b"accept-encoding: identity" in kme.requests[0]


# -- the agent process -------------------------------------------------------------------------


async def test_sigterm_with_a_trickling_kme_ends_within_the_drain_timeout(
    pki: Path, tmp_path: Path
) -> None:
    """An agent whose KME trickles (and whose request_timeout is long) stops promptly on
    SIGTERM: drain_timeout 1 s, then the source's fetch is cancelled as it is closed. Before the
    fix the shielded exchange held the process for 2 x request_timeout (20 minutes here)."""
    async with fake_kme(pki, trickle(total=100_000, every=0.05)) as kme:
        table = {
            "type": "etsi014",
            "kme_url": kme.url,
            "cert": str(pki / "alice.pem"),
            "key": str(pki / "alice.key"),
            "ca": str(pki / "ca.pem"),
            "request_timeout": 600,
        }
        configs = pair_configs(
            tmp_path,
            alice={
                "sources": {"qkd": table},
                "sinks": {"out": {"type": "file", "path": str(tmp_path / "psk")}},
                "plugins": ["etsi014"],
                "agent": {"drain_timeout": 1},
            },
        )
        config = tmp_path / "alice.toml"
        config.write_text(config_toml(configs["alice"]))
        output = tmp_path / "alice.log"
        argv = [sys.executable, "-m", "qkdagent", "run", "-c", str(config)]
        with output.open("wb") as out:
            process = await trio.lowlevel.open_process(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        try:
            with trio.fail_after(30):
                while not kme.requests:  # the agent's first Get key
                    assert process.poll() is None, output.read_text()
                    await trio.sleep(0.05)
        except BaseException:
            process.kill()
            raise
        process.send_signal(signal.SIGTERM)
        try:
            with trio.fail_after(30):  # drain_timeout (1 s) plus start-up slack, not 20 minutes
                await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        with trio.fail_after(10):
            await kme.ended.wait()
    assert process.returncode == 0, output.read_text()
    assert kme.aborted and not kme.completed
