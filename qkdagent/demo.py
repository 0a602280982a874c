"""`qkdagent demo`: alice and bob in one process, rotating through a key source into file sinks.

It exercises the real path (mTLS peer protocol, ratchet, state, file sinks) and prints, per
rotation, the epoch, the key IDs and a short fingerprint of each side's installed secret, read
back from its file, never the secret itself.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from .builtin.file_sink import decode
from .builtin.loopback import pair_configs
from .commands import DemoLink
from .config import parse_config
from .errors import QkdAgentError, leaf_errors
from .hookspecs import hookimpl
from .plugins import DEMO_GROUP, Plugins, installed
from .secret import Secret


class _Observer:
    """Reports one side's rotations, each with a fingerprint of the file that side just
    installed. Read here, in the hook (called right after this side's install, under the
    link's lock; a 44-byte file, in the demo only), so a later epoch cannot have replaced it:
    the responder installs after acknowledging the commit, so alice's event alone says
    nothing about bob's file."""

    def __init__(self, send: trio.MemorySendChannel[Any], side: str, path: Path) -> None:
        self.send = send
        self.side = side
        self.path = path

    @hookimpl
    def qkdagent_after_rotation(self, event: Any) -> None:
        self.send.send_nowait(_Installed(self.side, event, _fingerprint(self.path)))


@dataclass(frozen=True)
class _Installed:
    side: str
    event: Any
    fingerprint: str


PREFERRED_DEMO = "etsi014"


def _demo_links(spec: str, directory: Path) -> list[tuple[DemoLink, str]]:
    """The demo links of `spec`: "memory" (none), "auto", or plugin names separated by commas
    (`etsi014,pqc`: a hybrid link, every source's key mixed in, in that order)."""
    if spec == "memory":
        return []
    demos = installed(DEMO_GROUP)
    if spec == "auto":
        if not demos:
            return []
        # ETSI 014 is what the quick start installs and what most deployments run
        spec = PREFERRED_DEMO if PREFERRED_DEMO in demos else sorted(demos)[0]
    names = spec.split(",")
    if len(set(names)) != len(names) or "memory" in names or "auto" in names:
        raise QkdAgentError(f"--source {spec!r}: name each demo source once, or use memory/auto")
    links: list[tuple[DemoLink, str]] = []
    for source in names:
        if source not in demos:
            raise QkdAgentError(f"no installed plugin offers a demo source named {source!r}")
        plugins = Plugins()
        plugins.load([source], group=DEMO_GROUP)
        # several: each its own directory (two plugins may both write, say, a pki/)
        link = plugins.hooks.demo_link(directory / source if len(names) > 1 else directory)
        if link is None:
            raise QkdAgentError(f"plugin {source!r} offered no demo link")
        links.append((link, source))
    taken: set[str] = set()
    for link, source in links:
        clash = taken & (set(link.alice_sources) | set(link.bob_sources))
        if clash:
            raise QkdAgentError(f"demo sources clash: {source!r} reuses the source id {clash}")
        taken |= set(link.alice_sources) | set(link.bob_sources)
    return links


def run_demo(*, rotations: int, interval: float, source: str, directory: str | None) -> int:
    code = 1
    try:
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
            code = trio.run(_demo, rotations, interval, source, Path(directory))
        else:
            with tempfile.TemporaryDirectory(prefix="qkdagent-demo-") as tmp:
                code = trio.run(_demo, rotations, interval, source, Path(tmp))
    except* (QkdAgentError, OSError) as group:  # an agent's start-up error arrives grouped
        # printed here: anything else in the group goes on to the CLI's report of a bug
        for failure in leaf_errors(group):
            print(f"demo failed: {failure}", file=sys.stderr)
    return code


async def _demo(rotations: int, interval: float, source: str, directory: Path) -> int:
    from .agent import Agent

    demo_links = _demo_links(source, directory)
    for name in ("alice", "bob"):
        (directory / name).mkdir(parents=True, exist_ok=True)
    what = (
        " + ".join(link.description for link, _ in demo_links)
        if demo_links
        else "a simulated QKD link (in-memory key pool)"
    )
    print(f"qkdagent demo: alice <-> bob over mutual TLS on loopback, keys from {what}")
    print(f"files: {_psk_file(directory, 'alice')} and {_psk_file(directory, 'bob')}")
    send, receive = trio.open_memory_channel[Any](1000)
    progress = {"matched": 0}
    stops = {n: trio.Event() for n in ("bob", "alice")}
    async with trio.open_nursery() as services:
        for link, _ in demo_links:
            await services.start(link.service.run)
        # The agents' ports are chosen only now: a service binding port 0 could otherwise be
        # given a port chosen (and let go) for an agent, which then finds it in use.
        configs = _pair_configs(directory, demo_links, interval)
        async with trio.open_nursery() as agents:
            for name in ("bob", "alice"):
                plugins = Plugins()
                observer = _Observer(send, name, _psk_file(directory, name))
                plugins.add("demo-observer", observer, "qkdagent")
                agent = Agent(parse_config(configs[name]), plugins=plugins)
                await agents.start(partial(agent.run, shutdown_trigger=stops[name].wait))
            with trio.move_on_after(max(30.0, interval * rotations * 3 + 20)):
                await _report(receive, rotations, progress)
            for stop in stops.values():
                stop.set()
        services.cancel_scope.cancel()
    matched = progress["matched"]
    if matched >= rotations:
        print(f"{matched} rotations, secrets identical on both sides every time.")
        return 0
    print(f"demo stopped after {matched} matching rotations", file=sys.stderr)
    return 1


def _psk_file(directory: Path, name: str) -> Path:
    """The file `name`'s sink writes the link's PSK to (named after the peer)."""
    return directory / name / ("bob.key" if name == "alice" else "alice.key")


def _pair_configs(
    directory: Path, demo_links: list[tuple[DemoLink, str]], interval: float
) -> dict[str, dict[str, Any]]:
    """Both agents' configs: the demo links' sources (complete once their services started),
    a file sink each, the demo's interval."""
    sides: dict[str, dict[str, Any]] = {}
    for name in ("alice", "bob"):
        side: dict[str, Any] = {
            "sinks": {"psk": {"type": "file", "path": str(_psk_file(directory, name))}}
        }
        if demo_links:
            side["sources"] = {
                sid: table
                for link, _ in demo_links
                for sid, table in (
                    link.alice_sources if name == "alice" else link.bob_sources
                ).items()
            }
            side["plugins"] = [plugin for _, plugin in demo_links]
        sides[name] = side
    reject_after = max(3 * interval, interval + 5)
    return pair_configs(
        directory,
        alice=sides["alice"],
        bob=sides["bob"],
        link={"interval": interval, "jitter": 0, "reject_after": reject_after},
    )


async def _report(
    receive: trio.MemoryReceiveChannel[Any], rotations: int, progress: dict[str, int]
) -> None:
    """Print one line per epoch once both sides installed it; `progress` survives a timeout
    that cancels this."""
    waiting: dict[int, _Installed] = {}
    async for report in receive:
        epoch = report.event.epoch
        other = waiting.pop(epoch, None)
        if other is None or other.side == report.side:
            waiting[epoch] = report
            continue
        alice, bob = (report, other) if report.side == "alice" else (other, report)
        same = alice.fingerprint == bob.fingerprint != "-"
        ids = ",".join(k[:13] + "…" if len(k) > 14 else k for k in alice.event.key_ids)
        print(
            f"epoch {epoch:>4}  key IDs {ids:<16}  alice {alice.fingerprint}  "
            f"bob {bob.fingerprint}  {'match' if same else 'MISMATCH'}",
            flush=True,
        )
        if not same:
            break
        progress["matched"] += 1
        if progress["matched"] >= rotations:
            break


def _fingerprint(path: Path) -> str:
    try:
        held = decode(path.read_bytes(), "base64")
    except OSError:
        return "-"
    return "-" if held is None else Secret(held).fingerprint()
