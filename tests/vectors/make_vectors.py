"""Regenerate ratchet.json (only when the key schedule changes on purpose).

python tests/vectors/make_vectors.py > tests/vectors/ratchet.json
"""

from __future__ import annotations

import hashlib
import json

from qkdagent import ratchet
from qkdagent.secret import Secret


def det(label: str, n: int = 32) -> bytes:
    """Deterministic test bytes, so the vectors are reproducible from this script."""
    return hashlib.shake_256(label.encode()).digest(n)


def main() -> None:
    cases = []
    for case, (link, sources, labels) in enumerate(
        [
            ("alice-bob", [("kme", 32)], ["wireguard"]),
            (
                "site-a--site-b",
                [("kme", 32), ("dske", 32), ("pqc", 64)],
                ["wireguard", "ipsec", "file"],
            ),
        ]
    ):
        bootstrap = det(f"case{case} bootstrap")
        start = ratchet.chain_start(Secret(bootstrap), link)
        chain = start.chain_key
        epochs = []
        for epoch in (1, 2, 3):
            inputs = [
                ratchet.SourceInput(
                    name, f"{name}-key-{epoch}", Secret(det(f"{case}{name}{epoch}", size))
                )
                for name, size in sources
            ]
            answers = tuple(
                (name, det(f"{case} answer {name} {epoch}", 48))
                for name, _ in sources
                if name == "pqc"  # an exchange source (DESIGN v2 §3) answers the initiator
            )
            transcript = ratchet.Transcript(
                link,
                "alice",
                "bob",
                epoch,
                tuple((i.source, i.key_id) for i in inputs),
                det(f"{case} nonce i {epoch}"),
                det(f"{case} nonce r {epoch}"),
                labels=tuple(sorted(labels)),
                answers=answers,
            )
            keys = ratchet.rotate(chain, inputs, transcript, labels)
            epochs.append(
                {
                    "epoch": epoch,
                    "sources": [
                        {"source": i.source, "key_id": i.key_id, "key": i.key.reveal().hex()}
                        for i in inputs
                    ],
                    "answers": [{"source": n, "answer": a.hex()} for n, a in answers],
                    "initiator_nonce": transcript.initiator_nonce.hex(),
                    "responder_nonce": transcript.responder_nonce.hex(),
                    "transcript_hash": keys.transcript_hash.hex(),
                    "chain_key": keys.chain_key.reveal().hex(),
                    "auth_key": keys.auth_key.reveal().hex(),
                    "confirm_key": keys.confirm_key.reveal().hex(),
                    "confirm_initiator": ratchet.confirmation(keys, "initiator").hex(),
                    "confirm_responder": ratchet.confirmation(keys, "responder").hex(),
                    "outputs": {k: v.reveal().hex() for k, v in keys.outputs.items()},
                }
            )
            chain = keys.chain_key
        cases.append(
            {
                "link": link,
                "initiator": "alice",
                "responder": "bob",
                "bootstrap": bootstrap.hex(),
                "labels": labels,
                "c0": start.chain_key.reveal().hex(),
                "a0": start.auth_key.reveal().hex(),
                "epochs": epochs,
            }
        )
    print(
        json.dumps(
            {
                "description": "qkdagent key schedule test vectors (transcript v2), see README",
                "cases": cases,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
