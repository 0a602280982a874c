"""`qkdagent dske-hub` as real processes: --ready-file, keys served through them, SIGTERM exits
0 with the state durable (a share posted before the stop is delivered after the restart)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import trio
from qkdagent_dske.source import DskeSource

from qkdagent import Link
from qkdagent.testing import (
    PkiFiles,
    assert_not_leaked,
    build_component,
    encrypted_key_copy,
    running,
    write_test_pki,
)

ALICE = Link("l", "alice", "bob", True)
BOB = Link("l", "bob", "alice", False)
HUBS = ("hank", "helen")
START_TIMEOUT = 30.0


class HubProcess:
    def __init__(self, tmp_path: Path, pki: PkiFiles, name: str) -> None:
        self.name, self.pki = name, pki
        self.state = tmp_path / name
        self.ready = tmp_path / f"{name}.ready"
        self.log = tmp_path / f"{name}.log"
        self.port = 0
        self.proc: trio.Process | None = None

    async def start(self) -> None:
        self.ready.unlink(missing_ok=True)
        leaf = self.pki[self.name]
        argv = [
            sys.executable, "-m", "qkdagent", "dske-hub", "--name", self.name,
            "--state", str(self.state), "--port", str(self.port),
            "--cert", str(leaf.cert), "--key", str(leaf.key), "--ca", str(self.pki.ca_cert),
            "--ready-file", str(self.ready),
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self.proc = await trio.lowlevel.open_process(argv, stderr=log)
        with trio.fail_after(START_TIMEOUT):  # bounded: a hub that never gets ready fails
            while not self.ready.exists():
                assert self.proc.poll() is None, self.log.read_text()
                await trio.sleep(0.02)
        text = self.ready.read_text()
        assert re.fullmatch(r"[1-9][0-9]{0,4}\n", text), text  # the port, one line
        port = int(text)
        assert 0 < port < 65536 and self.port in (0, port)
        self.port = port
        await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()  # really listening
        assert f"listening on https://127.0.0.1:{port}/{self.name}" in self.log.read_text()

    async def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(START_TIMEOUT):
            return await self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


def source(tmp_path: Path, pki: PkiFiles, hubs: list[HubProcess], agent: str) -> DskeSource:
    leaf = pki[agent]
    table = {
        h.name: {
            "url": f"https://127.0.0.1:{h.port}/{h.name}",
            "ca": str(pki.ca_cert),
            "cert": str(leaf.cert),
            "key": str(leaf.key),
        }
        for h in hubs
    }
    options = {"hubs": table, "k": 2, "refill_every": 3600, "psrd_block_size": 8192}
    return build_component(
        DskeSource, options, name="dske", agent=agent, state_dir=tmp_path / agent
    )


async def test_hub_processes_serve_keys_and_keep_shares_across_sigterm(tmp_path: Path) -> None:
    pki = write_test_pki(tmp_path / "pki", [*HUBS, "alice", "bob"])
    hubs = [HubProcess(tmp_path, pki, name) for name in HUBS]
    try:
        for hub in hubs:
            await hub.start()
        alice = source(tmp_path, pki, hubs, "alice")
        bob = source(tmp_path, pki, hubs, "bob")
        async with running(alice, bob):
            first = await alice.new_key(ALICE)
            assert (await bob.key_by_id(BOB, first.key_id)).value == first.value
            second = await alice.new_key(ALICE)  # its shares wait in the hubs ...
            assert [await hub.stop() for hub in hubs] == [0, 0]  # ... across a clean stop
            for hub in hubs:
                await hub.start()  # same state, same port
            assert (await bob.key_by_id(BOB, second.key_id)).value == second.value
            assert second.value != first.value
        assert [await hub.stop() for hub in hubs] == [0, 0]
    finally:
        for hub in hubs:
            hub.kill()
    for hub in hubs:
        log = hub.log.read_text()
        assert "client alice registered" in log and "client bob registered" in log
        assert f"of key {second.key_id} from alice for bob stored" in log
        assert f"of key {second.key_id} delivered to bob" in log
        assert log.count("stopping") == 2
        assert_not_leaked(log, [first.value, second.value])


def test_a_hub_with_an_encrypted_key_exits_2_naming_it(tmp_path: Path) -> None:
    """No passphrase prompt (the process would wait on its terminal): exit 2 and one line."""
    pki = write_test_pki(tmp_path / "pki", ["hank"])
    encrypted = encrypted_key_copy(pki["hank"].key, tmp_path / "encrypted.key")
    argv = [
        sys.executable, "-m", "qkdagent", "dske-hub", "--name", "hank",
        "--state", str(tmp_path / "hank"), "--port", "0", "--cert", str(pki["hank"].cert),
        "--key", str(encrypted), "--ca", str(pki.ca_cert),
    ]  # fmt: skip
    done = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2, done.stderr
    assert "encrypted.key is encrypted" in done.stderr
    assert "Traceback" not in done.stderr and "PEM pass phrase" not in done.stderr
    assert not (tmp_path / "hank").exists()  # refused before any state was made
