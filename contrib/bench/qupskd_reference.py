"""A quPSKd-equivalent reference pair for the rotation benchmark (REFERENCE.md §11).

quPSKd is the proof of concept qkdagent replaces. This is not its code: it is the same protocol
and the same work per rotation, written from REFERENCE.md §11, so `bench_rotation_latency.py`
can run both systems side by side on any machine:

- the peer channel is plain HTTP GET, unauthenticated, one new connection per request (the
  standard library's `urllib.request` client and `ThreadingHTTPServer`, as quPSKd);
- the initiator calls the peer's `/new` (first rotation) or `/rotate`; the peer resets its chain
  on `/new`, takes a key with ETSI 014 `enc_keys?number=1` from its KME for the initiator's SAE
  ID and answers `{"status": "ok", "key_ID": ...}`; the initiator calls its own KME's
  `dec_keys?key_ID=...` (master: the peer's SAE ID), then the peer's `/ack`, on which the peer
  derives and writes; then the initiator derives and writes;
- chain: H(parts) = base64(SHA3-256("".join(sorted(parts)))); psk0 = H([psk, "quPSKd Version
  1"]); psk_n = H([key_b64, key_ID, psk_{n-1}]); the PSK file is the 44 base64 characters,
  written without fsync (here through a temp file and a rename, mode 0600).

One deliberate difference: quPSKd spoke plain HTTP to its KME. This reference uses the same
simulated KMEs as qkdagent (`qkdagent kme-sim`), which serve HTTPS with mutual TLS only, so its
KME client is HTTPS with the SAE's client certificate, on one kept-alive connection per process
(`--kme-reconnect`: a new TLS connection per request instead, as a per-request client would).

    python qupskd_reference.py responder --listen 127.0.0.1:9001 --kme-url https://... \
        --cert bob.pem --key bob.key --ca ca.pem --remote-sae alice --psk-file psk --out bob.psk
    python qupskd_reference.py initiator --peer-url http://127.0.0.1:9001 --kme-url ... \
        --cert alice.pem --key alice.key --ca ca.pem --remote-sae bob --psk-file psk \
        --out alice.psk --interval 1 [--rotations N] [--log alice.jsonl]

The initiator writes one JSON line per rotation attempt to `--log` (epoch, key_ID, duration_ms,
or error); key bytes and PSKs never appear in logs, argv or the environment (the initial PSK is
read from `--psk-file`).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import os
import re
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

IDENTITY = "quPSKd Version 1"
MAX_REPLY = 64 * 1024
"""Largest KME or peer reply read; anything longer is one failed attempt."""
KEY_ID = re.compile(r"[\x21-\x7e]{1,256}")
"""A key ID we pass on: printable ASCII without spaces, bounded (it goes into a URL)."""


class ReferenceError_(Exception):
    """One failed request or reply (the attempt fails, the process keeps running)."""


# -- the chain (pure) ------------------------------------------------------------------------


def chain_hash(parts: list[str]) -> str:
    """quPSKd's H: base64 of SHA3-256 over the sorted parts joined without a separator."""
    digest = hashlib.sha3_256("".join(sorted(parts)).encode()).digest()
    return base64.b64encode(digest).decode("ascii")


def initial_psk(psk: str) -> str:
    return chain_hash([psk, IDENTITY])


def next_psk(key_b64: str, key_id: str, previous: str) -> str:
    return chain_hash([key_b64, key_id, previous])


# -- parsing untrusted replies (pure) ----------------------------------------------------------


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ReferenceError_(f"{what}: reply is not JSON") from None
    if not isinstance(value, dict):
        raise ReferenceError_(f"{what}: reply is not a JSON object")
    return value


def parse_key_container(data: bytes, key_id: str | None = None) -> tuple[str, str]:
    """(key_ID, key as the KME's base64 text) from a one-key 014 container."""
    container = _json_object(data, "KME")
    keys = container.get("keys")
    if not isinstance(keys, list) or len(keys) != 1 or not isinstance(keys[0], dict):
        raise ReferenceError_("KME: not a container of exactly one key")
    got_id, key = keys[0].get("key_ID"), keys[0].get("key")
    if not isinstance(got_id, str) or not KEY_ID.fullmatch(got_id):
        raise ReferenceError_("KME: missing or malformed key_ID")
    if key_id is not None and got_id != key_id:
        raise ReferenceError_("KME: answered another key_ID than asked for")
    if not isinstance(key, str) or len(key) > 16384:
        raise ReferenceError_("KME: missing or malformed key")
    try:
        base64.b64decode(key, validate=True)
    except ValueError:
        raise ReferenceError_("KME: key is not base64") from None
    return got_id, key


def parse_peer_key_id(data: bytes) -> str:
    reply = _json_object(data, "peer")
    key_id = reply.get("key_ID")
    if reply.get("status") != "ok" or not isinstance(key_id, str) or not KEY_ID.fullmatch(key_id):
        raise ReferenceError_("peer: no key_ID in its answer")
    return key_id


# -- I/O -----------------------------------------------------------------------------------------


def write_psk(path: Path, psk: str) -> None:
    """Replace the PSK file (0600, temp file and rename, no fsync: quPSKd does not sync)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, psk.encode("ascii"))
    finally:
        os.close(fd)
    os.replace(tmp, path)


class KmeClient:
    """ETSI 014 GETs over HTTPS with the SAE's client certificate."""

    def __init__(self, url: str, cert: str, key: str, ca: str, *, reconnect: bool) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "https" or not parsed.hostname:
            raise SystemExit(f"--kme-url {url!r}: an https:// URL is needed (kme-sim is mTLS)")
        self.host, self.port = parsed.hostname, parsed.port or 443
        self.context = ssl.create_default_context(cafile=ca)
        self.context.load_cert_chain(cert, key)
        self.reconnect = reconnect
        self.conn: http.client.HTTPSConnection | None = None
        self.lock = threading.Lock()

    def _connection(self) -> http.client.HTTPSConnection:
        if self.conn is None:
            self.conn = http.client.HTTPSConnection(
                self.host, self.port, context=self.context, timeout=10
            )
        return self.conn

    def get(self, path: str) -> bytes:
        with self.lock:
            for attempt in (1, 2):  # a kept-alive connection the KME closed: once more
                conn = self._connection()
                try:
                    conn.request("GET", path)
                    response = conn.getresponse()
                    data = response.read(MAX_REPLY + 1)
                    status = response.status
                    if self.reconnect or response.will_close:
                        conn.close()
                        self.conn = None
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()
                    self.conn = None
                    if attempt == 2:
                        raise ReferenceError_(f"KME: {type(exc).__name__}") from None
                    continue
                if len(data) > MAX_REPLY:
                    conn.close()
                    self.conn = None
                    raise ReferenceError_("KME: reply too large")
                if status != 200:
                    raise ReferenceError_(f"KME: HTTP {status}")
                return data
        raise AssertionError("unreachable")

    def enc_key(self, slave: str) -> tuple[str, str]:
        return parse_key_container(self.get(f"/api/v1/keys/{_q(slave)}/enc_keys?number=1"))

    def dec_key(self, master: str, key_id: str) -> tuple[str, str]:
        path = f"/api/v1/keys/{_q(master)}/dec_keys?key_ID={_q(key_id)}"
        return parse_key_container(self.get(path), key_id)


def _q(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def peer_get(url: str) -> bytes:
    """One plain-HTTP GET on a new connection (quPSKd's client), bounded."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - http only
            data = response.read(MAX_REPLY + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise ReferenceError_(f"peer: {type(exc).__name__}") from None
    if len(data) > MAX_REPLY:
        raise ReferenceError_("peer: reply too large")
    return data


# -- responder -------------------------------------------------------------------------------


class ResponderState:
    def __init__(self, args: argparse.Namespace, kme: KmeClient, psk0: str) -> None:
        self.args = args
        self.kme = kme
        self.psk0 = psk0
        self.psk = psk0
        self.pending: tuple[str, str] | None = None
        self.lock = threading.Lock()

    def rotate(self, new: bool) -> bytes:
        with self.lock:
            if new:
                self.psk = self.psk0
            self.pending = self.kme.enc_key(self.args.remote_sae)
            return json.dumps({"status": "ok", "key_ID": self.pending[0]}).encode()

    def ack(self) -> bytes:
        with self.lock:
            if self.pending is None:
                raise ReferenceError_("ack without a key")
            key_id, key = self.pending
            self.pending = None
            self.psk = next_psk(key, key_id, self.psk)
            write_psk(self.args.out, self.psk)
            return b'{"status": "ok"}'


def serve(args: argparse.Namespace, state: ResponderState) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            try:
                if self.path == "/new":
                    body, status = state.rotate(new=True), 200
                elif self.path == "/rotate":
                    body, status = state.rotate(new=False), 200
                elif self.path == "/ack":
                    body, status = state.ack(), 200
                else:
                    body, status = b'{"status": "not found"}', 404
            except ReferenceError_ as exc:
                body, status = json.dumps({"status": "error", "message": str(exc)}).encode(), 503
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: a line per request would be I/O the measurement does not want

    host, _, port = args.listen.rpartition(":")
    server = ThreadingHTTPServer((host, int(port)), Handler)
    server.daemon_threads = True
    if args.ready_file:
        Path(args.ready_file).write_text(f"http://{host}:{server.server_port}")
    server.serve_forever()


# -- initiator -------------------------------------------------------------------------------


def initiate(args: argparse.Namespace, kme: KmeClient, psk0: str) -> int:
    psk: str | None = None  # None until the first /new succeeded
    log = open(args.log, "a", buffering=1) if args.log else sys.stdout
    epoch, done, failures = 0, 0, 0
    due = time.monotonic()
    while args.rotations == 0 or done < args.rotations:
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        due = max(due + args.interval, time.monotonic())
        started = time.perf_counter()
        try:
            previous = psk0 if psk is None else psk
            action = "new" if psk is None else "rotate"
            key_id = parse_peer_key_id(peer_get(f"{args.peer_url}/{action}"))
            _, key = kme.dec_key(args.remote_sae, key_id)
            _json_object(peer_get(f"{args.peer_url}/ack"), "peer")
            psk = next_psk(key, key_id, previous)
            write_psk(args.out, psk)
        except ReferenceError_ as exc:
            failures += 1
            log.write(json.dumps({"error": str(exc)}) + "\n")
            if failures > 100 and done == 0:
                return 1
            continue
        epoch += 1
        done += 1
        duration = (time.perf_counter() - started) * 1000
        log.write(json.dumps({"epoch": epoch, "key_ID": key_id, "duration_ms": duration}) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=("initiator", "responder"))
    parser.add_argument("--listen", default="127.0.0.1:0", help="responder: HOST:PORT")
    parser.add_argument("--peer-url", help="initiator: http://HOST:PORT of the responder")
    parser.add_argument("--kme-url", required=True, help="https://HOST:PORT of this side's KME")
    parser.add_argument("--cert", required=True, help="this SAE's client certificate")
    parser.add_argument("--key", required=True, help="its private key")
    parser.add_argument("--ca", required=True, help="CA of the KME's server certificate")
    parser.add_argument("--remote-sae", required=True, help="the other side's SAE ID")
    parser.add_argument("--psk-file", type=Path, help="initial PSK (text); default empty")
    parser.add_argument("--out", type=Path, required=True, help="the PSK file to write")
    parser.add_argument("--interval", type=float, default=120.0, help="initiator: seconds")
    parser.add_argument("--rotations", type=int, default=0, help="initiator: stop after N")
    parser.add_argument("--log", help="initiator: JSON lines per rotation (default stdout)")
    parser.add_argument("--ready-file", help="responder: written once listening")
    parser.add_argument("--kme-reconnect", action="store_true", help="new TLS per KME call")
    args = parser.parse_args(argv)
    psk = args.psk_file.read_text().strip() if args.psk_file else ""
    kme = KmeClient(args.kme_url, args.cert, args.key, args.ca, reconnect=args.kme_reconnect)
    psk0 = initial_psk(psk)
    if args.role == "responder":
        serve(args, ResponderState(args, kme, psk0))
        return 0
    if not args.peer_url:
        parser.error("initiator needs --peer-url")
    return initiate(args, kme, psk0)


if __name__ == "__main__":
    sys.exit(main())
