"""qkdagent: fresh quantum-derived pre-shared keys for VPN gateways and TLS services.

This module is the public plugin API. Plugins import from here (and from `qkdagent.testing`
in their tests), never from other modules of the package; `docs/plugins.md` is the guide.
Only what a plugin needs is exported: the component contract (`Source`, `Sink`, the values they
receive, `PluginContext` and its stash), `Options`, the errors a plugin raises or catches, the
hook marker and the event types observation hooks receive, and the helpers plugins share
(`write_secret_file` and the durable key-file helpers, `client_ssl_context` and
`load_tls_identity`, `run_program`, the simulators' key-supply seam). Errors only the core
raises are not exported.
"""

from __future__ import annotations

from .builtin.program import program_env, run_program
from .commands import CommandRegistry, DemoLink
from .errors import (
    ConfigError,
    KeyNotFound,
    Misconfigured,
    NotInstalled,
    ProtocolError,
    QkdAgentError,
    SinkError,
    SourceError,
    SourceUnavailable,
    StartupError,
    leaf_errors,
)
from .events import ComponentEvent, EraseEvent, RotationErrorEvent, RotationEvent
from .fileutil import (
    create_secret_file,
    destroy_file,
    sync_directory,
    write_secret_file,
    zero_range,
)
from .h1client import ConnectFailed, EncodedReply, ReplyTooLarge, TransportError
from .h1client import H1Client as HttpClient
from .h1client import Reply as HttpReply
from .hookspecs import hookimpl
from .interfaces import Answered, KeyMeta, Link, PluginContext, Sink, Source
from .keysupply import (
    CsprngSupply,
    KeySupply,
    SupplyExhausted,
    SupplyFactory,
    load_supply_factory,
    parse_supply_spec,
    prebuilt_supplies,
)
from .linkprotocol import ForeignLink, LinkProtocol
from .metricstore import LabelledValues, PluginMetrics
from .options import Options, check_template
from .pki import PkiError, extend_test_pki, file_stem, write_test_pki
from .secret import Key, Secret, check_key_id
from .services import Service
from .stash import Stash, StashKey
from .text import decimal
from .tlsclient import client_ssl_context, load_tls_identity

__version__ = "0.1.0"

__all__ = [
    "Answered",
    "CommandRegistry",
    "ComponentEvent",
    "ConfigError",
    "ConnectFailed",
    "CsprngSupply",
    "DemoLink",
    "EncodedReply",
    "EraseEvent",
    "ForeignLink",
    "HttpClient",
    "HttpReply",
    "Key",
    "KeyMeta",
    "KeyNotFound",
    "KeySupply",
    "LabelledValues",
    "Link",
    "LinkProtocol",
    "Misconfigured",
    "NotInstalled",
    "Options",
    "PkiError",
    "PluginContext",
    "PluginMetrics",
    "ProtocolError",
    "QkdAgentError",
    "ReplyTooLarge",
    "RotationErrorEvent",
    "RotationEvent",
    "Secret",
    "Service",
    "Sink",
    "SinkError",
    "Source",
    "SourceError",
    "SourceUnavailable",
    "StartupError",
    "Stash",
    "StashKey",
    "SupplyExhausted",
    "SupplyFactory",
    "TransportError",
    "__version__",
    "check_key_id",
    "check_template",
    "client_ssl_context",
    "create_secret_file",
    "decimal",
    "destroy_file",
    "extend_test_pki",
    "file_stem",
    "hookimpl",
    "leaf_errors",
    "load_supply_factory",
    "load_tls_identity",
    "parse_supply_spec",
    "prebuilt_supplies",
    "program_env",
    "run_program",
    "sync_directory",
    "write_secret_file",
    "write_test_pki",
    "zero_range",
]
