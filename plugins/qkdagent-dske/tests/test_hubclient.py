"""The hub client's transport against raw, misbehaving HTTP servers: bounded answers, a
kept-open connection the hub closed, a hub that never answers (virtual clock)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio
import trio.testing
from qkdagent_dske.hubclient import HubClient, HubDown

Handler = Callable[[trio.SocketStream, int], Awaitable[bool]]


async def read_request(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return b""
        data += chunk
    return data


def answer(body: bytes, *, close: bool = False) -> bytes:
    head = f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n"
    if close:
        head += "connection: close\r\n"
    return head.encode() + b"\r\n" + body


async def serve(nursery: trio.Nursery, handler: Handler) -> HubClient:
    count = [0]

    async def connection(stream: trio.SocketStream) -> None:
        async with stream:
            while await read_request(stream):
                count[0] += 1
                if not await handler(stream, count[0]):
                    return

    (listener,) = await nursery.start(partial(trio.serve_tcp, connection, 0, host="127.0.0.1"))
    port = listener.socket.getsockname()[1]
    return HubClient("hank", f"http://127.0.0.1:{port}/hank", ssl_context=None, timeout=5)


async def test_an_oversized_answer_is_cut_off(nursery: trio.Nursery) -> None:
    async def huge(stream: trio.SocketStream, n: int) -> bool:
        await stream.send_all(answer(b"x" * 70_000))
        return True

    client = await serve(nursery, huge)
    with pytest.raises(HubDown, match="larger than 1000 bytes"):
        await client.call("GET", "api/v1/key-share", limit=1000)
    await client.aclose()


async def test_an_answer_in_too_many_pieces_is_cut_off(nursery: trio.Nursery) -> None:
    """A lying hub's answer in one-byte chunks costs about 5 us a piece to parse, on the
    agent's loop: past `wire.MAX_BODY_PIECES` the call fails, whatever the size allows."""
    from qkdagent_dske import wire

    async def tiny_chunks(stream: trio.SocketStream, n: int) -> bool:
        head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        await stream.send_all(head + b"1\r\nx\r\n" * (wire.MAX_BODY_PIECES + 10) + b"0\r\n\r\n")
        return True

    client = await serve(nursery, tiny_chunks)
    with pytest.raises(HubDown, match="more than 4096 pieces"):
        await client.call("GET", "api/v1/key-share", limit=1 << 20)
    await client.aclose()


async def test_a_kept_open_connection_the_hub_closed_is_replaced(nursery: trio.Nursery) -> None:
    async def once_per_connection(stream: trio.SocketStream, n: int) -> bool:
        await stream.send_all(answer(f"{n}".encode()))
        return False  # close without saying so: the client's kept-open connection is stale

    client = await serve(nursery, once_per_connection)
    first = await client.call("GET", "api/v1/key-share")
    await trio.testing.wait_all_tasks_blocked()
    second = await client.call("GET", "api/v1/key-share")
    assert (first.body, second.body) == (b"1", b"2")
    await client.aclose()


async def test_a_silent_hub_times_out(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def silent(stream: trio.SocketStream, n: int) -> bool:
        await trio.sleep_forever()
        return False

    client = await serve(nursery, silent)
    with pytest.raises(HubDown, match="no answer within 5 s"):
        await client.call("GET", "api/v1/key-share")
    await client.aclose()


async def test_a_truncated_answer_is_a_failed_call(nursery: trio.Nursery) -> None:
    async def truncated(stream: trio.SocketStream, n: int) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort")
        return False

    client = await serve(nursery, truncated)
    with pytest.raises(HubDown):
        await client.call("GET", "api/v1/key-share")
    await client.aclose()
