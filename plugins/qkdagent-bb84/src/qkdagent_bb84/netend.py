"""One end of a block's classical channel when the other end is another process.

`NetEnd` has the in-process `Channel`'s interface (`send(sender, kind, payload)` returns what
the receiving end goes on with), so the engine runs unchanged at each end: a message from this
end's role is tagged (HMAC-SHA256 over direction, sequence number, kind and payload, under the
block's key) and written; a message from the other role is read from the connection, its kind
and tag checked against this end's own counter, and the received payload returned; the payload
the engine computed for the other role is discarded. `local` says whose data this process really
holds: Bob's process holds only Bob's (the engine keeps Alice's values out of what he uses);
Alice's holds both, because her process simulates the physics and so knows Bob's detections
(the simulation shortcut for the quantum channel, see README): her copy of Bob's state drives
her side of the protocol, and every message Bob really sends is checked against it.
"""

from __future__ import annotations

import hmac
from collections import Counter
from typing import Protocol

from .channel import ALICE, BOB, MIN_KEY_BYTES, TAG_BYTES, AuthError, mac
from .frames import encode_frame, parse_body


class Transport(Protocol):
    """Whole frames over a connection (blocking; raise `ChannelError` when it fails)."""

    def send_frame(self, frame: bytes) -> None: ...

    def receive_body(self) -> bytes: ...


class NetEnd:
    def __init__(
        self,
        role: str,
        key: bytes,
        transport: Transport,
        *,
        local: frozenset[str] | None = None,
        received: int = 0,
        sent: int = 0,
    ) -> None:
        if role not in (ALICE, BOB) or len(key) < MIN_KEY_BYTES:
            raise ValueError("bad role or authentication key")
        self.role = role
        self.peer = BOB if role == ALICE else ALICE
        self._key = key
        self.transport = transport
        self.local = local if local is not None else frozenset((role,))
        self._out, self._in = sent, received
        self.sent: Counter[str] = Counter()
        self.bytes_sent = 0

    def __repr__(self) -> str:
        return f"<NetEnd {self.role} out={self._out} in={self._in}>"

    def knows(self, role: str) -> bool:
        return role in self.local

    def send(self, sender: str, kind: str, payload: bytes) -> bytes:
        if sender == self.role:
            tag = mac(self._key, sender, self._out, kind, payload)
            self._out += 1
            self.sent[kind] += 1
            self.bytes_sent += len(payload) + TAG_BYTES
            self.transport.send_frame(encode_frame(kind, payload, tag))
            return payload
        return self.receive(kind)

    def receive(self, kind: str) -> bytes:
        """The next message from the peer, which must be `kind` and carry the right tag."""
        frame = parse_body(self.transport.receive_body())
        expected = mac(self._key, self.peer, self._in, frame.kind, frame.payload)
        self._in += 1
        if frame.kind != kind or not hmac.compare_digest(frame.tag, expected):
            raise AuthError(f"classical message {kind!r} from {self.peer} failed authentication")
        return frame.payload
