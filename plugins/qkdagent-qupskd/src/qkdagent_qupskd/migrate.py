"""`qkdagent migrate qupskd`: a quPSKd config in, two commented qkdagent configs out, pure.

The quPSKd file is untrusted input: its size is bounded by the caller, every key is type-checked
and anything wrong is a `MigrateError` naming the key. What cannot be carried over exactly is
listed in `Plan.notes` for the operator (the CLI prints it).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .settings import split_peer_url

MAX_CONFIG_BYTES = 64 * 1024
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
WG_KEY = re.compile(r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$")
KNOWN = {
    "qupskd_bind": str,
    "qupskd_port": int,
    "enable_fake_qkd_api": bool,
    "etsi_url": str,
    "remote_qupskd_url": str,
    "key_folder": str,
    "alias": str,
    "psk": str,
    "wireguard_public_key": str,
    "source_KME_ID": str,
    "target_KME_ID": str,
    "master_SAE_ID": str,
    "remote_SAE_ID": str,
}
REQUIRED = ("qupskd_bind", "qupskd_port", "etsi_url", "remote_qupskd_url", "remote_SAE_ID")


class MigrateError(ValueError):
    """The quPSKd config cannot be read or lacks what the migration needs."""


@dataclass
class Plan:
    name: str
    peer: str
    link: str
    phase1: str
    phase2: str
    psk: str | None = field(repr=False)
    """quPSKd's `psk`, to be written to `psk_file` (0600) next to the configs."""
    psk_file: str
    bootstrap_file: str
    notes: list[str] = field(default_factory=list)


def _q(value: str) -> str:
    """A TOML basic string."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in escaped) + '"'


def read_qupskd(text: str) -> dict[str, Any]:
    if len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
        raise MigrateError(f"the quPSKd config is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MigrateError(f"the quPSKd config is not TOML: {str(exc)[:120]}") from None
    except RecursionError:  # tomllib recurses per nested array or inline table
        raise MigrateError("the quPSKd config is nested too deeply") from None
    for key, kind in KNOWN.items():
        if key in data and (
            not isinstance(data[key], kind) or isinstance(data[key], bool) != (kind is bool)
        ):
            raise MigrateError(f"{key}: must be a {kind.__name__}, not {type(data[key]).__name__}")
        if kind is str and key in data and (not data[key] or len(data[key]) > 1024):
            raise MigrateError(f"{key}: must be a non-empty string of at most 1024 characters")
    for key in REQUIRED:
        if key not in data:
            raise MigrateError(f"{key}: is missing (quPSKd needs it too)")
    if not 0 < data["qupskd_port"] < 65536:
        raise MigrateError("qupskd_port: must be 1-65535")
    if "key_folder" not in data and "wireguard_public_key" not in data:
        raise MigrateError("neither key_folder nor wireguard_public_key: nothing to install into")
    if "alias" not in data:
        raise MigrateError("alias: is missing (quPSKd names the key file or interface after it)")
    return data


def _agent_name(value: str | None, what: str) -> str:
    if value is None:
        raise MigrateError(f"cannot derive the {what} agent name; give it with --{what}")
    name = value[4:] if value.lower().startswith("sae_") else value
    if not NAME.match(name):
        raise MigrateError(f"{name!r} is not a usable agent name; give one with --{what}")
    return name


def _url_host(url: str) -> tuple[str, int | None]:
    try:
        parts = urlsplit(url)
        return (parts.hostname or ""), parts.port
    except ValueError:
        raise MigrateError(f"{url[:80]!r} is not a URL") from None


def plan(
    data: dict[str, Any],
    *,
    source: str,
    name: str | None = None,
    peer: str | None = None,
    peer_native_url: str | None = None,
    state_dir: str = "/var/lib/qkdagent",
    tls_dir: str = "/etc/qkdagent",
) -> Plan:
    notes: list[str] = []
    me = name or _agent_name(data.get("master_SAE_ID"), "name")
    other = peer or _agent_name(data.get("remote_SAE_ID"), "peer")
    for value, what in ((me, "name"), (other, "peer")):
        if not NAME.match(value):
            raise MigrateError(f"--{what} {value!r}: 1-64 letters, digits, '.', '_' or '-'")
    if me == other:
        raise MigrateError("this side and the peer would have the same name; give --name/--peer")
    link = "-".join(sorted((me, other)))
    bind, port = data["qupskd_bind"], data["qupskd_port"]
    if not bind.isascii() or any(c in bind for c in "/@?# "):
        raise MigrateError("qupskd_bind: not a host name or address")
    remote = data["remote_qupskd_url"].rstrip("/")
    problem = split_peer_url(remote)
    if isinstance(problem, str):
        raise MigrateError(f"remote_qupskd_url: {problem}")
    remote_host = problem[0]
    notes.extend(
        f"{key}: unknown to quPSKd and to this tool, ignored"
        for key in sorted(set(data) - set(KNOWN))
    )

    # -- the KME --------------------------------------------------------------------------
    etsi_url = data["etsi_url"].rstrip("/")
    etsi_host, etsi_port = _url_host(etsi_url)
    kme_url = etsi_url
    fake = bool(data.get("enable_fake_qkd_api", False))
    own = (
        {bind, "localhost", "127.0.0.1", "::1"}
        if bind in ("localhost", "127.0.0.1", "::1")
        else {bind}
    )
    if fake and etsi_port == port and etsi_host in own:
        kme_url = remote
        notes.append(
            f"etsi_url {etsi_url} is the fake KME inside the quPSKd being replaced; qkdagent "
            f"serves none, so kme_url is the peer's ({remote}), which derives the same keys from "
            "the key ID. Insecure by construction; once the peer runs qkdagent too, use a real "
            "KME or `qkdagent kme-sim`"
        )
    plain = kme_url.startswith("http://")
    if not plain and not kme_url.startswith("https://"):
        raise MigrateError(f"etsi_url: {etsi_url[:80]!r} is neither http:// nor https://")
    if plain:
        notes.append("the KME is plain HTTP: the source sets insecure_http = true (keys in clear)")
    else:
        notes.append(
            "the KME is HTTPS, but quPSKd had no SAE certificate: the source needs cert, key and "
            f"ca files (placeholders under {tls_dir})"
        )
    for key in ("source_KME_ID", "target_KME_ID"):
        if key in data:
            notes.append(f"{key} {data[key]!r}: only a comment (kme_id is checked over HTTPS only)")

    # -- the sink -------------------------------------------------------------------------
    alias = data["alias"]
    plugins = ["qupskd", "etsi014"]
    if "wireguard_public_key" in data:
        public = data["wireguard_public_key"]
        if not WG_KEY.match(public):
            raise MigrateError(
                "wireguard_public_key: not a WireGuard public key (base64, 32 bytes)"
            )
        interface = f"wg0_{alias}"
        if not NAME.match(interface) or len(interface) > 15:
            raise MigrateError(f"the interface name {interface!r} (wg0_ + alias) is not usable")
        plugins.append("wireguard")
        sink = (
            "[sinks.psk]                          # quPSKd: wg-set-psk wg0_<alias> <public key>\n"
            'type = "wireguard"\n'
            f"interface = {_q(interface)}\n"
            f"peer_public_key = {_q(public)}\n"
        )
        if "key_folder" in data:
            notes.append("key_folder: quPSKd ignores it when wireguard_public_key is set; so do we")
    else:
        folder = data["key_folder"].rstrip("/") or "/"
        path = f"{folder}/{alias}.key"
        if not folder.startswith("/"):
            notes.append(
                f"key_folder {folder!r} is relative: quPSKd resolved it against its working "
                "directory, qkdagent resolves it against the config file's directory; check the "
                "sink's path"
            )
        sink = (
            "[sinks.psk]                          # quPSKd: key_folder/alias.key\n"
            'type = "file"\n'
            f"path = {_q(path)}\n"
            'format = "base64"                    # 44 characters, no newline: quPSKd\'s bytes\n'
            "create_dirs = true                   # as quPSKd (here mode 0700; the file is 0600)\n"
        )
    psk = data.get("psk")
    psk_file = f"{link}.qupskd-psk.key"
    bootstrap_file = f"{link}.bootstrap"
    native = peer_native_url or f"https://{remote_host}:7447"
    if peer_native_url is None:
        notes.append(f"phase 2 peer_url guessed as {native} (give --peer-url)")

    plugin_list = ", ".join(_q(p) for p in plugins)
    agent = (
        "[agent]\n"
        f"name = {_q(me)}\n"
        'listen = "0.0.0.0:7447"              # the native peer API (phase 2; HTTPS, mutual TLS)\n'
        'status_listen = "127.0.0.1:7448"     # GET /status, /metrics: keep it on loopback\n'
        f"state_dir = {_q(state_dir)}\n"
        f"plugins = [{plugin_list}]\n"
        "\n"
        "[agent.tls]                          # this deployment's CA; one certificate per agent\n"
        f"cert = {_q(f'{tls_dir}/{me}.pem')}\n"
        f"key = {_q(f'{tls_dir}/{me}.key')}\n"
        f"ca = {_q(f'{tls_dir}/agents-ca.pem')}\n"
    )
    source_lines = [
        "[sources.kme]",
        'type = "etsi014"',
        f"kme_url = {_q(kme_url)}",
    ]
    if plain:
        source_lines.append("insecure_http = true                 # plain HTTP: keys in clear")
    else:
        source_lines += [
            f"cert = {_q(f'{tls_dir}/sae-{me}.pem')}   # the SAE certificate the KME knows",
            f"key = {_q(f'{tls_dir}/sae-{me}.key')}",
            f"ca = {_q(f'{tls_dir}/kme-ca.pem')}",
        ]
    if "master_SAE_ID" in data:
        source_lines.append(f"sae_id = {_q(data['master_SAE_ID'])}   # quPSKd: master_SAE_ID")
    source_lines.append(
        f"peer_sae_ids = {{ {_q(other)} = {_q(data['remote_SAE_ID'])} }}   # quPSKd: remote_SAE_ID"
    )
    if fake:
        source_lines.append('dec_method = "get"                   # quPSKd\'s fake KME: GET only')
    kme_table = "\n".join(source_lines) + "\n"
    common = 'sources = ["kme"]\nsinks = ["psk"]\n'
    psk_line = (
        f"psk = {{ file = {_q(psk_file)} }}   # quPSKd: psk (0600, next to this file)\n"
        if psk is not None
        else ""
    )
    phase1 = (
        f"# qkdagent for {me}, PHASE 1 of the migration from quPSKd ({source}).\n"
        "# Written by `qkdagent migrate qupskd`; see docs/migrating-from-qupskd.md.\n"
        f"# {other} may still run quPSKd: the link speaks quPSKd's plain, unauthenticated HTTP\n"
        "# protocol, so anyone on the path can read the key IDs, reset the chain or make the two\n"
        "# sides disagree. Move to phase 2 as soon as both sides run qkdagent.\n\n"
        f"{agent}\n"
        f"[links.{link}]\n"
        f"peer = {_q(other)}\n"
        'protocol = "qupskd"\n'
        "insecure = true                      # required: the protocol authenticates nothing\n"
        f"listen = {_q(f'{bind}:{port}')}   # quPSKd: qupskd_bind, qupskd_port\n"
        f"peer_url = {_q(remote)}   # quPSKd: remote_qupskd_url\n"
        f"{psk_line}"
        f"{common}"
        "interval = 120                       # quPSKd's 120 s (initiator_wait defaults to it)\n"
        "reject_after = 180                   # quPSKd's 180 s: then a random PSK (max_wait)\n"
        "# initiator_wait = 120, responder_wait = 130, max_wait = 180 (the defaults)\n\n"
        f"{kme_table}\n{sink}"
    )
    phase2 = (
        f"# qkdagent for {me}, PHASE 2 of the migration from quPSKd ({source}).\n"
        "# Both sides run qkdagent: the native protocol (HTTPS with mutual TLS, authenticated\n"
        "# rotations). Switch both sides together (SIGHUP); the PSK changes at the switch.\n"
        f"# Before: `qkdagent gen-bootstrap {bootstrap_file}` on one side, copy it to {other}\n"
        "# over a secure channel (same file name there), and give both agents certificates\n"
        "# from one CA ([agent.tls]).\n\n"
        f"{agent}\n"
        f"[links.{link}]\n"
        f"peer = {_q(other)}\n"
        f"peer_url = {_q(native)}   # {other}'s [agent] listen\n"
        f"bootstrap = {{ file = {_q(bootstrap_file)} }}   # qkdagent gen-bootstrap\n"
        f"{common}"
        "interval = 120\n"
        "reject_after = 180\n\n"
        + (
            "# quPSKd's fake KME is gone with the last quPSKd: point kme_url at a real KME or\n"
            "# `qkdagent kme-sim` (HTTPS, mutual TLS) and drop insecure_http.\n"
            if fake
            else ""
        )
        + f"{kme_table}\n{sink}"
    )
    return Plan(me, other, link, phase1, phase2, psk, psk_file, bootstrap_file, notes)
