"""Built-in sink `exec`: hand the secret to an admin hook program on its standard input.

The secret is never put on the command line or in the environment (both are visible to other
users through /proc). The hook gets what it may know in the environment: QKDAGENT_ACTION
(install|erase), QKDAGENT_LINK, QKDAGENT_PEER, QKDAGENT_EPOCH, QKDAGENT_KEY_IDS (comma-separated),
QKDAGENT_LABEL, QKDAGENT_SINK, QKDAGENT_REASON (erase only). A non-zero exit is a failed install.
The program runs under `run_program`'s rules (clean environment, deadline, bounded output).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable

import trio

from ..errors import Misconfigured
from ..hookspecs import hookimpl
from ..interfaces import KeyMeta, Link, PluginContext, Sink
from ..options import Options
from ..secret import Secret
from .file_sink import FORMATS, encode
from .program import program_env, run_program


class ExecSink(Sink):
    type_name = "exec"

    def __init__(self, name: str, options: Options, context: PluginContext) -> None:
        super().__init__(name, options, context)
        command = options.raw("command")
        if isinstance(command, str):
            command = shlex.split(command)
        if (
            not isinstance(command, list)
            or not command
            or not all(isinstance(c, str) and c for c in command)
        ):
            options.fail("command", "must be a program path or a list [program, args...]")
        self.command: list[str] = command
        self.erase_command: list[str] | None = None
        if options.has("erase_command"):
            erase = options.strings("erase_command", allow_empty=False)
            self.erase_command = erase
        self.format = options.string("format", "base64", choices=FORMATS)
        self.newline = options.boolean("newline", True)
        self.run_timeout = options.number("run_timeout", 8.0, positive=True, max=600)
        self.env = {k: str(v) for k, v in options.table("env", {}).items()}
        for key in self.env:
            if key.startswith("QKDAGENT_"):
                options.fail("env", f"{key}: QKDAGENT_* variables are set by the agent")

    async def prepare(self) -> None:
        for command in (self.command, self.erase_command):
            if command and not os.access(command[0], os.X_OK):
                raise Misconfigured(f"sink {self.name!r}: {command[0]} is not an executable file")

    def _environ(self, link: Link, action: str, extra: dict[str, str]) -> dict[str, str]:
        return program_env(
            {
                **self.env,
                "QKDAGENT_ACTION": action,
                "QKDAGENT_LINK": link.name,
                "QKDAGENT_PEER": link.peer,
                "QKDAGENT_SINK": self.name,
                **extra,
            }
        )

    async def _run(self, command: list[str], stdin: bytes, env: dict[str, str]) -> None:
        await run_program(
            command,
            deadline=trio.current_time() + self.run_timeout,
            what=f"sink {self.name!r}: hook",
            stdin=stdin,
            env=env,
        )

    async def install(self, link: Link, secret: Secret, meta: KeyMeta) -> None:
        env = self._environ(
            link,
            "install",
            {
                "QKDAGENT_EPOCH": str(meta.epoch),
                "QKDAGENT_KEY_IDS": ",".join(meta.key_ids),
                "QKDAGENT_LABEL": meta.label,
            },
        )
        await self._run(self.command, encode(secret.reveal(), self.format, self.newline), env)

    async def erase(self, link: Link, reason: str) -> None:
        env = self._environ(
            link,
            "erase",
            {"QKDAGENT_REASON": reason, "QKDAGENT_EPOCH": "0", "QKDAGENT_KEY_IDS": ""},
        )
        junk = Secret.random(32)
        await self._run(
            self.erase_command or self.command,
            encode(junk.reveal(), self.format, self.newline),
            env,
        )


@hookimpl
def qkdagent_register_sinks(register: Callable[[type[Sink]], None]) -> None:
    register(ExecSink)


__all__ = ["ExecSink"]
