"""Checks of a parsed config against this host, shared by `qkdagent check` and `run`.

`config.py` checks what the file says; this module checks what it points at (TLS files, the
state directory, the built-in sinks' directories and hooks), so `check` refuses what `run`
would, and both name the dotted key. Nothing here reaches the peer or changes anything;
`check_listeners` binds for an instant and is for `run` only (a running agent holds its ports
while `check` validates the next config).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from .builtin.exec_sink import ExecSink
from .builtin.file_sink import FileSink
from .components import Components
from .config import Address, AgentConfig
from .errors import ConfigError
from .fileutil import FileCheckError, private_dir, read_regular_file
from .interfaces import Link

log = logging.getLogger(__name__)

MAX_PEM_BYTES = 1 << 20


def check_config(config: AgentConfig) -> None:
    """Everything about `[agent]` that can be checked without the peer or the network."""
    check_tls(config)
    check_state_dir(config)


def _error(config: AgentConfig, key: str, message: str) -> ConfigError:
    return ConfigError(key, message, file=str(config.file) if config.file else None)


def _no_password() -> bytes:
    """An encrypted key must fail to load, not prompt on the terminal."""
    raise ValueError("encrypted")


def check_tls(config: AgentConfig) -> None:
    """The certificate, key and CA are readable PEM, and the key belongs to the certificate."""
    tls = config.agent.tls
    if tls is None:  # no native link (config.py requires it for one)
        return
    data: dict[str, bytes] = {}
    for key, path in (("cert", tls.cert), ("key", tls.key), ("ca", tls.ca)):
        try:
            data[key], st = read_regular_file(path, limit=MAX_PEM_BYTES, what="TLS file")
        except FileCheckError as exc:
            raise _error(config, f"agent.tls.{key}", str(exc)) from None
        if key == "key" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("config warning: agent.tls.key: %s is readable by group or others", path)
    for key in ("cert", "ca"):
        try:
            x509.load_pem_x509_certificates(data[key])
        except ValueError:
            raise _error(config, f"agent.tls.{key}", "holds no PEM certificate") from None
    try:
        serialization.load_pem_private_key(data["key"], password=None)
    except TypeError:  # "password was not given but private key is encrypted"
        raise _error(
            config, "agent.tls.key", "is encrypted; the agent needs it unencrypted (mode 0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise _error(config, "agent.tls.key", "holds no usable PEM private key") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(tls.cert, tls.key, password=_no_password)
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        raise _error(config, "agent.tls.key", f"does not match agent.tls.cert ({reason})") from None
    try:
        context.load_verify_locations(cafile=tls.ca)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        raise _error(config, "agent.tls.ca", f"cannot be used as a CA ({reason})") from None


def check_state_dir(config: AgentConfig) -> None:
    """The state directory exists or can be created, is a directory and is not a loose link."""
    try:
        private_dir(config.agent.state_dir, create=False)
    except FileCheckError as exc:
        raise _error(config, "agent.state_dir", str(exc)) from None


def check_components(config: AgentConfig, components: Components) -> None:
    """The built-in sinks' directories and hooks exist (what their `prepare()` would refuse).

    Plugins' components are checked by their `prepare()` when the agent starts: it may talk
    to the real component, which `check` must not.
    """
    for cid, handle in components.sinks.items():
        sink = handle.sink
        if isinstance(sink, FileSink):
            for link in _links_of(config, cid):
                _check_sink_dir(config, cid, sink.path(link).parent, create=sink.create_dirs)
        elif isinstance(sink, ExecSink):
            for key, command in (("command", sink.command), ("erase_command", sink.erase_command)):
                if command:
                    _check_hook(config, f"sinks.{cid}.{key}", command[0])


def _links_of(config: AgentConfig, cid: str) -> Iterator[Link]:
    for link in config.links.values():
        if cid in link.sinks:
            yield Link(link.name, config.agent.name, link.peer, link.initiator)


def _check_sink_dir(config: AgentConfig, cid: str, directory: Path, *, create: bool) -> None:
    """The sink's directory is writable; with `create_dirs`, the nearest existing parent is
    (the sink makes the rest at start-up; `check` changes nothing)."""
    if create:
        while not directory.exists() and directory.parent != directory:
            directory = directory.parent
    if not directory.is_dir():
        raise _error(config, f"sinks.{cid}.path", f"directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise _error(config, f"sinks.{cid}.path", f"directory {directory} is not writable")


def _check_hook(config: AgentConfig, key: str, program: str) -> None:
    if not os.path.isfile(program):
        raise _error(config, key, f"{program} does not exist or is not a file")
    if not os.access(program, os.X_OK):
        raise _error(config, key, f"{program} is not executable")


def check_listeners(config: AgentConfig) -> None:
    """Bind `listen` and `status_listen` for an instant, so a port in use is named (run only).

    The agent binds them later with SO_REUSEADDR, as done here; a race with another program
    is still reported by `run`, by errno.
    """
    settings = config.agent
    for key, address in (("listen", settings.listen), ("status_listen", settings.status_listen)):
        if address is not None:
            problem = _bind_problem(address)
            if problem:
                raise _error(config, f"agent.{key}", problem)


def _bind_problem(address: Address) -> str | None:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address.host, address.port))
    except socket.gaierror as exc:
        return f"cannot resolve {address.host!r}: {exc.strerror}"
    except OSError as exc:
        return bind_error_text(address, exc)
    return None


def bind_error_text(address: Address | str, exc: OSError) -> str:
    """What a failed bind means to an operator."""
    if exc.errno == errno.EADDRINUSE:
        return f"{address} is already in use (is another agent running?)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{address} is not an address of this host"
    if exc.errno == errno.EACCES:
        return f"cannot bind {address}: ports below 1024 need CAP_NET_BIND_SERVICE"
    return f"cannot bind {address}: {exc.strerror or exc}"
