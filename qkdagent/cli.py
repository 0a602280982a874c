"""The `qkdagent` command line: run, check, status, plugins, demo, gen-bootstrap, plugin commands.

Signals are handled here, not in the agent: the agent only takes a shutdown trigger, so tests
never send real signals to the test process.
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import logging
import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from . import __version__
from .commands import CommandRegistry
from .config import load_config
from .errors import ConfigError, PluginError, QkdAgentError, leaf_errors, raised_at
from .fileutil import FileCheckError, write_secret_file
from .heap import settle_heap
from .logsetup import escape_control, setup_logging
from .plugins import COMMAND_GROUP, DEMO_GROUP, Plugins, describe_installed, installed
from .text import decimal

log = logging.getLogger("qkdagent")

BUILTIN_COMMANDS = ("run", "check", "status", "plugins", "demo", "gen-bootstrap")
EXIT_INVALID = 2
"""Exit status of a usage or config error (argparse's too); 1 is a failure at run time."""
MAX_STATUS_BYTES = 64 << 20


def _fail(message: str, code: int = EXIT_INVALID) -> int:
    """Print one line (control characters escaped: the text may quote input) and return code."""
    print(f"qkdagent: {escape_control(message)}", file=sys.stderr)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkdagent",
        description="Keeps VPN gateways and TLS services supplied with quantum-derived PSKs.",
    )
    parser.add_argument("--version", action="version", version=f"qkdagent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the agent")
    run.add_argument("-c", "--config", required=True, help="config file (TOML)")
    run.add_argument("--log-format", choices=("text", "json"), help="overrides [agent] log_format")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    check = sub.add_parser("check", help="validate a config file and its plugins' options")
    check.add_argument("-c", "--config", required=True)

    status = sub.add_parser("status", help="show the links of a running agent")
    where = status.add_mutually_exclusive_group(required=True)
    where.add_argument("-c", "--config", help="find the status endpoint in this config")
    where.add_argument("--url", help="status endpoint, e.g. http://127.0.0.1:7448")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    plugins = sub.add_parser("plugins", help="list installed plugins (without importing them)")
    plugins.add_argument("--json", action="store_true")

    demo = sub.add_parser("demo", help="two agents on loopback rotating keys, end to end")
    demo.add_argument("--rotations", type=_positive_int, default=5)
    demo.add_argument("--interval", type=_positive_float, default=1.0, help="seconds")
    demo.add_argument(
        "--source",
        default="auto",
        help="'memory' (simulated link), a plugin with a demo (e.g. etsi014), several for a "
        "hybrid link (etsi014,pqc), or 'auto'",
    )
    demo.add_argument("--dir", help="keep the demo's files here instead of a temp dir")

    gen = sub.add_parser("gen-bootstrap", help="write a new 32-byte link bootstrap secret")
    gen.add_argument("file", help="where to write it (base64, mode 0600)")
    gen.add_argument("--force", action="store_true", help="overwrite an existing file")

    for name, ep in sorted(installed(COMMAND_GROUP).items()):
        if name not in BUILTIN_COMMANDS:
            dist = ep.dist.name if ep.dist else "a plugin"
            sub.add_parser(name, help=f"(from {dist}) see `qkdagent {name} --help`", add_help=False)
    return parser


_DECIMAL = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?")
"""A flag's number as typed: ASCII digits, an optional fraction. `int` and `float` also take
spaces around it, `_` between digits, other scripts' digits, `1e3`, `nan` and `inf`."""


def _positive_int(text: str) -> int:
    value = decimal(text, 9)
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer of at most 9 digits")
    return value


def _positive_float(text: str) -> float:
    if not _DECIMAL.fullmatch(text) or not float(text) > 0:
        raise argparse.ArgumentTypeError("must be a positive number, such as 2 or 0.5")
    return float(text)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in BUILTIN_COMMANDS and not argv[0].startswith("-"):
        if argv[0] in installed(COMMAND_GROUP):
            return _plugin_command(argv[0], argv[1:])
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return EXIT_INVALID
    handler = {
        "run": cmd_run,
        "check": cmd_check,
        "status": cmd_status,
        "plugins": cmd_plugins,
        "demo": cmd_demo,
        "gen-bootstrap": cmd_gen_bootstrap,
    }[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: one line, by type and place (QKDAGENT_DEBUG=1 shows all)
        if os.environ.get("QKDAGENT_DEBUG"):
            raise
        where = raised_at(exc)
        return _fail(
            f"unexpected {type(exc).__name__}{where} (a bug; QKDAGENT_DEBUG=1 shows the stack)", 1
        )


def _plugin_command(name: str, argv: list[str]) -> int:
    setup_logging("text")
    plugins = Plugins()
    registry = CommandRegistry()
    try:
        plugins.load([name], group=COMMAND_GROUP)
        plugins.hooks.add_commands(registry)
    except PluginError as exc:
        return _fail(str(exc), 1)
    command = registry.commands.get(name)
    if command is None:
        return _fail(f"the plugin declaring {name!r} did not add it", 1)
    parser = argparse.ArgumentParser(prog=f"qkdagent {name}", description=command.help)
    command.configure(parser)
    return command.run(parser.parse_args(argv))


# -- run ----------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """Exit 2 for what the config or this host's setup refuses (`check` names the same key,
    the ports aside), 1 for a failure while running, 0 after a clean shutdown."""
    from .agent import Agent
    from .validate import check_components, check_config, check_listeners

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _fail(f"invalid config: {exc}")
    setup_logging(args.log_format or config.agent.log_format, debug=args.verbose)
    try:
        check_config(config)
        check_listeners(config)
        agent = Agent(config)
        check_components(config, agent.components)
    except ConfigError as exc:
        log.error("invalid config: %s", exc)
        return EXIT_INVALID
    except PluginError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_INVALID
    code = 0
    try:
        trio.run(_run_with_signals, agent, args.config)
    except* (QkdAgentError, OSError) as group:  # arrives grouped from the agent's nurseries
        for leaf in leaf_errors(group):
            log.error("agent stopped: %s", _stopped_text(leaf))
            code = max(code, EXIT_INVALID if _is_setup_error(leaf) else 1)
    except* Exception as group:
        for leaf in leaf_errors(group):
            _log_bug("agent stopped", leaf)
        code = max(code, 1)
    return code


def _is_setup_error(exc: BaseException) -> bool:
    """Errors an operator fixes in the config or on the host: exit 2, like `check`."""
    if isinstance(exc, (ConfigError, FileCheckError)):
        return True
    return isinstance(exc, OSError) and exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL)


def _stopped_text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
        from .validate import bind_error_text

        return f"agent.listen or agent.status_listen: {bind_error_text('the address', exc)}"
    return str(exc)


def _log_bug(what: str, exc: BaseException) -> None:
    """An exception that is not qkdagent's own (a bug here or in a plugin): named by type and
    place only, since its message might quote a key. The frames are at debug level."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    log.error("%s: unexpected %s%s (a bug; -v shows the call stack)", what,
              type(exc).__name__, where)  # fmt: skip
    for line in "".join(frames.format()).splitlines():  # one record per line: logs escape \n
        log.debug("call stack of that %s: %s", type(exc).__name__, line)


async def _run_with_signals(agent: Any, config_path: str) -> None:
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        await _reload(agent, config_path)
                    elif not stop.is_set():
                        log.info("received %s: shutting down", signal.Signals(signum).name)
                        stop.set()
                    else:
                        log.warning("second signal: stopping now")
                        nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            ready = _Ready()
            nursery.start_soon(_settle_when_ready, ready)
            await agent.run(shutdown_trigger=stop.wait, task_status=ready)
            nursery.cancel_scope.cancel()


async def _reload(agent: Any, config_path: str) -> None:
    log.info("SIGHUP: reloading %s", config_path)
    try:
        new = load_config(config_path)
        await agent.reload(new)
    except QkdAgentError as exc:
        log.error("config reload refused, keeping the running config: %s", exc)
    except Exception as exc:  # a plugin bug must not stop a running agent
        _log_bug("config reload failed", exc)
    _settle_heap("reload", thaw=True)  # the links and components it replaced are collected


class _Ready:
    """The agent's task status: set once every link is open (a shutdown during start-up
    never sets it)."""

    def __init__(self) -> None:
        self.event = trio.Event()

    def started(self, value: object = None) -> None:
        self.event.set()


async def _settle_when_ready(ready: _Ready) -> None:
    await ready.event.wait()
    _settle_heap("start-up")


def _settle_heap(when: str, *, thaw: bool = False) -> None:
    """`heap.settle_heap` in the agent's own process (see there why)."""
    started = time.perf_counter()
    frozen = settle_heap(thaw=thaw)
    log.info(
        "heap settled after %s: %d objects left out of garbage collection (%.0f ms)",
        when,
        frozen,
        1000 * (time.perf_counter() - started),
    )


# -- check ---------------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    """Everything `run` checks before it starts, without the peer, the ports or any change."""
    setup_logging("text")
    from .lifecycle import load_components
    from .validate import check_components, check_config

    try:
        config = load_config(args.config)
        check_config(config)
        _, _, components = load_components(config)
        check_components(config, components)
    except (ConfigError, PluginError) as exc:
        return _fail(f"invalid config: {exc}")
    from .foreignlink import insecure_warning

    roles = ", ".join(
        f"{name} ({'initiator' if link.initiator else 'responder'}"
        f"{'' if link.native else ', protocol ' + link.protocol})"
        for name, link in config.links.items()
    )
    print(f"{args.config}: OK: agent {config.agent.name}, links: {roles or 'none'}")
    for link in config.links.values():
        if link.insecure:
            print(f"WARNING: {insecure_warning(link)}")
    return 0


# -- status --------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    url = args.url
    if url is None:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            return _fail(f"invalid config: {exc}")
        if config.agent.status_listen is None:
            return _fail("[agent] status_listen is not set in that config")
        address = config.agent.status_listen
        host = "127.0.0.1" if address.host in ("0.0.0.0", "") else address.host
        host = "::1" if host == "::" else host
        url = f"http://{f'[{host}]' if ':' in host else host}:{address.port}"
    problem = _url_problem(url)
    if problem:
        return _fail(f"invalid --url {url!r}: {problem}")
    try:
        data = json.loads(_get_bounded(url.rstrip("/") + "/status", MAX_STATUS_BYTES))
    except httpx.InvalidURL as exc:
        return _fail(f"invalid --url {url!r}: {exc}")
    except (httpx.HTTPError, ValueError, RecursionError) as exc:
        detail = "nested too deeply" if isinstance(exc, RecursionError) else exc
        return _fail(f"cannot read status from {url}: {detail}", 1)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    try:
        print(format_status(data))
    except (KeyError, TypeError, ValueError, AttributeError):
        return _fail(f"{url} did not answer with a qkdagent status (try --json)", 1)
    return 0


def _url_problem(url: str) -> str | None:
    """Why `url` cannot be a status endpoint (http(s)://HOST[:PORT]), or None."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be http://HOST[:PORT]"
    if port == 0 or not url.isprintable() or " " in url:
        return "must be http://HOST[:PORT] with a port of 1-65535"
    return None


def _get_bounded(url: str, limit: int) -> bytes:
    """GET `url`, refusing an error status or a body over `limit` bytes (read as it streams)."""
    with httpx.stream("GET", url, timeout=5) as response:
        response.raise_for_status()
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > limit:
                raise ValueError(f"the answer is larger than {limit >> 20} MiB")
    return bytes(body)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def format_status(data: dict[str, Any]) -> str:
    now = data.get("time", time.time())
    header = ("LINK", "PEER", "ROLE", "EPOCH", "LAST OK", "KEY AGE", "NEXT", "STATE / LAST ERROR")
    rows: list[tuple[str, ...]] = [header]
    for link in data.get("links", []):
        last = link.get("last_success")
        nxt = link.get("next_rotation")
        state = "ok"
        if link.get("erased"):
            state = f"ERASED ({link['erased']})"
        if link.get("erase_failed"):  # the old key may still be installed: say so first
            state = f"ERASE FAILED, retrying ({', '.join(map(str, link['erase_failed']))})"
        if link.get("last_error"):
            state += f"; {link['last_error']}"
        cells = (
            link["link"],
            link["peer"],
            link["role"],
            str(link["epoch"]),
            "-" if last is None else time.strftime("%H:%M:%S", time.localtime(last)),
            _age(link.get("key_age")),
            "-" if nxt is None else "in " + _age(nxt - now),
            state,
        )
        # the peer's error text and names come from elsewhere: no terminal escapes, one line
        rows.append(tuple(escape_control(str(cell))[:80] for cell in cells))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    agent = escape_control(f"agent {data.get('agent')} (qkdagent {data.get('version')})")
    lines = [agent]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


# -- plugins -------------------------------------------------------------------------------------


def cmd_plugins(args: argparse.Namespace) -> int:
    try:
        infos = describe_installed()
        commands = installed(COMMAND_GROUP)
        demos = installed(DEMO_GROUP)
    except PluginError as exc:
        return _fail(str(exc), 1)
    rows = []
    for info in infos:
        extra = [f"command {c}" for c, ep in commands.items() if ep.value == info.module]
        if info.name in demos:
            extra.append("demo")
        rows.append({**info.__dict__, "provides": extra})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("installed plugins (load them with [agent] plugins = [...]; file and exec always load):")
    for row in rows:
        provides = f"  [{', '.join(row['provides'])}]" if row["provides"] else ""
        print(f"  {row['name']:<12} {row['distribution']} {row['version']}{provides}")
    return 0


# -- gen-bootstrap -------------------------------------------------------------------------------


def cmd_gen_bootstrap(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if path.exists() and not args.force:
        return _fail(f"{path} exists; use --force to replace it", 1)
    if path.is_dir():
        return _fail(f"cannot write {path}: it is a directory")
    try:
        write_secret_file(path, base64.b64encode(os.urandom(32)) + b"\n")
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        return _fail(f"cannot write {path}: {getattr(exc, 'strerror', None) or exc}")
    print(f"wrote a new bootstrap secret to {path} (mode 0600); copy it to the peer out of band")
    return 0


# -- demo ----------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    setup_logging("text", level=logging.WARNING)
    return run_demo(
        rotations=args.rotations, interval=args.interval, source=args.source, directory=args.dir
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
