"""The migration with real processes, real sockets and the real 014 source over plain HTTP:

1. alice runs qkdagent (protocol "qupskd"), bob runs quPSKd (tests/qupskd_peer.py as a process):
   their PSK files are byte-for-byte the same after every rotation;
2. bob is upgraded to qkdagent, still speaking quPSKd's protocol: the chain carries on;
3. both switch to the native protocol by SIGHUP: a fresh native chain, same files again.

A standalone fake KME (quPSKd's simulator behaviour) serves both sides throughout. Timers are
shortened (2/3/30 s) so the whole story takes seconds.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qkdagent.testing import AgentProcess, config_toml, free_port, pair_configs, wait_until

PEER = Path(__file__).with_name("qupskd_peer.py")
LINK = "alice-bob"
WAITS = {"initiator_wait": 2, "responder_wait": 3, "max_wait": 30}


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes] | AgentProcess]]:
    running: list[subprocess.Popen[bytes] | AgentProcess] = []
    yield running
    for proc in running:
        if isinstance(proc, AgentProcess):
            proc.stop()
        elif proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def python(args: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "ab"),
        env={**os.environ, **env},
    )


def link_status(proc: AgentProcess) -> dict[str, Any]:
    """The link's /status entry ({} while the agent does not answer or is reloading)."""
    links = (proc.status() or {}).get("links") or [{}]
    return dict(links[0])


def files_agree(a: Path, b: Path) -> bool:
    try:
        left, right = a.read_bytes(), b.read_bytes()
    except FileNotFoundError:
        return False
    return left == right and len(left) == 44


def test_qupskd_then_qkdagent_both_sides_then_native_by_sighup(
    tmp_path: Path, procs: list[Any]
) -> None:
    ports = {"kme": free_port(), "alice": free_port(), "bob": free_port()}
    kme = f"http://127.0.0.1:{ports['kme']}"
    procs.append(python([str(PEER), "--kme", f"127.0.0.1:{ports['kme']}"], tmp_path / "kme.log"))
    psk = tmp_path / "qupskd.psk"
    psk.write_text("thisisverysecret")
    psk.chmod(0o600)

    def side(name: str, peer: str) -> dict[str, Any]:
        return {
            "plugins": ["qupskd", "etsi014"],
            "sources": {
                "kme": {
                    "type": "etsi014",
                    "kme_url": kme,
                    "insecure_http": True,
                    "peer_sae_ids": {peer: f"sae_{peer}"},
                    "dec_method": "get",
                    "retries": 0,
                }
            },
            "sinks": {"psk": {"type": "file", "path": str(tmp_path / f"{name}.psk")}},
        }

    compat = {"protocol": "qupskd", "insecure": True, "interval": 2, "reject_after": 30}
    configs = pair_configs(
        tmp_path / "agents", alice=side("alice", "bob"), bob=side("bob", "alice"), link=compat
    )
    for name, peer in (("alice", "bob"), ("bob", "alice")):
        configs[name]["links"][LINK].update(
            listen=f"127.0.0.1:{ports[name]}",
            peer_url=f"http://127.0.0.1:{ports[peer]}",
            psk={"file": str(psk)},
            **WAITS,
        )
    paths = {name: tmp_path / f"{name}.toml" for name in configs}
    for name, config in configs.items():
        paths[name].write_text(config_toml(config))

    # 1. alice: qkdagent; bob: quPSKd
    bob_qupskd = tmp_path / "qupskd_bob.toml"
    bob_qupskd.write_text(
        f'qupskd_bind = "127.0.0.1"\nqupskd_port = {ports["bob"]}\n'
        f'etsi_url = "{kme}"\nremote_qupskd_url = "http://127.0.0.1:{ports["alice"]}"\n'
        'key_folder = "psk/bob"\nalias = "alice"\npsk = "thisisverysecret"\n'
        'source_KME_ID = "hsn_bob"\ntarget_KME_ID = "hsn_alice"\n'
        'master_SAE_ID = "sae_bob"\nremote_SAE_ID = "sae_alice"\n'
    )
    quPSKd = subprocess.Popen(
        [sys.executable, str(PEER), str(bob_qupskd)],
        cwd=tmp_path,  # quPSKd resolves key_folder against its working directory
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "qupskd.log", "ab"),
        env={**os.environ, "QUPSKD_TEST_WAITS": "2,3,30", "QUPSKD_TEST_TICK": "0.2"},
    )
    procs.append(quPSKd)
    alice = AgentProcess(paths["alice"], tmp_path / "alice.log")
    procs.append(alice)
    qupskd_file = tmp_path / "psk" / "bob" / "alice.key"
    alice_file = tmp_path / "alice.psk"
    seen: set[bytes] = set()

    def rotated_and_agree() -> bool:
        if files_agree(alice_file, qupskd_file):
            seen.add(alice_file.read_bytes())
        return len(seen) >= 3

    wait_until(rotated_and_agree, 30, "3 identical PSK files from qkdagent and quPSKd")
    assert all(len(base64.b64decode(psk, validate=True)) == 32 for psk in seen)
    assert (alice_file.stat().st_mode & 0o777) == 0o600
    status = alice.status()
    assert status is not None
    link = status["links"][0]
    assert link["protocol"] == "qupskd" and link["insecure"] is True

    # 2. bob upgraded: qkdagent in compat mode on quPSKd's port, continuing nothing but the
    #    quPSKd peer's /new resync (bob starts without state)
    quPSKd.kill()
    quPSKd.wait(timeout=10)
    bob = AgentProcess(paths["bob"], tmp_path / "bob.log")
    procs.append(bob)
    bob_file = tmp_path / "bob.psk"
    seen.clear()

    def agents_agree() -> bool:
        if files_agree(alice_file, bob_file):
            seen.add(alice_file.read_bytes())
        return len(seen) >= 3

    wait_until(agents_agree, 30, "3 identical PSK files from two qkdagents over qupskd")

    # 3. both to the native protocol together, by SIGHUP
    native = pair_configs(tmp_path / "native", alice={}, bob={})
    for name in ("alice", "bob"):
        config = configs[name]
        peer = "bob" if name == "alice" else "alice"
        config["links"][LINK] = {
            "peer": peer,
            "peer_url": f"https://{configs[peer]['agent']['listen']}",
            "bootstrap": native["alice"]["links"][LINK]["bootstrap"],
            "sources": ["kme"],
            "sinks": ["psk"],
            "interval": 2,
            "reject_after": 30,
        }
        paths[name].write_text(config_toml(config))
    before = {alice_file.read_bytes(), bob_file.read_bytes()}
    for proc in (alice, bob):
        proc.proc.send_signal(signal.SIGHUP)

    def native_and_agree() -> bool:
        links = [link_status(p) for p in (alice, bob)]
        return (
            all(x.get("protocol") == "native" and x.get("epoch", 0) >= 2 for x in links)
            and files_agree(alice_file, bob_file)
            and alice_file.read_bytes() not in before
        )

    wait_until(native_and_agree, 40, "both agents on the native protocol with the same PSK")
    for proc in (alice, bob):
        assert link_status(proc).get("insecure") is not True
