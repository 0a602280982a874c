"""Built-in sink `file`: the link's secret in a file, written atomically with mode 0600.

`format = "base64"` without a trailing newline is the format quPSKd writes and `wg set ...
preshared-key FILE` reads; `hex` suits stunnel-style tools, `raw` the bytes as they are.
A relative `path` resolves against the config file's directory. The directory must exist,
unless `create_dirs = true`: then the missing directories are created with mode 0700 (at
start-up, or at the first install for a path templated with `{link}`/`{peer}`), as quPSKd does
for its key folder.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable
from pathlib import Path

import trio

from ..errors import Misconfigured, SinkError
from ..fileutil import write_secret_file
from ..hookspecs import hookimpl
from ..interfaces import KeyMeta, Link, PluginContext, Sink
from ..options import Options, check_template
from ..secret import Secret

FORMATS = ("base64", "hex", "raw")


def encode(secret: bytes, fmt: str, newline: bool) -> bytes:
    if fmt == "raw":
        return secret
    text = base64.b64encode(secret) if fmt == "base64" else secret.hex().encode()
    return text + (b"\n" if newline else b"")


def decode(data: bytes, fmt: str) -> bytes | None:
    if fmt == "raw":
        return data
    try:
        text = data.strip()
        return (
            base64.b64decode(text, validate=True)
            if fmt == "base64"
            else bytes.fromhex(text.decode())
        )
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None


def make_private_dirs(directory: Path) -> None:
    """Create `directory` and any missing parents with mode 0700 (whatever the umask); the
    directories that already exist are left as they are."""
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:  # created meanwhile by someone else: leave it alone
            continue
        os.chmod(path, 0o700)


class FileSink(Sink):
    type_name = "file"

    def __init__(self, name: str, options: Options, context: PluginContext) -> None:
        super().__init__(name, options, context)
        self.path_template = str(options.path("path"))
        self.format = options.string("format", "base64", choices=FORMATS)
        self.newline = options.boolean("newline", False)
        if self.format == "raw" and self.newline:
            options.fail("newline", 'cannot be used with format = "raw"')
        self.on_erase = options.string("on_erase", "random", choices=("random", "remove"))
        problem = check_template(self.path_template, ("link", "peer"))
        if problem:
            options.fail("path", problem)
        self.create_dirs = options.boolean("create_dirs", False)

    def path(self, link: Link) -> Path:
        return Path(self.path_template.format(link=link.name, peer=link.peer))

    async def prepare(self) -> None:
        directory = Path(self.path_template).parent
        if "{" in str(directory):
            return
        if self.create_dirs:
            await self._make_dirs(directory)
        if not directory.is_dir():
            raise Misconfigured(f"sink {self.name!r}: directory {directory} does not exist")
        if not os.access(directory, os.W_OK):
            raise Misconfigured(f"sink {self.name!r}: directory {directory} is not writable")

    async def install(self, link: Link, secret: Secret, meta: KeyMeta) -> None:
        await self._write(link, encode(secret.reveal(), self.format, self.newline))

    async def _make_dirs(self, directory: Path) -> None:
        try:
            await trio.to_thread.run_sync(make_private_dirs, directory)
        except OSError as exc:
            raise Misconfigured(
                f"sink {self.name!r}: cannot create directory {directory}: {exc.strerror}"
            ) from None

    async def _write(self, link: Link, data: bytes) -> None:
        path = self.path(link)
        if self.create_dirs and "{" in str(Path(self.path_template).parent):
            try:
                await trio.to_thread.run_sync(make_private_dirs, path.parent)
            except OSError as exc:
                message = f"sink {self.name!r}: cannot create {path.parent}: {exc.strerror}"
                raise SinkError(message) from None
        try:
            await trio.to_thread.run_sync(write_secret_file, path, data)
        except OSError as exc:
            raise SinkError(f"sink {self.name!r}: cannot write {path}: {exc.strerror}") from None

    async def verify(self, link: Link, secret: Secret, meta: KeyMeta) -> bool | None:
        try:
            data = await trio.Path(self.path(link)).read_bytes()
        except OSError:
            return False
        held = decode(data, self.format)
        return held is not None and Secret(held) == secret

    async def erase(self, link: Link, reason: str) -> None:
        if self.on_erase == "remove":
            try:
                await trio.Path(self.path(link)).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise SinkError(f"sink {self.name!r}: cannot remove: {exc.strerror}") from None
            return
        await self.install(link, Secret.random(32), KeyMeta(0, (), self.name, 0.0))


@hookimpl
def qkdagent_register_sinks(register: Callable[[type[Sink]], None]) -> None:
    register(FileSink)
