"""Regenerate messages.json (only when the message format changes on purpose).

python tests/vectors/make_message_vectors.py > tests/vectors/messages.json
"""

from __future__ import annotations

import hashlib
import json

from qkdagent import protocol, ratchet
from qkdagent.secret import Secret


def det(label: str, n: int = 32) -> bytes:
    return hashlib.shake_256(label.encode()).digest(n)


def main() -> None:
    bootstrap = det("messages bootstrap")
    link = "alice-bob"
    start = ratchet.chain_start(Secret(bootstrap), link)
    auth = Secret(det("messages epoch 4 auth"))
    rotate = protocol.build(
        "rotate",
        link=link,
        sender="alice",
        receiver="bob",
        epoch=5,
        auth_key=auth,
        keys=[["kme", "4b1d2c3e-0000-4000-8000-000000000005"]],
        labels=["wg0", "wg0-audit"],
        nonce=det("messages nonce"),
    )
    refusal = protocol.build_refusal(
        "epoch",
        "expected epoch 8",
        link=link,
        sender="bob",
        receiver="alice",
        epoch=7,
        request=protocol.request_digest(rotate),
        bootstrap_auth=start.auth_key,
    )
    print(
        json.dumps(
            {
                "description": "Peer messages (tests/vectors/README.md): a rotate MAC'd under "
                "an epoch's auth key, and the responder's authenticated refusal of it",
                "bootstrap": bootstrap.hex(),
                "link": link,
                "auth_key": auth.reveal().hex(),
                "rotate": rotate.decode(),
                "bootstrap_auth_key": start.auth_key.reveal().hex(),
                "refusal": refusal.decode(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
