"""A TLS-PSK client handshake through libssl, to prove a consumer accepts a key.

Python 3.11's `ssl` module has no PSK API, and `openssl s_client -psk HEX` would put the key on
a command line (visible in /proc to every user). So the probe drives the system's libssl through
ctypes: the key goes straight from a `Secret` into OpenSSL's callback buffer.

Everything here blocks; call `handshake` through `trio.to_thread.run_sync`. OpenSSL 3 is
thread-safe, and every probe uses its own SSL_CTX.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import socket
import struct
from dataclasses import dataclass
from functools import cache

from qkdagent import Secret

TLS1_2_VERSION = 0x0303
TLS1_3_VERSION = 0x0304
_SSL_CTRL_SET_MIN_PROTO_VERSION = 123
_SSL_CTRL_SET_MAX_PROTO_VERSION = 124

# unsigned int cb(SSL *ssl, const char *hint, char *identity, unsigned int max_identity_len,
#                 unsigned char *psk, unsigned int max_psk_len)
_PSK_CLIENT_CB = ctypes.CFUNCTYPE(
    ctypes.c_uint,
    ctypes.c_void_p,
    ctypes.c_char_p,
    ctypes.c_void_p,
    ctypes.c_uint,
    ctypes.c_void_p,
    ctypes.c_uint,
)


class ProbeUnavailable(RuntimeError):
    """libssl could not be loaded or lacks PSK support."""


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of one handshake; `detail` is OpenSSL's reason text (never key material)."""

    ok: bool
    detail: str
    version: str = ""
    cipher: str = ""
    alert: bool = False
    """The server answered with a TLS alert: it refused this identity or key. A failed connect,
    reset or timeout leaves this False (nothing was proven either way)."""


@cache
def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    names = ("libssl.so.3", ctypes.util.find_library("ssl"))
    ssl = crypto = None
    for name in names:
        if not name:
            continue
        try:
            ssl = ctypes.CDLL(name)
            break
        except OSError:
            continue
    for name in ("libcrypto.so.3", ctypes.util.find_library("crypto")):
        if not name:
            continue
        try:
            crypto = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if ssl is None or crypto is None:
        raise ProbeUnavailable("libssl/libcrypto (OpenSSL 3) not found")
    vp, cp, ci, cl = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_long
    sigs: dict[str, tuple[object, list[object]]] = {
        "TLS_client_method": (vp, []),
        "SSL_CTX_new": (vp, [vp]),
        "SSL_CTX_free": (None, [vp]),
        "SSL_CTX_ctrl": (cl, [vp, ci, cl, vp]),
        "SSL_CTX_set_cipher_list": (ci, [vp, cp]),
        "SSL_CTX_set_ciphersuites": (ci, [vp, cp]),
        "SSL_CTX_set_psk_client_callback": (None, [vp, _PSK_CLIENT_CB]),
        "SSL_new": (vp, [vp]),
        "SSL_free": (None, [vp]),
        "SSL_set_fd": (ci, [vp, ci]),
        "SSL_connect": (ci, [vp]),
        "SSL_shutdown": (ci, [vp]),
        "SSL_get_error": (ci, [vp, ci]),
        "SSL_get_version": (cp, [vp]),
        "SSL_get_current_cipher": (vp, [vp]),
        "SSL_CIPHER_get_name": (cp, [vp]),
    }
    try:
        for fname, (restype, argtypes) in sigs.items():
            fn = getattr(ssl, fname)
            fn.restype = restype
            fn.argtypes = argtypes
        crypto.ERR_get_error.restype = ctypes.c_ulong
        crypto.ERR_get_error.argtypes = []
        crypto.ERR_clear_error.restype = None
        crypto.ERR_clear_error.argtypes = []
        crypto.ERR_error_string_n.restype = None
        crypto.ERR_error_string_n.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_size_t]
    except AttributeError as exc:
        raise ProbeUnavailable(f"libssl lacks a PSK function: {exc}") from None
    return ssl, crypto


def available() -> bool:
    try:
        _libs()
    except ProbeUnavailable:
        return False
    return True


_ERR_LIB_SSL = 20
_ERR_SYSTEM_FLAG = 0x80000000
_SSL_AD_REASON_OFFSET = 1000
"""libssl reports a *received* alert N as reason 1000 + N (SSL_AD_REASON_OFFSET)."""


def _is_received_alert(code: int) -> bool:
    if code & _ERR_SYSTEM_FLAG or (code >> 23) & 0xFF != _ERR_LIB_SSL:
        return False
    return _SSL_AD_REASON_OFFSET <= code & 0x7FFFFF < _SSL_AD_REASON_OFFSET + 256


def _drain(crypto: ctypes.CDLL) -> tuple[str, bool]:
    """OpenSSL's queued error texts, and whether one of them is an alert from the peer."""
    texts, alert = [], False
    while code := crypto.ERR_get_error():
        alert = alert or _is_received_alert(code)
        buf = ctypes.create_string_buffer(256)
        crypto.ERR_error_string_n(code, buf, len(buf))
        texts.append(buf.value.decode("ascii", "replace"))
    return "; ".join(texts), alert


def _errors(crypto: ctypes.CDLL) -> str:
    return _drain(crypto)[0]


def handshake(
    host: str,
    port: int,
    identity: str,
    secret: Secret,
    *,
    tls: str = "1.2",
    ciphers: str | None = None,
    timeout: float = 5.0,
) -> ProbeResult:
    """Run one PSK handshake as a client; True only if the server proved it holds the key.

    A completed client handshake implies the server's Finished message verified under the PSK,
    so success means "the consumer has this identity with this key" (TLS 1.2 and 1.3 alike).
    `tls` is "1.2" or "1.3"; TLS 1.3 uses SHA-256 suites only (legacy PSK callbacks).
    """
    ssl, crypto = _libs()
    ident = identity.encode("utf-8")
    key = secret.reveal()

    @_PSK_CLIENT_CB
    def callback(
        _ssl: int | None,
        _hint: bytes | None,
        out_identity: int,  # libssl's buffers: never NULL
        max_identity: int,
        out_psk: int,
        max_psk: int,
    ) -> int:
        if len(ident) + 1 > max_identity or len(key) > max_psk:
            return 0
        ctypes.memmove(out_identity, ident + b"\0", len(ident) + 1)
        ctypes.memmove(out_psk, key, len(key))
        return len(key)

    version = TLS1_3_VERSION if tls == "1.3" else TLS1_2_VERSION
    crypto.ERR_clear_error()
    ctx = ssl.SSL_CTX_new(ssl.TLS_client_method())
    if not ctx:
        raise ProbeUnavailable("SSL_CTX_new failed: " + _errors(crypto))
    conn = None
    sock: socket.socket | None = None
    try:
        ssl.SSL_CTX_ctrl(ctx, _SSL_CTRL_SET_MIN_PROTO_VERSION, version, None)
        ssl.SSL_CTX_ctrl(ctx, _SSL_CTRL_SET_MAX_PROTO_VERSION, version, None)
        if version == TLS1_3_VERSION:
            suites = ciphers or "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256"
            if ssl.SSL_CTX_set_ciphersuites(ctx, suites.encode()) != 1:
                return ProbeResult(False, "no usable TLS 1.3 suite: " + _errors(crypto))
        elif ssl.SSL_CTX_set_cipher_list(ctx, (ciphers or "PSK").encode()) != 1:
            return ProbeResult(False, "no usable PSK cipher: " + _errors(crypto))
        ssl.SSL_CTX_set_psk_client_callback(ctx, callback)
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            return ProbeResult(False, f"cannot connect to {host}:{port}: {exc.strerror or exc}")
        # libssl needs a blocking fd; bound every read/write with kernel timeouts instead.
        sock.settimeout(None)
        tv = struct.pack("ll", int(timeout), int((timeout % 1) * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        conn = ssl.SSL_new(ctx)
        ssl.SSL_set_fd(conn, sock.fileno())
        rc = ssl.SSL_connect(conn)
        if rc == 1:
            cipher = ssl.SSL_CIPHER_get_name(ssl.SSL_get_current_cipher(conn)) or b""
            result = ProbeResult(
                True,
                "handshake completed",
                (ssl.SSL_get_version(conn) or b"").decode(),
                cipher.decode(),
            )
            ssl.SSL_shutdown(conn)
            return result
        code = ssl.SSL_get_error(conn, rc)
        detail, alert = _drain(crypto)
        return ProbeResult(False, detail or f"SSL_get_error={code}", alert=alert)
    finally:
        if conn:
            ssl.SSL_free(conn)
        ssl.SSL_CTX_free(ctx)
        if sock is not None:
            sock.close()
        crypto.ERR_clear_error()
