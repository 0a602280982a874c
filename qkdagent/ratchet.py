"""The key schedule (DESIGN §5): a forward-secure HKDF-SHA3-256 chain per link.

Pure functions over bytes; no I/O, no clocks. Every input is length-prefixed so that no two
different inputs encode alike, and every output has its own label beginning `qkdagent v1`.
`tests/vectors/ratchet.json` publishes input/output vectors for other implementations.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from .secret import Secret

KEY_SIZE = 32
_HASH = hashes.SHA3_256


def enc(data: bytes | str) -> bytes:
    """Length-prefixed encoding: 4-byte big-endian length, then the bytes (UTF-8 for text)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return len(raw).to_bytes(4, "big") + raw


def _expand(prk: bytes, info: bytes) -> bytes:
    return HKDFExpand(algorithm=_HASH(), length=KEY_SIZE, info=info).derive(prk)


def _extract(salt: bytes, ikm: bytes) -> bytes:
    return HKDF.extract(_HASH(), salt, ikm)


@dataclass(frozen=True)
class ChainStart:
    """Epoch-0 state of a link, derived from its bootstrap secret."""

    chain_key: Secret
    auth_key: Secret


def chain_start(bootstrap: Secret, link: str) -> ChainStart:
    """c0 and a0: the chain key and the auth key for the first rotation (and for resync)."""
    prk = _extract(b"qkdagent v1 bootstrap", bootstrap.reveal())
    return ChainStart(
        chain_key=Secret(_expand(prk, enc("qkdagent v1 bootstrap chain") + enc(link))),
        auth_key=Secret(_expand(prk, enc("qkdagent v1 bootstrap auth") + enc(link))),
    )


@dataclass(frozen=True)
class SourceInput:
    """One source's contribution to a rotation, in the link's configured source order."""

    source: str
    key_id: str
    key: Secret


@dataclass(frozen=True)
class Transcript:
    """Everything both sides must agree on for one rotation; its hash binds every output."""

    link: str
    initiator: str
    responder: str
    epoch: int
    key_ids: tuple[tuple[str, str], ...]
    """(source name, key ID) pairs in config order."""
    initiator_nonce: bytes
    responder_nonce: bytes
    labels: tuple[str, ...] = ()
    """The shared sink labels, sorted (DESIGN v2 §4: both sides compared them)."""
    answers: tuple[tuple[str, bytes], ...] = ()
    """(source name, answer) of exchange sources, in config order; empty for plain sources."""

    def digest(self) -> bytes:
        parts = [
            enc("qkdagent v2 transcript"),
            enc(self.link),
            enc(self.initiator),
            enc(self.responder),
            self.epoch.to_bytes(8, "big"),
            len(self.key_ids).to_bytes(4, "big"),
        ]
        for source, key_id in self.key_ids:
            parts += [enc(source), enc(key_id)]
        parts += [enc(self.initiator_nonce), enc(self.responder_nonce)]
        parts.append(len(self.labels).to_bytes(4, "big"))
        parts += [enc(label) for label in self.labels]
        parts.append(len(self.answers).to_bytes(4, "big"))
        for source, answer in self.answers:
            parts += [enc(source), enc(answer)]
        return hashlib.sha3_256(b"".join(parts)).digest()


@dataclass(frozen=True)
class EpochKeys:
    """What one rotation yields. `outputs` maps each sink label to its own secret."""

    epoch: int
    chain_key: Secret
    auth_key: Secret
    confirm_key: Secret
    outputs: dict[str, Secret]
    transcript_hash: bytes


def source_ikm(inputs: Sequence[SourceInput]) -> bytes:
    parts = [len(inputs).to_bytes(4, "big")]
    for item in inputs:
        parts += [enc(item.source), enc(item.key_id), enc(item.key.reveal())]
    return b"".join(parts)


def rotate(
    chain_key: Secret,
    inputs: Sequence[SourceInput],
    transcript: Transcript,
    labels: Iterable[str],
) -> EpochKeys:
    """Derive epoch n+1 from c_n and the sources' keys.

    Combining every source in one Extract keeps the result secret as long as any one source
    (or the previous chain key) is secret.
    """
    if not inputs:
        raise ValueError("a rotation needs at least one source key")
    if [(i.source, i.key_id) for i in inputs] != list(transcript.key_ids):
        raise ValueError("transcript key IDs do not match the source inputs")
    prk = _extract(chain_key.reveal(), source_ikm(inputs))
    t = transcript.digest()
    outputs = {
        label: Secret(_expand(prk, enc("qkdagent v1 sink") + enc(label) + t))
        for label in sorted(set(labels))
    }
    return EpochKeys(
        epoch=transcript.epoch,
        chain_key=Secret(_expand(prk, enc("qkdagent v1 chain") + t)),
        auth_key=Secret(_expand(prk, enc("qkdagent v1 auth") + t)),
        confirm_key=Secret(_expand(prk, enc("qkdagent v1 confirm") + t)),
        outputs=outputs,
        transcript_hash=t,
    )


def confirmation(keys: EpochKeys, role: str) -> bytes:
    """Key-confirmation tag: proves the sender derived the same epoch keys (role-bound)."""
    if role not in ("initiator", "responder"):
        raise ValueError("role must be initiator or responder")
    data = enc("qkdagent v1 confirm " + role) + keys.transcript_hash
    return hmac.new(keys.confirm_key.reveal(), data, hashlib.sha3_256).digest()
