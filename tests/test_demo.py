"""`qkdagent demo` in-process: how it reports, how it fails, what it compares."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import trio

from qkdagent import DemoLink, QkdAgentError, RotationEvent, Service, leaf_errors
from qkdagent import demo as demo_module
from qkdagent.builtin import loopback
from qkdagent.demo import _Installed, _report, run_demo


def _event(epoch: int) -> RotationEvent:
    return RotationEvent("peer", epoch, (f"id-{epoch}",), True, 0.001, ("psk",))


async def test_an_epoch_is_compared_once_both_sides_installed_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The responder installs after acknowledging the commit: bob's report may come after
    alice's, and alice's next epoch before bob's report of the last."""
    send, receive = trio.open_memory_channel[Any](10)
    for side, epoch, fingerprint in [
        ("alice", 1, "aa"),
        ("alice", 2, "bb"),
        ("bob", 1, "aa"),  # epoch 1 matches, though bob reported it last
        ("bob", 2, "cc"),  # epoch 2 does not
        ("alice", 3, "dd"),
        ("bob", 3, "dd"),
    ]:
        send.send_nowait(_Installed(side, _event(epoch), fingerprint))
    progress = {"matched": 0}
    await _report(receive, 5, progress)
    lines = capsys.readouterr().out.splitlines()
    assert progress["matched"] == 1
    assert [line.split()[-1] for line in lines] == ["match", "MISMATCH"]
    assert "alice bb" in lines[1] and "bob cc" in lines[1]


async def test_a_side_with_no_file_is_no_match(capsys: pytest.CaptureFixture[str]) -> None:
    send, receive = trio.open_memory_channel[Any](10)
    send.send_nowait(_Installed("bob", _event(1), "-"))
    send.send_nowait(_Installed("alice", _event(1), "-"))
    progress = {"matched": 0}
    await _report(receive, 1, progress)
    assert progress["matched"] == 0 and capsys.readouterr().out.rstrip().endswith("MISMATCH")


def test_a_port_in_use_is_reported_as_a_failed_demo_not_a_bug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        ports = iter([port])  # alice's: the other ports are free
        free_port = loopback.free_port
        monkeypatch.setattr(loopback, "free_port", lambda: next(ports, None) or free_port())
        code = run_demo(rotations=1, interval=0.2, source="memory", directory=str(tmp_path))
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("demo failed: ") and "Address already in use" in err


def test_the_agents_ports_are_chosen_after_the_demo_services_bound_theirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A service binding port 0 may be given a port just chosen (and let go) for an agent."""
    order: list[str] = []

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        order.append("service bound")
        task_status.started()

    link = DemoLink(
        description="a service", service=Service("svc", run), alice_sources={}, bob_sources={}
    )
    monkeypatch.setattr(demo_module, "_demo_links", lambda spec, directory: [(link, "x")])

    def chosen(*args: Any, **kwargs: Any) -> Any:
        order.append("agent ports chosen")
        raise QkdAgentError("stop here")

    monkeypatch.setattr(demo_module, "pair_configs", chosen)
    code = run_demo(rotations=1, interval=0.2, source="x", directory=str(tmp_path))
    assert code == 1 and "demo failed: stop here" in capsys.readouterr().err
    assert order == ["service bound", "agent ports chosen"]


def test_free_ports_come_from_below_the_ephemeral_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server binding port 0 or an outgoing connection takes its port from the ephemeral
    range, so it can never be given a port chosen for an agent and not yet bound."""
    ephemeral = tmp_path / "ip_local_port_range"
    ephemeral.write_text("30000\t60999\n")
    monkeypatch.setattr(loopback, "_EPHEMERAL_RANGE", ephemeral)
    ports = [loopback.free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(30000 - loopback._PORTS_BELOW_EPHEMERAL <= port < 30000 for port in ports)


def test_a_failure_beside_a_bug_is_still_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An exception group holding a port in use and a bug: the port is named, the bug goes
    on (to the CLI's one-line report of a bug)."""

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise ExceptionGroup("both", [OSError(98, "Address already in use"), RuntimeError()])

    link = DemoLink(
        description="a service", service=Service("svc", run), alice_sources={}, bob_sources={}
    )
    monkeypatch.setattr(demo_module, "_demo_links", lambda spec, directory: [(link, "x")])
    with pytest.raises(ExceptionGroup) as raised:
        run_demo(rotations=1, interval=0.2, source="x", directory=str(tmp_path))
    assert [type(e) for e in leaf_errors(raised.value)] == [RuntimeError]
    assert "demo failed: [Errno 98] Address already in use" in capsys.readouterr().err


def test_a_port_in_time_wait_is_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server binding without SO_REUSEADDR could not take it."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as trio's servers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        waiting = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", waiting)) as client:
            accepted, _ = listener.accept()
            accepted.close()  # the server's side closes first: its port goes to TIME_WAIT
            client.recv(1)
    with pytest.raises(OSError), socket.socket() as plain:
        plain.bind(("127.0.0.1", waiting))
    picks = iter([waiting])
    free = loopback.free_port()  # a port that is free, to be picked second
    loopback._handed_out.remove(free)
    monkeypatch.setattr(loopback._random, "randrange", lambda low, high: next(picks, free))
    assert loopback.free_port() == free
