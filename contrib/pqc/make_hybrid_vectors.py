"""Write tests/vectors/hybrid-mlkem768.json and hybrid-mlkem1024.json: the key schedule of a
hybrid link (a QKD key + an ML-KEM shared secret per rotation, config order kme, pqc).

    python contrib/pqc/make_hybrid_vectors.py          # writes both files

Everything except the ciphertexts comes from fixed labels (SHAKE-256), so it is reproducible:
the bootstrap, the QKD keys, the nonces, and every ML-KEM private key, as its 64-byte FIPS 203
seed (d || z): the responder's static key and each ephemeral key it answers. `cryptography`
encapsulates only with its own randomness, so each ciphertext is a fresh encapsulation recorded
in the file; a rerun writes new ciphertexts and so new outputs. Decapsulation is deterministic:
the vectors fix (seed, ciphertext) -> shared secret. The combination is the core's
`qkdagent.ratchet`, as in tests/vectors/make_vectors.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qkdagent_pqc import kem

from qkdagent import ratchet
from qkdagent.secret import Secret

ROOT = Path(__file__).resolve().parents[2]
LINK, INITIATOR, RESPONDER = "site-a--site-b", "alice", "bob"
LABELS = ["tlspsk", "wireguard"]


def det(label: str, n: int = 32) -> bytes:
    return hashlib.shake_256(label.encode()).digest(n)


def case(params: kem.ParameterSet) -> dict[str, object]:
    tag = params.name
    bootstrap = det(f"{tag} bootstrap")
    start = ratchet.chain_start(Secret(bootstrap), LINK)
    static_seed = det(f"{tag} static seed", kem.SEED_SIZE)
    static_public = params.private_key(static_seed).public_key().public_bytes_raw()
    chain, decapsulating = start.chain_key, static_seed
    epochs = []
    for epoch in (1, 2, 3):
        private = params.private_key(decapsulating)
        public = private.public_key().public_bytes_raw()
        secret, key_id = kem.encapsulate(params, public)  # the initiator (random)
        _, ciphertext = kem.parse_key_id(params, key_id)
        assert private.decapsulate(ciphertext) == secret  # the responder
        next_seed = det(f"{tag} ephemeral seed {epoch}", kem.SEED_SIZE)
        next_public = params.private_key(next_seed).public_key().public_bytes_raw()
        qkd = det(f"{tag} qkd key {epoch}")
        inputs = [
            ratchet.SourceInput("kme", f"kme-key-{epoch}", Secret(qkd)),
            ratchet.SourceInput("pqc", key_id, Secret(secret)),
        ]
        transcript = ratchet.Transcript(
            LINK,
            INITIATOR,
            RESPONDER,
            epoch,
            tuple((i.source, i.key_id) for i in inputs),
            det(f"{tag} nonce i {epoch}"),
            det(f"{tag} nonce r {epoch}"),
            labels=tuple(sorted(LABELS)),
            answers=(("pqc", next_public),),
        )
        keys = ratchet.rotate(chain, inputs, transcript, LABELS)
        epochs.append(
            {
                "epoch": epoch,
                "sources": [
                    {"source": i.source, "key_id": i.key_id, "key": i.key.reveal().hex()}
                    for i in inputs
                ],
                "answers": [{"source": "pqc", "answer": next_public.hex()}],
                "mlkem": {
                    "decapsulation_seed": decapsulating.hex(),
                    "public_fingerprint": kem.fingerprint(params, public).hex(),
                    "ciphertext": ciphertext.hex(),
                    "next_seed": next_seed.hex(),
                },
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
        chain, decapsulating = keys.chain_key, next_seed
    return {
        "link": LINK,
        "initiator": INITIATOR,
        "responder": RESPONDER,
        "bootstrap": bootstrap.hex(),
        "labels": LABELS,
        "mlkem": {
            "source": "pqc",
            "parameter_set": params.name,
            "static_seed": static_seed.hex(),
            "static_public": static_public.hex(),
            "static_fingerprint": kem.fingerprint(params, static_public).hex(),
        },
        "c0": start.chain_key.reveal().hex(),
        "a0": start.auth_key.reveal().hex(),
        "epochs": epochs,
    }


def main() -> None:
    for name, params in kem.PARAMETER_SETS.items():
        path = ROOT / "tests" / "vectors" / f"hybrid-{name.lower().replace('-', '')}.json"
        document = {
            "description": (
                f"qkdagent hybrid link test vectors (transcript v2): a QKD key and an {name} "
                "shared secret per rotation, see plugins/qkdagent-pqc/README.md"
            ),
            "cases": [case(params)],
        }
        path.write_text(json.dumps(document, indent=2) + "\n")
        print(path)


if __name__ == "__main__":
    main()
