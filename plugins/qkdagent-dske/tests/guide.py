"""A DSKE client and hub written from the protocol guide and REFERENCE §7.1 only.

Independent of the production code on purpose: nothing here imports `qkdagent_dske`; JSON,
base64, HMAC, allocation strings and Shamir (test_shamir's table-free field) are all done
again with the standard library. Plain-text PSRD bookkeeping, no persistence, no hardening:
this is a second reading of the wire format, for the interop tests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import ssl
import uuid
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import parse_qs, urlsplit

import h11
import httpx
import trio

from .test_shamir import slow_interpolate


def sign(key: bytes, message: bytes) -> str:
    return base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode()


@dataclass
class Pool:
    """PSRD blocks by UUID; `take` allocates sequentially (the owner's side)."""

    blocks: dict[str, bytearray] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    pointer: dict[str, int] = field(default_factory=dict)

    def add(self, block_uuid: str, data: bytes) -> None:
        self.blocks[block_uuid] = bytearray(data)
        self.order.append(block_uuid)
        self.pointer[block_uuid] = 0

    def take(self, size: int) -> tuple[list[dict], bytes]:
        fragments, out = [], b""
        for block_uuid in self.order:
            start = self.pointer[block_uuid]
            n = min(size - len(out), len(self.blocks[block_uuid]) - start)
            if n > 0:
                fragments.append({"block_uuid": block_uuid, "start": start, "size": n})
                out += bytes(self.blocks[block_uuid][start : start + n])
                self.pointer[block_uuid] = start + n
            if len(out) == size:
                return fragments, out
        raise RuntimeError("pool exhausted")

    def read(self, fragments: list[dict]) -> bytes:
        return b"".join(
            bytes(self.blocks[f["block_uuid"]][f["start"] : f["start"] + f["size"]])
            for f in fragments
        )


def header(fragments: list[dict], key: bytes, message: bytes) -> str:
    meta = ",".join(f"{f['block_uuid']}:{f['start']}:{f['size']}" for f in fragments)
    return f"{meta}%{sign(key, message)}"


def parse_header(value: str) -> tuple[list[dict], bytes]:
    meta, tag = value.split("%")
    fragments = []
    for part in meta.split(","):
        block_uuid, start, size = part.split(":")
        fragments.append({"block_uuid": block_uuid, "start": int(start), "size": int(size)})
    return fragments, base64.b64decode(tag)


def xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


# -- the client ---------------------------------------------------------------------------------


class GuideClient:
    """One DSKE client talking to several hubs (URL = .../<hub name>)."""

    def __init__(self, name: str, urls: dict[str, str], tls: ssl.SSLContext | None) -> None:
        self.name, self.urls = name, urls
        self.http = httpx.AsyncClient(verify=tls if tls else False, timeout=10)
        self.mine: dict[str, Pool] = {h: Pool() for h in urls}  # client-owned
        self.theirs: dict[str, Pool] = {h: Pool() for h in urls}  # hub-owned

    async def setup(self) -> None:
        for hub, url in self.urls.items():
            reply = await self.http.put(
                f"{url}/dske/oob/v1/registration",
                content=json.dumps({"client_name": self.name, "encryptor_names": [self.name]}),
            )
            assert reply.json() == {"hub_name": hub}
            for owner, pools in (("client", self.mine), ("hub", self.theirs)):
                reply = await self.http.get(
                    f"{url}/dske/oob/v1/psrd?client_name={self.name}&pool_owner={owner}&size=4096"
                )
                body = reply.json()
                pools[hub].add(body["block_uuid"], base64.b64decode(body["data"]))

    def _check(self, hub: str, reply: httpx.Response) -> None:
        fragments, tag = parse_header(reply.headers["DSKE-Signature"])
        key = self.theirs[hub].read(fragments)
        assert hmac.compare_digest(tag, hmac.new(key, reply.content, hashlib.sha256).digest())

    async def post_share(self, hub: str, slave: str, key_id: str, x: int, share: bytes) -> None:
        pad_fragments, pad = self.mine[hub].take(len(share))
        body = json.dumps(
            {
                "master_client_name": self.name,
                "master_sae_id": self.name,
                "slave_sae_id": slave,
                "user_key_id": key_id,
                "share_index": x,
                "encryption_key_allocation": {"fragments": pad_fragments},
                "encrypted_share_value": base64.b64encode(xor(share, pad)).decode(),
            }
        ).encode()
        sig_fragments, sig_key = self.mine[hub].take(32)
        reply = await self.http.post(
            f"{self.urls[hub]}/dske/api/v1/key-share",
            content=body,
            headers={"DSKE-Signature": header(sig_fragments, sig_key, body)},
        )
        assert reply.status_code == 200 and reply.json() is None
        self._check(hub, reply)

    async def get_share(self, hub: str, key_id: str) -> tuple[int, bytes]:
        query = f"client_name={self.name}&key_id={key_id}"
        sig_fragments, sig_key = self.mine[hub].take(32)
        reply = await self.http.get(
            f"{self.urls[hub]}/dske/api/v1/key-share?{query}",
            headers={"DSKE-Signature": header(sig_fragments, sig_key, query.encode())},
        )
        assert reply.status_code == 200, reply.text
        self._check(hub, reply)
        body = reply.json()
        pad = self.theirs[hub].read(body["encryption_key_allocation"]["fragments"])
        return body["share_index"], xor(base64.b64decode(body["encrypted_share_value"]), pad)

    async def aclose(self) -> None:
        await self.http.aclose()


def split(secret: bytes, k: int, n: int) -> list[tuple[int, bytes]]:
    """dske-python's layout with the table-free field: random shares at x = 0..k-3, the digest
    share at 254, the secret at 255, the rest interpolated."""
    randoms = [(x, os.urandom(len(secret))) for x in range(k - 2)]
    r = os.urandom(len(secret) - 4)
    base = [*randoms, (254, hmac.new(r, secret, hashlib.sha256).digest()[:4] + r), (255, secret)]
    return randoms + [(x, slow_interpolate(base, x)) for x in range(k - 2, n)]


def recover(shares: list[tuple[int, bytes]]) -> bytes:
    secret = slow_interpolate(shares, 255)
    digest = slow_interpolate(shares, 254)
    assert hmac.new(digest[4:], secret, hashlib.sha256).digest()[:4] == digest[:4]
    return secret


# -- the hub ------------------------------------------------------------------------------------


class GuideHub:
    """One security hub over plain HTTP (h11 on trio), pools and shares in dicts."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.client_owned: dict[str, Pool] = {}
        self.hub_owned: dict[str, Pool] = {}
        self.shares: dict[tuple[str, str], tuple[int, bytes]] = {}
        self.port = 0

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hubs/{self.name}"

    def handle(
        self, method: str, target: str, body: bytes, headers: dict
    ) -> tuple[int, bytes, str]:
        parts = urlsplit(target)
        path, query = parts.path, parts.query
        args = {k: v[0] for k, v in parse_qs(query).items()}
        assert path.startswith(f"/hubs/{self.name}/dske/")
        if path.endswith("/oob/v1/registration"):
            client = json.loads(body)["client_name"]
            self.client_owned.setdefault(client, Pool())
            self.hub_owned.setdefault(client, Pool())
            return 200, json.dumps({"hub_name": self.name}).encode(), ""
        if path.endswith("/oob/v1/psrd"):
            block_uuid, data = str(uuid.uuid4()), os.urandom(int(args["size"]))
            pools = self.client_owned if args["pool_owner"] == "client" else self.hub_owned
            pools[args["client_name"]].add(block_uuid, data)
            reply = {"block_uuid": block_uuid, "data": base64.b64encode(data).decode()}
            return 200, json.dumps(reply).encode(), ""
        if not path.endswith("/api/v1/key-share"):  # as dske-python (FastAPI) does
            return 404, b'{"detail":"Not Found"}', ""
        fragments, tag = parse_header(headers["dske-signature"])
        if method == "POST":
            post = json.loads(body)
            client = post["master_client_name"]
        else:
            client = args["client_name"]
        key = self.client_owned[client].read(fragments)
        signed = hmac.new(key, query.encode() + body, hashlib.sha256).digest()
        if not hmac.compare_digest(tag, signed):
            return 401, b'{"detail":"bad signature"}', ""
        if method == "POST":
            pad = self.client_owned[client].read(post["encryption_key_allocation"]["fragments"])
            share = xor(base64.b64decode(post["encrypted_share_value"]), pad)
            self.shares[(post["slave_sae_id"], post["user_key_id"])] = (post["share_index"], share)
            out = b"null"
        else:
            found = self.shares.pop((client, args["key_id"]), None)
            if found is None:
                return 404, b'{"detail":"no share"}', ""
            x, share = found
            pad_fragments, pad = self.hub_owned[client].take(len(share))
            out = json.dumps(
                {
                    "share_index": x,
                    "encryption_key_allocation": {"fragments": pad_fragments},
                    "encrypted_share_value": base64.b64encode(xor(share, pad)).decode(),
                }
            ).encode()
        sig_fragments, sig_key = self.hub_owned[client].take(32)
        return 200, out, header(sig_fragments, sig_key, out)

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async def connection(stream: trio.SocketStream) -> None:
            conn = h11.Connection(h11.SERVER)
            while True:
                request, body = None, b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        return
                assert request is not None
                headers = {k.decode(): v.decode() for k, v in request.headers}
                status, out, sig = self.handle(
                    request.method.decode(), request.target.decode(), body, headers
                )
                extra = [("DSKE-Signature", sig)] if sig else []
                head = [("content-length", str(len(out))), *extra]
                data = conn.send(h11.Response(status_code=status, headers=head))
                data += conn.send(h11.Data(data=out)) + conn.send(h11.EndOfMessage())
                await stream.send_all(data)
                conn.start_next_cycle()

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(partial(_quiet, connection), listeners)


async def _quiet(handler, stream: trio.SocketStream) -> None:  # type: ignore[no-untyped-def]
    try:
        await handler(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
        pass
