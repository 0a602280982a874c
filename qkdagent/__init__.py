"""qkdagent: fresh quantum-derived pre-shared keys for VPN gateways and TLS services.

This module is the public plugin API. Plugins import from here (and from `qkdagent.testing`
in their tests), never from other modules of the package.
"""

from __future__ import annotations

from .commands import CommandRegistry, DemoLink
from .errors import (
    ConfigError,
    KeyNotFound,
    KeyReuseError,
    Misconfigured,
    NotInstalled,
    PluginError,
    ProtocolError,
    QkdAgentError,
    SinkError,
    SourceError,
    SourceUnavailable,
    StartupError,
)
from .events import ComponentEvent, EraseEvent, RotationErrorEvent, RotationEvent
from .fileutil import write_secret_file
from .hookspecs import hookimpl
from .interfaces import KeyMeta, Link, PluginContext, Sink, Source
from .options import Options, check_template
from .secret import Key, Secret, check_key_id
from .services import Service
from .stash import Stash, StashKey

__version__ = "0.1.0"

__all__ = [
    "CommandRegistry",
    "ComponentEvent",
    "ConfigError",
    "DemoLink",
    "EraseEvent",
    "Key",
    "KeyMeta",
    "KeyNotFound",
    "KeyReuseError",
    "Link",
    "Misconfigured",
    "NotInstalled",
    "Options",
    "PluginContext",
    "PluginError",
    "ProtocolError",
    "QkdAgentError",
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
    "__version__",
    "check_key_id",
    "check_template",
    "hookimpl",
    "write_secret_file",
]
