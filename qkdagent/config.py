"""The agent's TOML config file: parsed and validated up front, every error located.

Plugin options are validated by the plugin classes themselves (through `Options`) once the
plugins named in `[agent] plugins` are loaded; see `components.py`.
"""

from __future__ import annotations

import logging
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError
from .fileutil import FileCheckError, read_regular_file
from .options import Options
from .scheduler import Timing
from .secret import Secret
from .state import USED_KEY_ID_RETENTION

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
BUILTIN_PLUGINS = ("file", "exec")
ROLES = ("initiator", "responder", "auto")
NATIVE = "native"
"""The link protocol of DESIGN §4; another `protocol` is a plugin's (`LinkProtocol`)."""
MIN_USED_KEY_IDS_KEPT = 1000
"""The fewest used key IDs a link may be set to remember (`used_key_ids_kept`): 1.4 days of
rotations at the default interval, with one source."""
MAX_CONFIG_BYTES = 16 << 20
MAX_DOTTED_PARTS = 64
"""Most parts a dotted key or table header may have (real configs use 3). tomllib's time grows
about tenfold each time a key's parts double (6,000 parts: seconds; 200 KB of them: minutes),
so such keys are refused before parsing."""
MAX_DEPTH = 32
"""Deepest nesting of tables and lists accepted (real configs use 4); deeper is refused up
front, so no later walk over the data (a plugin's, a reload's comparison) can recurse away."""


def _check_name(value: str) -> str | None:
    if not NAME_RE.fullmatch(value):
        return "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
    return None


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(opts: Options, name: str, default: Any = None) -> Address | None:
    text = opts.string(name, default)
    if text is None:
        return None
    match = re.match(
        r"^(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d{1,5})$", text
    )
    if not match:
        opts.fail(name, f"must be HOST:PORT (IPv6 as [ADDR]:PORT), not {text!r}")
    if not 1 <= int(match["port"]) <= 65535:
        opts.fail(name, f"port must be 1-65535, not {match['port']}")
    return Address(match["v6"] or match["host"], int(match["port"]))


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class AgentSettings:
    name: str
    listen: Address
    tls: TlsFiles | None
    """None only when no link uses the native protocol: the agent then serves no peer API."""
    state_dir: Path
    status_listen: Address | None
    plugins: tuple[str, ...]
    drain_timeout: float
    rotation_timeout: float
    max_parallel_rotations: int
    log_format: str
    max_connections: int = 512
    """Peer API connections held at once (see `peerserver.ServerLimits`)."""
    max_connections_per_address: int = 128
    """Peer API connections from one address; above a peer's `max_parallel_rotations`."""
    handshake_timeout: float = 5.0
    request_timeout: float = 10.0
    used_key_ids_kept: int = USED_KEY_ID_RETENTION
    """Used key IDs each link remembers, at least (refused if a source hands one out again)."""


@dataclass(frozen=True)
class LinkConfig:
    name: str
    peer: str
    peer_url: str
    role: str
    initiator: bool
    peer_identity: str
    """The name the peer's certificate must carry (SAN DNS/URI, else CN); "" for a link of
    another protocol, which never admits anyone to the peer API."""
    bootstrap: Secret | None
    """None only for a link of another protocol (it has no qkdagent chain)."""
    timing: Timing
    sources: tuple[str, ...]
    sinks: tuple[str, ...]
    protocol: str = NATIVE
    insecure: bool = False
    """The operator accepted a link protocol that does not authenticate its peer."""
    protocol_options: Options | None = field(default=None, compare=False, repr=False)
    """The rest of the link's table, for the protocol class to validate (another protocol)."""
    protocol_snapshot: object = None
    """What identifies `protocol_options` (a reload restarts the link when it changes)."""

    @property
    def native(self) -> bool:
        return self.protocol == NATIVE


@dataclass(frozen=True)
class ComponentConfig:
    """A `[sources.<id>]` or `[sinks.<id>]` table; `options` go to the plugin class."""

    kind: str
    id: str
    type: str
    label: str
    timeout: float
    options: Options
    local_only: bool = False
    """A sink that exists on this side only: its label is not compared with the peer's."""


@dataclass
class AgentConfig:
    file: Path | None
    agent: AgentSettings
    links: dict[str, LinkConfig] = field(default_factory=dict)
    sources: dict[str, ComponentConfig] = field(default_factory=dict)
    sinks: dict[str, ComponentConfig] = field(default_factory=dict)


def load_config(path: str | Path) -> AgentConfig:
    path = Path(path)
    try:
        text, _ = read_regular_file(path, limit=MAX_CONFIG_BYTES, what="config file")
    except FileCheckError as exc:
        raise ConfigError("(file)", str(exc), file=str(path)) from None
    _check_dotted_keys(text, str(path))
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("(syntax)", f"not valid TOML: {exc}", file=str(path)) from None
    except ValueError:  # an integer of more than 4,300 digits (int's conversion limit)
        raise ConfigError("(syntax)", "a number is too long", file=str(path)) from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise ConfigError("(syntax)", "nested too deeply", file=str(path)) from None
    return parse_config(data, file=path)


def parse_config(data: dict[str, Any], *, file: Path | None = None) -> AgentConfig:
    """The validated config for parsed TOML `data`; any input gives it or a ConfigError."""
    fname = str(file) if file else None
    base = file.parent if file else Path.cwd()
    _check_depth(data, fname)

    def warn(message: str) -> None:
        log.warning("config warning: %s", message)

    root = Options(data, where="", file=fname, base_dir=base, warn=warn)
    agent = _agent(root.sub("agent"))
    sources = _components(root.sub("sources", {}), "sources")
    sinks = _components(root.sub("sinks", {}), "sinks")
    links_opts = root.sub("links", {})
    links: dict[str, LinkConfig] = {}
    for name in links_opts.names():
        _check_section_name(links_opts, name)
        links[name] = _link(links_opts.sub(name), name, agent, sources, sinks)
    links_opts.finish()
    native = [name for name, link in links.items() if link.native]
    if agent.tls is None and native:
        raise ConfigError(
            "agent.tls",
            f"is required: link {native[0]!r} uses qkdagent's own protocol (mutual TLS)",
            file=fname,
        )
    root.finish()
    return AgentConfig(file, agent, links, sources, sinks)


def _check_dotted_keys(text: bytes, file: str) -> None:
    """Refuse a key or table header of more than MAX_DOTTED_PARTS parts, before tomllib sees
    it (a linear scan; dots inside quoted strings and after `=` do not count)."""
    in_multiline: bytes | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if in_multiline is not None:
            if line.count(in_multiline) % 2:
                in_multiline = None
            continue
        dots, quote = 0, 0
        for byte in line:
            if quote:
                if byte == quote:
                    quote = 0
            elif byte in (0x22, 0x27):  # " '
                quote = byte
            elif byte == 0x2E:  # .
                dots += 1
            elif byte in (0x3D, 0x23):  # = #: the key ends (or a comment starts)
                break
        if dots >= MAX_DOTTED_PARTS:
            raise ConfigError(
                f"(line {number})",
                f"a key has more than {MAX_DOTTED_PARTS} dotted parts",
                file=file,
            )
        for marker in (b'"""', b"'''"):
            if line.count(marker) % 2:
                in_multiline = marker
                break


def _check_depth(data: object, file: str | None) -> None:
    """Refuse nesting deeper than MAX_DEPTH, naming where (iterative: no recursion here).

    The stack holds (value, parent entry, key) and a location is spelled out only for the
    error: building every child's dotted path up front cost memory in keys times siblings.
    """
    stack: list[tuple[object, Any, str, int]] = [(data, None, "", 0)]
    while stack:
        entry = stack.pop()
        value, _, _, depth = entry
        if depth > MAX_DEPTH:
            raise ConfigError(
                _where(entry) or "(file)", f"nested deeper than {MAX_DEPTH} levels", file=file
            )
        if isinstance(value, dict):
            stack.extend((child, entry, str(key), depth + 1) for key, child in value.items())
        elif isinstance(value, list):
            stack.extend((child, entry, f"[{i}]", depth + 1) for i, child in enumerate(value))


def _where(entry: tuple[object, Any, str, int]) -> str:
    parts: list[str] = []
    node: object = entry
    while isinstance(node, tuple) and node[1] is not None:
        parts.append(node[2])
        node = node[1]
    text = ""
    for key in reversed(parts):
        text += key if key.startswith("[") or not text else f".{key}"
    return text[:200]


def _check_section_name(opts: Options, name: str) -> None:
    problem = _check_name(name)
    if problem:
        opts.fail(name, f"section name {problem}")


def _agent(opts: Options) -> AgentSettings:
    tls = opts.sub("tls", None)
    settings = AgentSettings(
        name=opts.string("name", check=_check_name),
        listen=parse_address(opts, "listen", "0.0.0.0:7447"),  # type: ignore[arg-type]
        tls=TlsFiles(
            cert=tls.path("cert", must_exist=True),
            key=tls.path("key", must_exist=True),
            ca=tls.path("ca", must_exist=True),
        )
        if opts.has("tls")
        else None,
        state_dir=opts.path("state_dir", Path("/var/lib/qkdagent")),
        status_listen=parse_address(opts, "status_listen", "127.0.0.1:7448"),
        plugins=tuple(opts.strings("plugins", [])),
        drain_timeout=opts.number("drain_timeout", 10.0, min=0, max=600),
        rotation_timeout=opts.number("rotation_timeout", 30.0, positive=True, max=600),
        max_parallel_rotations=opts.integer("max_parallel_rotations", 64, min=1, max=1024),
        log_format=opts.string("log_format", "text", choices=("text", "json")),
        max_connections=opts.integer("max_connections", 512, min=16, max=1_000_000),
        max_connections_per_address=opts.integer(
            "max_connections_per_address", 128, min=1, max=1_000_000
        ),
        handshake_timeout=opts.number("handshake_timeout", 5.0, positive=True, max=300),
        request_timeout=opts.number("request_timeout", 10.0, positive=True, max=600),
        used_key_ids_kept=opts.integer(
            "used_key_ids_kept", USED_KEY_ID_RETENTION, min=MIN_USED_KEY_IDS_KEPT, max=10**9
        ),
    )
    tls.finish()
    _check_ports_differ(opts, settings.listen, settings.status_listen)
    opts.finish()
    return settings


def _check_ports_differ(opts: Options, listen: Address, status: Address | None) -> None:
    """Both listeners on one port would fail at the second bind; say so before starting."""
    wildcard = ("0.0.0.0", "::", "")
    if status is not None and status.port == listen.port:
        if status.host == listen.host or status.host in wildcard or listen.host in wildcard:
            opts.fail("status_listen", f"uses the port of agent.listen ({listen})")


def _components(opts: Options, kind: str) -> dict[str, ComponentConfig]:
    result: dict[str, ComponentConfig] = {}
    for name in opts.names():
        _check_section_name(opts, name)
        sub = opts.sub(name)
        type_name = sub.string("type", max_len=64)
        result[name] = ComponentConfig(
            kind=kind,
            id=name,
            type=type_name,
            label=sub.string("label", type_name, check=_check_name),
            timeout=sub.number("timeout", 10.0, positive=True, max=600),
            options=sub,
            local_only=sub.boolean("local_only", False) if kind == "sinks" else False,
        )
    opts.finish()
    return result


def _link(
    opts: Options,
    name: str,
    agent: AgentSettings,
    sources: dict[str, ComponentConfig],
    sinks: dict[str, ComponentConfig],
) -> LinkConfig:
    peer = opts.string("peer", check=_check_name)
    if peer == agent.name:
        opts.fail("peer", f"is this agent's own name {peer!r}")
    protocol = opts.string("protocol", NATIVE, check=_check_name)
    if protocol != NATIVE:
        return _foreign_link(opts, name, peer, protocol, agent, sources, sinks)
    url = opts.string("peer_url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a bad [IPv6] literal or a port out of range
        opts.fail("peer_url", f"must be https://HOST[:PORT] (mutual TLS), not {url!r}")
    if (
        parts.scheme != "https"
        or not parts.hostname
        or parts.path not in ("", "/")
        or not url.isprintable()  # urlsplit silently drops tabs and newlines
        or " " in url
    ):
        opts.fail("peer_url", f"must be https://HOST[:PORT] (mutual TLS), not {url!r}")
    if port == 0:
        opts.fail("peer_url", "port must be 1-65535, not 0")
    peer_identity = opts.string(
        "peer_identity",
        peer,
        max_len=255,
        check=lambda v: None if v.isprintable() and v.strip() == v else "must be printable text",
    )
    role, initiator, timing = _role_and_timing(opts, agent, peer)
    link_sources, link_sinks = _link_components(opts, sources, sinks)
    bootstrap = opts.secret("bootstrap", encoding="base64", size=32)
    opts.finish()
    return LinkConfig(
        name=name,
        peer=peer,
        peer_url=url.rstrip("/"),
        role=role,
        initiator=initiator,
        peer_identity=peer_identity,
        bootstrap=bootstrap,
        timing=timing,
        sources=link_sources,
        sinks=link_sinks,
    )


def _foreign_link(
    opts: Options,
    name: str,
    peer: str,
    protocol: str,
    agent: AgentSettings,
    sources: dict[str, ComponentConfig],
    sinks: dict[str, ComponentConfig],
) -> LinkConfig:
    """A link run by a plugin's protocol: the common settings here, the rest of the table
    (`protocol_options`) validated by the protocol class once the plugins are loaded."""
    role, initiator, timing = _role_and_timing(opts, agent, peer)
    link_sources, link_sinks = _link_components(opts, sources, sinks)
    insecure = opts.boolean("insecure", False)
    for native_only in ("bootstrap", "peer_identity"):
        if opts.has(native_only):
            opts.fail(native_only, f"belongs to the native protocol, not {protocol!r}")
    return LinkConfig(
        name=name,
        peer=peer,
        peer_url="",
        role=role,
        initiator=initiator,
        peer_identity="",
        bootstrap=None,
        timing=timing,
        sources=link_sources,
        sinks=link_sinks,
        protocol=protocol,
        insecure=insecure,
        protocol_options=opts,
        protocol_snapshot=opts.snapshot(),
    )


def _role_and_timing(opts: Options, agent: AgentSettings, peer: str) -> tuple[str, bool, Timing]:
    role = opts.string("role", "auto", choices=ROLES)
    initiator = role == "initiator" or (role == "auto" and agent.name < peer)
    interval = opts.number("interval", 120.0, positive=True, max=86400)
    reject_after = opts.number("reject_after", 180.0, positive=True, max=7 * 86400)
    if reject_after <= interval:
        opts.fail("reject_after", f"must be longer than interval ({interval:g} s)")
    margin = reject_after - interval
    timing = Timing(
        interval=interval,
        jitter=opts.number("jitter", 0.1, min=0, max=0.5),
        reject_after=reject_after,
        backoff_min=opts.number("backoff_min", 1.0, positive=True),
        backoff_max=opts.number("backoff_max", min(30.0, interval), positive=True),
        # at most a tenth of the interval, and half the margin before reject_after, so a
        # rotation put off to the grid still comes well before its key is erased
        grid=opts.number(
            "grid", min(1.0, interval / 120, margin / 2), min=0, max=min(interval / 10, margin / 2)
        ),
    )
    return role, initiator, timing


def _link_components(
    opts: Options, sources: dict[str, ComponentConfig], sinks: dict[str, ComponentConfig]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    link_sources = opts.strings("sources", allow_empty=False)
    for source in link_sources:
        if source not in sources:
            opts.fail("sources", f"names {source!r}, which has no [sources.{source}] table")
    link_sinks = opts.strings("sinks", [])
    labels: dict[str, str] = {}
    for sink in link_sinks:
        if sink not in sinks:
            opts.fail("sinks", f"names {sink!r}, which has no [sinks.{sink}] table")
        label = sinks[sink].label
        if label in labels:
            opts.fail(
                "sinks",
                f"sinks {labels[label]!r} and {sink!r} share the label {label!r}; give each "
                "consumer its own `label` so they never share key bytes",
            )
        labels[label] = sink
    return tuple(link_sources), tuple(link_sinks)
