"""A small exchange source for tests of the DESIGN v2 §3 hooks (`offer`, `answer`,
`accept_answer`, per-link source state): X25519 used like a KEM, with a fresh responder key
pair per epoch, as the ML-KEM source does with ML-KEM.

- Responder state: its current ephemeral private key. `answer` decapsulates the key ID (the
  initiator's ephemeral public key) with it, makes the next key pair, answers the next public
  key and keeps the next private key: the used private key is gone once the epoch commits.
- Initiator state: the responder's latest public key. With none (first rotation, resync),
  both sides use a static key pair derived from the `static_seed` option (test only).

Not a key source for production: it is a test double with real cryptography.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from ..errors import KeyNotFound, SourceError
from ..interfaces import Answered, Link, PluginContext, Source
from ..options import Options
from ..secret import Key, Secret

RAW = (Encoding.Raw, PublicFormat.Raw)


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(*RAW)


def _private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


class ExchangeSource(Source):
    """Source type `x25519-exchange` (test kit)."""

    type_name = "x25519-exchange"
    max_key_id = 64

    def __init__(self, name: str, options: Options, context: PluginContext) -> None:
        super().__init__(name, options, context)
        seed = options.string("static_seed", "qkdagent test static key").encode()
        self.static = X25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest())
        self.answers: list[bytes] = []
        """Every answer this source gave (tests compare them with the stored state)."""

    async def new_key(self, link: Link) -> Key:
        return await self.offer(link, None)

    async def key_by_id(self, link: Link, key_id: str) -> Key:
        return (await self.answer(link, key_id, None)).key

    async def offer(self, link: Link, state: bytes | None) -> Key:
        peer = X25519PublicKey.from_public_bytes(state or _public(self.static))
        ephemeral = X25519PrivateKey.generate()
        try:
            shared = ephemeral.exchange(peer)
        except ValueError:  # a low-order point the peer answered
            raise SourceError("the peer's last answer is not a usable X25519 public key") from None
        key_id = base64.urlsafe_b64encode(_public(ephemeral)).decode()
        return Key(key_id, Secret(hashlib.sha3_256(shared).digest()))

    async def answer(self, link: Link, key_id: str, state: bytes | None) -> Answered:
        mine = X25519PrivateKey.from_private_bytes(state) if state else self.static
        try:
            theirs = X25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(key_id))
            shared = mine.exchange(theirs)  # ValueError on a low-order point
        except ValueError:
            raise KeyNotFound("key ID is not an X25519 public key") from None
        following = X25519PrivateKey.generate()
        self.answers.append(_public(following))
        return Answered(
            Key(key_id, Secret(hashlib.sha3_256(shared).digest())),
            answer=_public(following),
            state=_private(following),
        )

    async def accept_answer(self, link: Link, answer: bytes, state: bytes | None) -> bytes | None:
        if len(answer) != 32:
            raise SourceError("the peer's answer is not an X25519 public key")
        return answer
