"""Opt-in pytest fixtures for qkdagent and plugin tests.

Enable with `pytest_plugins = ["qkdagent.testing.pytest_plugin"]` in a conftest.py. A conftest
below the root, where pytest refuses `pytest_plugins`, installs the logging guard alone with
`def pytest_configure(config): install_logging_guard(config)`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Generator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .agents import AgentPair, open_agent_pair

GUARD = "qkdagent-logging-guard"


@dataclass
class LoggingState:
    """The parts of the logging tree a test may change: root and named loggers' handlers,
    levels, propagation and disabled flags, and `logging.disable`."""

    root: tuple[list[logging.Handler], int]
    loggers: dict[str, tuple[logging.Logger, list[logging.Handler], int, bool, bool]] = field(
        default_factory=dict
    )
    disable: int = logging.NOTSET

    @classmethod
    def save(cls) -> LoggingState:
        root = logging.getLogger()
        state = cls((root.handlers[:], root.level), disable=root.manager.disable)
        for name, logger in list(root.manager.loggerDict.items()):
            if isinstance(logger, logging.Logger):
                state.loggers[name] = (
                    logger,
                    logger.handlers[:],
                    logger.level,
                    logger.propagate,
                    logger.disabled,
                )
        return state

    def restore(self) -> None:
        """Back to the saved state; loggers created since keep theirs (a module imported
        meanwhile may have configured its own)."""
        root = logging.getLogger()
        root.handlers[:] = self.root[0]
        root.setLevel(self.root[1])
        for logger, handlers, level, propagate, disabled in self.loggers.values():
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate, logger.disabled = propagate, disabled
        logging.disable(self.disable)


def closed_stream_handlers() -> list[tuple[logging.Logger, logging.Handler]]:
    """(logger, handler) for every stream handler whose stream is closed: each record it gets
    prints a "--- Logging error ---" traceback instead."""
    root = logging.getLogger()
    loggers: list[logging.Logger] = [root]
    loggers += [x for x in list(root.manager.loggerDict.values()) if isinstance(x, logging.Logger)]
    return [
        (logger, handler)
        for logger in loggers
        for handler in logger.handlers
        if isinstance(handler, logging.StreamHandler)
        and getattr(handler.stream, "closed", False) is True
    ]


_saved = pytest.StashKey[LoggingState]()


class LoggingGuard:
    """Each test leaves the logging tree as it found it.

    A CLI entry point run in-process (`main(["check", ...])`) points the root logger at the
    test's `sys.stderr`, which pytest closes after the test: every later record then printed a
    "Logging error ... I/O operation on closed file" traceback (hundreds in a full run), and
    the levels it set hid records from later tests. The state is saved around the whole test
    (outside pytest's per-phase capture handlers) and restored after teardown. A handler on a
    closed stream that the restore does not remove (one added before the test, e.g. by a
    session fixture or at import) is detached and fails the test that finds it.
    """

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, object, object]:
        item.stash[_saved] = LoggingState.save()
        try:
            return (yield)
        finally:
            del item.stash[_saved]

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Generator[None, None, None]:
        try:
            yield
        finally:
            saved = item.stash.get(_saved, None)
            if saved is not None:
                saved.restore()
        stale = closed_stream_handlers()
        for logger, handler in stale:
            logger.removeHandler(handler)
        if stale:
            where = ", ".join(f"{handler!r} on logger {logger.name!r}" for logger, handler in stale)
            pytest.fail(f"logging handler left on a closed stream (now detached): {where}")


def install_logging_guard(config: pytest.Config) -> None:
    """Register `LoggingGuard` once per session, whichever conftest asks first."""
    if not config.pluginmanager.has_plugin(GUARD):
        config.pluginmanager.register(LoggingGuard(), GUARD)


def pytest_configure(config: pytest.Config) -> None:
    install_logging_guard(config)


@pytest.fixture
def agent_pair_factory(tmp_path: Path) -> Callable[..., AbstractAsyncContextManager[AgentPair]]:
    """`async with agent_pair_factory(alice={...}, bob={...}, link={...}) as pair:`"""

    def factory(**kwargs: Any) -> AbstractAsyncContextManager[AgentPair]:
        return open_agent_pair(tmp_path / "pair", **kwargs)

    return factory


@pytest.fixture
async def agent_pair(tmp_path: Path) -> AsyncIterator[AgentPair]:
    """alice and bob over loopback mTLS, a simulated link, a `recording` sink "rec" each."""
    sides = {"sinks": {"rec": {"type": "recording"}}}
    async with open_agent_pair(tmp_path / "pair", alice=sides, bob=sides) as pair:
        yield pair
