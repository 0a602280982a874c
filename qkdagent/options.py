"""Typed, located access to one config table.

Every accessor records the key it consumed; `finish()` then rejects keys nobody asked for, so a
typo in a config file is an error instead of a silently ignored option. Errors carry the file and
the dotted key (`sinks.wg0.interface`) so the operator knows exactly what to fix.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
import string
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from .errors import ConfigError
from .fileutil import FileCheckError, read_regular_file
from .secret import Secret

_MISSING: Any = object()
T = TypeVar("T")

MAX_SECRET_BYTES = 64 * 1024
"""Largest secret file read (keys, PINs and bootstrap secrets are far smaller)."""
_REFERENCE_FORMS = 'must be {file = "PATH"} or {env = "NAME"} or {credential = "NAME"}'
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
_taken_env: dict[str, Secret] = {}
"""Secrets `{ env = ... }` took out of the environment, for a later load of the same config
(a SIGHUP reload) in this process: the variable itself is gone by then."""


class Options:
    """Reader over one `[section.name]` table of the config file."""

    def __init__(
        self,
        data: Mapping[str, Any],
        *,
        where: str,
        file: str | None = None,
        base_dir: Path | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(where, "must be a table", file=file)
        self._data = dict(data)
        self._where = where
        self._file = file
        self._base = base_dir or Path.cwd()
        self._warn = warn or (lambda message: None)
        self._used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self._where}.{name}" if self._where else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(self.key(name), message, file=self._file)

    def fail(self, name: str, message: str) -> NoReturn:
        raise self.error(name, message)

    def warn(self, name: str, message: str) -> None:
        where = f"{self._file}: " if self._file else ""
        self._warn(f"{where}{self.key(name)}: {message}")

    def has(self, name: str) -> bool:
        return name in self._data

    def names(self) -> list[str]:
        """The keys of this table (for tables whose keys are names: `[links.*]`)."""
        return list(self._data)

    def snapshot(self) -> str:
        """A stable text form of the raw table, to tell whether a reload changed it."""
        return repr(sorted(self._data.items()))

    def _get(self, name: str, default: Any) -> Any:
        self._used.add(name)
        if name in self._data:
            return self._data[name]
        if default is _MISSING:
            self.fail(name, "is required")
        return default

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        return self._get(name, default)

    def string(
        self,
        name: str,
        default: Any = _MISSING,
        *,
        choices: Sequence[str] | None = None,
        check: Callable[[str], str | None] | None = None,
        max_len: int = 4096,
    ) -> Any:
        value = self._get(name, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str):
            self.fail(name, f"must be a string, not {_type(value)}")
        if not value:
            self.fail(name, "must not be empty")
        if len(value) > max_len:
            self.fail(name, f"is longer than {max_len} characters")
        if choices is not None and value not in choices:
            self.fail(name, f"must be one of {', '.join(map(repr, choices))}, not {value!r}")
        if check is not None:
            problem = check(value)
            if problem:
                self.fail(name, problem)
        return value

    def integer(
        self, name: str, default: Any = _MISSING, *, min: int | None = None, max: int | None = None
    ) -> Any:
        value = self._get(name, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, f"must be an integer, not {_type(value)}")
        _check_range(self, name, value, min, max)
        return value

    def number(
        self,
        name: str,
        default: Any = _MISSING,
        *,
        min: float | None = None,
        max: float | None = None,
        positive: bool = False,
    ) -> Any:
        value = self._get(name, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(name, f"must be a number, not {_type(value)}")
        try:
            value = float(value)
        except OverflowError:
            self.fail(name, "is out of range")
        if value != value or value in (float("inf"), float("-inf")):
            self.fail(name, "must be a finite number")
        if positive and value <= 0:
            self.fail(name, "must be greater than 0")
        _check_range(self, name, value, min, max)
        return value

    def boolean(self, name: str, default: Any = _MISSING) -> Any:
        value = self._get(name, default)
        if not isinstance(value, bool) and not (value is default and default is not _MISSING):
            self.fail(name, f"must be true or false, not {_type(value)}")
        return value

    def strings(self, name: str, default: Any = _MISSING, *, allow_empty: bool = True) -> Any:
        value = self._get(name, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(name, "must be a list of non-empty strings")
        if not allow_empty and not value:
            self.fail(name, "must not be empty")
        if len(set(value)) != len(value):
            self.fail(name, "lists an entry twice")
        return list(value)

    def table(self, name: str, default: Any = _MISSING) -> Any:
        value = self._get(name, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, Mapping):
            self.fail(name, f"must be a table, not {_type(value)}")
        return dict(value)

    def sub(self, name: str, default: Any = _MISSING) -> Options:
        """Options over a nested table (`[sinks.x.tls]`)."""
        data = self.table(name, default)
        return Options(
            data or {}, where=self.key(name), file=self._file, base_dir=self._base, warn=self._warn
        )

    def path(self, name: str, default: Any = _MISSING, *, must_exist: bool = False) -> Any:
        value = self.string(name, default)
        if value is default and default is not _MISSING:
            return value if value is None else self._base / value
        if "\0" in value:
            self.fail(name, "must not contain a NUL character")
        try:
            result = self._base / os.path.expanduser(value)
            exists = not must_exist or result.exists()
        except (OSError, ValueError) as exc:  # a name too long for the filesystem, say
            self.fail(name, f"is not a usable path ({type(exc).__name__})")
        if not exists:
            self.fail(name, f"{result} does not exist")
        return result

    def secret(
        self, name: str, default: Any = _MISSING, *, encoding: str = "text", size: int | None = None
    ) -> Any:
        """A secret given by reference, never inline: `{file = "PATH"}`, `{env = "NAME"}` or
        `{credential = "NAME"}` (a file in systemd's `$CREDENTIALS_DIRECTORY`).

        `encoding` is how the referenced value is stored: "text" (UTF-8, surrounding whitespace
        stripped), "base64", "hex" or "raw" (file bytes as they are). A variable named by `env`
        is removed from the environment once read, so programs the agent starts (hooks) never
        inherit it; /proc/PID/environ still shows it (see README).
        """
        value = self._get(name, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, str):
            self.fail(name, f"is not accepted inline; {_REFERENCE_FORMS}")
        refs = {"file", "env", "credential"}
        if not isinstance(value, Mapping) or len(value) != 1 or not (refs & set(value)):
            self.fail(name, _REFERENCE_FORMS)
        taken: str | None = None
        if "file" in value:
            raw = self._read_secret_file(name, value["file"])
        elif "credential" in value:
            raw = self._read_credential(name, value["credential"])
        else:
            raw, taken = self._read_env(name, value["env"])
        data = _decode_secret(self, name, raw, encoding)
        if size is not None and len(data) != size:
            self.fail(name, f"must hold {size} bytes, the referenced secret holds {len(data)}")
        if taken is not None:  # only a usable secret is taken: a failed load changes nothing
            _taken_env[taken] = Secret(raw)
            os.environ.pop(taken, None)  # unsetenv too: children no longer inherit it
        return Secret(data)

    def _read_env(self, name: str, env: object) -> tuple[bytes, str | None]:
        """The variable's bytes, and its name if it is still to be removed from the environment."""
        if not isinstance(env, str) or not _ENV_NAME.match(env):
            self.fail(name, "env must name an environment variable (letters, digits, '_')")
        raw = os.environb.get(env.encode())
        if raw is not None:
            return raw, env
        if env in _taken_env:
            return _taken_env[env].reveal(), None
        self.fail(name, f"environment variable {env} is not set")

    def _read_credential(self, name: str, credential: object) -> bytes:
        if (
            not isinstance(credential, str)
            or not credential
            or len(credential) > 255
            or "/" in credential
            or "\0" in credential
            or credential in (".", "..")
        ):
            self.fail(name, "credential must be a credential name (no '/', not '.' or '..')")
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            self.fail(
                name,
                f"credential {credential!r} needs $CREDENTIALS_DIRECTORY, which systemd sets "
                "for a unit with LoadCredential=; it is not set",
            )
        return self._read_secret_file(name, os.path.join(directory, credential))

    def _read_secret_file(self, name: str, ref: object) -> bytes:
        if not isinstance(ref, str) or not ref:
            self.fail(name, "file must be a path")
        path = self._base / os.path.expanduser(ref)
        try:
            raw, st = read_regular_file(path, limit=MAX_SECRET_BYTES, what="secret file")
        except FileCheckError as exc:
            self.fail(name, str(exc))
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            self.warn(name, f"secret file {path} is readable by group or others; chmod 600 it")
        return raw

    def finish(self) -> None:
        """Reject keys that no accessor consumed (typos, options of another type)."""
        unknown = sorted(set(self._data) - self._used)
        if unknown:
            self.fail(unknown[0], "is not a known option here")


def check_template(template: str, fields: Sequence[str]) -> str | None:
    """Why a `str.format` template is unusable for options like `path = "/x/{peer}.key"`.

    Only plain `{name}` placeholders from `fields` are allowed: no format specs, conversions,
    attribute or index access (which could reach into objects). Returns None when usable; the
    text fits `Options.string(..., check=...)`.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"is not a valid template: {exc}"
    for _literal, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in fields:
            allowed = ", ".join("{" + f + "}" for f in fields) or "none"
            return f"uses unknown placeholder {{{field}}}; allowed: {allowed}"
        if spec or conversion:
            return f"placeholder {{{field}}} must not carry a format spec or conversion"
    return None


def _decode_secret(opts: Options, name: str, raw: bytes, encoding: str) -> bytes:
    if encoding == "raw":
        return raw
    text = raw.strip()
    try:
        if encoding == "text":
            text.decode("utf-8")
            return text
        if encoding == "base64":
            return base64.b64decode(text, validate=True)
        if encoding == "hex":
            return bytes.fromhex(text.decode("ascii"))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        opts.fail(name, f"the referenced secret is not valid {encoding}")
    raise ValueError(f"unknown secret encoding {encoding!r}")


def _check_range(
    opts: Options, name: str, value: float, lo: float | None, hi: float | None
) -> None:
    if lo is not None and value < lo:
        opts.fail(name, f"must be at least {lo}, not {value}")
    if hi is not None and value > hi:
        opts.fail(name, f"must be at most {hi}, not {value}")


def _type(value: object) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)
