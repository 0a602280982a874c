"""Source type `mlkem`: an ML-KEM shared secret per rotation, with forward secrecy.

The flow (DESIGN v2 §3, exchange sources):
- responder: its per-link source state is the seed of an ephemeral ML-KEM private key. `answer`
  decapsulates the key ID (a ciphertext) with it, makes the next key pair, answers the next
  public key and keeps the next seed. The core commits that state in the epoch's transaction,
  so the used private key is gone from the state database once the epoch commits.
- initiator: its state is the responder's latest public key; `offer` encapsulates to it and
  sends the ciphertext as the key ID.
- with no state (first rotation, after a resync) both sides use the responder's static key
  pair (`qkdagent pqc keygen`): even epoch 1 is post-quantum.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable

from qkdagent import (
    Answered,
    Key,
    KeyNotFound,
    Link,
    Misconfigured,
    Options,
    PluginContext,
    Secret,
    Source,
    SourceError,
)

from . import kem


class MlkemSource(Source):
    """Source type `mlkem` (ML-KEM-768 by default, ML-KEM-1024 selectable)."""

    type_name = "mlkem"
    max_key_id = max(p.max_key_id for p in kem.PARAMETER_SETS.values())

    def __init__(self, name: str, options: Options, context: PluginContext) -> None:
        super().__init__(name, options, context)
        choice = options.string("parameter_set", kem.DEFAULT, choices=tuple(kem.PARAMETER_SETS))
        self.params = kem.PARAMETER_SETS[choice]
        seed = options.secret("private_key", None, encoding="base64", size=kem.SEED_SIZE)
        self._static: kem.PrivateKey | None = None
        self._static_fp = b""
        if seed is not None:
            self._static = self.params.private_key(seed.reveal())
            seed.wipe()
            public = self._static.public_key().public_bytes_raw()
            self._static_fp = kem.fingerprint(self.params, public)
        peers = options.sub("peer_public_keys", {})
        self._peers: dict[str, bytes] = {}
        for peer in peers.names():
            text = peers.string(peer, max_len=4 * self.params.public_size)
            try:
                self._peers[peer] = raw = _b64(text)
                self.params.public_key(raw)
            except ValueError as exc:
                peers.fail(peer, f"is not an {self.params.name} public key ({exc})")
        peers.finish()
        self._generate: Callable[[], kem.PrivateKey] = self.params.generate
        """Makes each next ephemeral key pair; the hybrid test vectors fix it to a seed."""
        self._last: dict[str, tuple[bytes, kem.PrivateKey, bytes]] = {}
        """Per link: the key pair this side answered last (seed, key, fingerprint), so the
        next `answer` skips re-deriving it from the state (about 100 µs). Replaced, not kept,
        at each answer: the used private key leaves memory as it leaves the database."""

    @property
    def static_fingerprint(self) -> str | None:
        """This agent's static public key fingerprint (as `qkdagent pqc keygen` prints it)."""
        return kem.b64url(self._static_fp) if self._static is not None else None

    async def prepare(self) -> None:
        for link in self.links:
            where = f"source {self.name!r}, link {link.name!r}"
            if link.initiator and link.peer not in self._peers:
                raise Misconfigured(
                    f"{where}: no static public key for peer {link.peer!r} "
                    f"(set sources.{self.name}.peer_public_keys.{link.peer} to the public key "
                    f"that `qkdagent pqc keygen` printed on {link.peer})"
                )
            if not link.initiator and self._static is None:
                raise Misconfigured(
                    f"{where}: this side answers and needs its static private key "
                    f"(set sources.{self.name}.private_key, from `qkdagent pqc keygen`)"
                )

    # -- the plain interface: a single exchange on the static key pair -------------------------

    async def new_key(self, link: Link) -> Key:
        return await self.offer(link, None)

    async def key_by_id(self, link: Link, key_id: str) -> Key:
        answered = await self.answer(link, key_id, None)
        key: Key = answered.key
        return key

    # -- the exchange interface -----------------------------------------------------------------

    async def offer(self, link: Link, state: bytes | None) -> Key:
        """Encapsulate to the responder's latest public key, or its static one."""
        public = state if state is not None else self._peer_static(link)
        try:
            secret, key_id = kem.encapsulate(self.params, public)
        except ValueError:
            raise SourceError(
                f"link {link.name!r}: the stored {self.params.name} public key is unusable"
            ) from None
        return Key(key_id, Secret(secret))

    async def answer(self, link: Link, key_id: str, state: bytes | None) -> Answered:
        """Decapsulate with the current ephemeral (or static) private key; answer the next
        public key and keep the next private key as the link's state."""
        try:
            fp, ciphertext = kem.parse_key_id(self.params, key_id)
        except ValueError as exc:
            raise KeyNotFound(f"link {link.name!r}: {exc}") from None
        private, expected = self._private_for(link, state)
        if fp != expected:
            raise KeyNotFound(self._mismatch(link, fp, state))
        try:
            secret = private.decapsulate(ciphertext)
        except ValueError:
            raise KeyNotFound(f"link {link.name!r}: the ciphertext does not decapsulate") from None
        following = self._generate()
        public, seed = following.public_key().public_bytes_raw(), following.private_bytes_raw()
        self._last[link.name] = (seed, following, kem.fingerprint(self.params, public))
        return Answered(Key(key_id, Secret(secret)), answer=public, state=seed)

    async def accept_answer(self, link: Link, answer: bytes, state: bytes | None) -> bytes | None:
        """The responder's next public key becomes the link's state."""
        try:
            self.params.public_key(answer)
        except ValueError as exc:
            raise SourceError(
                f"link {link.name!r}: the peer's answer is not an {self.params.name} public key "
                f"({exc})"
            ) from None
        return bytes(answer)

    # -- helpers ---------------------------------------------------------------------------------

    def _peer_static(self, link: Link) -> bytes:
        try:
            return self._peers[link.peer]
        except KeyError:
            raise SourceError(
                f"link {link.name!r}: no static public key for peer {link.peer!r} "
                f"(sources.{self.name}.peer_public_keys.{link.peer})"
            ) from None

    def _private_for(self, link: Link, state: bytes | None) -> tuple[kem.PrivateKey, bytes]:
        """The private key the initiator should have used, and its public key's fingerprint."""
        if state is None:
            if self._static is None:
                raise SourceError(
                    f"link {link.name!r}: no static private key (sources.{self.name}.private_key)"
                )
            return self._static, self._static_fp
        last = self._last.get(link.name)
        if last is not None and hmac.compare_digest(last[0], state):
            return last[1], last[2]
        try:
            private = self.params.private_key(state)
        except ValueError:
            raise SourceError(f"link {link.name!r}: the stored ephemeral key is unusable") from None
        return private, kem.fingerprint(self.params, private.public_key().public_bytes_raw())

    def _mismatch(self, link: Link, fp: bytes, state: bytes | None) -> str:
        if state is None:
            return (
                f"link {link.name!r}: the ciphertext is for static public key {kem.b64url(fp)}, "
                f"but this agent's static key is {self.static_fingerprint}: peer {link.peer!r} "
                f"holds the wrong public key for {link.local!r} in "
                f"peer_public_keys.{link.local} (or another parameter set)"
            )
        which = "our static key" if fp == self._static_fp else "no key of ours"
        return (
            f"link {link.name!r}: the ciphertext is for public key {kem.b64url(fp)} ({which}), "
            f"not the ephemeral key this agent answered last"
        )


def _b64(text: str) -> bytes:
    """Standard base64 (what `qkdagent pqc keygen` prints), strict."""
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
