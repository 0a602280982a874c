"""Error taxonomy shared by the core and plugins.

Messages never contain key bytes: errors end up in logs, status output and peer replies.
"""

from __future__ import annotations

import traceback


class QkdAgentError(Exception):
    """Base of every error qkdagent raises on purpose."""


class ConfigError(QkdAgentError):
    """A config value is wrong; names the file, the dotted key and what is wrong."""

    def __init__(self, key: str, message: str, *, file: str | None = None) -> None:
        self.file = file
        self.key = key
        self.message = message
        where = f"{file}: " if file else ""
        super().__init__(f"{where}{key}: {message}")


class PluginError(QkdAgentError):
    """A plugin could not be loaded or registered (names the distribution)."""


class ReloadFailed(QkdAgentError):
    """Applying a new config failed half-way; says which links were stopped and erased."""


class StartupError(QkdAgentError):
    """A component's `prepare()` failed or timed out, so the agent (or a reload) cannot start."""


class NotInstalled(QkdAgentError):
    """A component the plugin drives is missing (binary, library, device, token)."""


class Misconfigured(QkdAgentError):
    """`prepare()` found the configuration unusable against the real component."""


class SourceError(QkdAgentError):
    """A key source failed; the rotation attempt fails and the link stays on its epoch."""


class SourceUnavailable(SourceError):
    """The source could not be reached or is out of keys right now; try again later."""


class KeyNotFound(SourceError):
    """The source does not (or no longer) hold the key with the requested ID."""


class SinkError(QkdAgentError):
    """Installing into, verifying or erasing a consumer failed."""


class ProtocolError(QkdAgentError):
    """A peer message is malformed, unauthenticated or does not fit the link's state.

    `status` is the HTTP status the server answers with; the message is safe to send back.
    """

    def __init__(self, message: str, *, status: int = 400, body: bytes | None = None) -> None:
        self.status = status
        self.body = body
        """The error reply to send, when the refusing side built one (with its epoch hint)."""
        super().__init__(message)


class KeyReuseError(QkdAgentError):
    """A source handed out a key ID that this link has already used."""


def named(kind: str, component: str, error: BaseException) -> str:
    """`error`'s text prefixed with the component it came from, once: a plugin that already
    names itself ("source 'kme': ...") is not named twice."""
    prefix = f"{kind} {component!r}"
    text = str(error)
    return text if text.startswith(prefix) else f"{prefix}: {text}"


def leaf_errors(error: BaseException) -> list[BaseException]:
    """The exceptions inside `error`'s (nested) exception groups, or `error` alone: trio's
    nurseries wrap what a task raised, a port in use at start-up among them."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaf_errors(inner)]
    return [error]


def raised_at(error: BaseException) -> str:
    """Where `error` was raised, as " at FILE:LINE" of the innermost frame ("" without a
    traceback): a bug is named by type and place, never by its message (it might quote a key)."""
    frames = traceback.extract_tb(error.__traceback__)
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
