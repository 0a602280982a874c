"""Sink `example-file`: the link's secret, hex-encoded, in a file a consumer reads.

What it shows a plugin author: a path template checked when the config is read, the secret
written atomically with mode 0600 (`write_secret_file`, in a worker thread), `verify` reading
back, `erase` failing closed with a random secret, and errors that name the file but never
quote key bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio
from qkdagent import (
    KeyMeta,
    Link,
    Misconfigured,
    Options,
    PluginContext,
    Secret,
    Sink,
    SinkError,
    check_template,
    write_secret_file,
)


class FileSink(Sink):
    type_name = "example-file"

    def __init__(self, name: str, options: Options, context: PluginContext) -> None:
        super().__init__(name, options, context)
        self.template = str(options.path("path"))
        problem = check_template(self.template, ("link", "peer"))
        if problem:
            options.fail("path", problem)

    def path(self, link: Link) -> Path:
        return Path(self.template.format(link=link.name, peer=link.peer))

    async def prepare(self) -> None:
        for link in self.links:  # set by the agent before prepare()
            directory = self.path(link).parent
            if not os.access(directory, os.W_OK | os.X_OK):
                raise Misconfigured(f"sink {self.name!r}: cannot write into {directory}")

    async def install(self, link: Link, secret: Secret, meta: KeyMeta) -> None:
        data = secret.reveal().hex().encode() + b"\n"
        path = self.path(link)
        try:
            await trio.to_thread.run_sync(write_secret_file, path, data)
        except OSError as exc:
            raise SinkError(f"sink {self.name!r}: cannot write {path}: {exc.strerror}") from None

    async def verify(self, link: Link, secret: Secret, meta: KeyMeta) -> bool | None:
        try:
            held = bytes.fromhex(await trio.Path(self.path(link)).read_text(encoding="ascii"))
        except (OSError, ValueError):  # missing, unreadable or not hex (UnicodeError included)
            return False
        return Secret(held) == secret  # constant-time comparison

    async def erase(self, link: Link, reason: str) -> None:
        await self.install(link, Secret.random(32), KeyMeta(0, (), self.name, 0.0))
