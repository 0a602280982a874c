"""The expiry service: removes previous identities once their grace period is over.

Installs happen once per rotation interval, but the grace period is usually shorter, so the
previous key must leave the file (and the consumer) on its own schedule. One service per agent
watches that agent's `tls-psk` sinks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import trio

from qkdagent import QkdAgentError

from .sink import active_sinks

log = logging.getLogger(__name__)

POLL = 1.0
"""Upper bound on a sleep, so sinks prepared later (config reload) are picked up."""


async def run_expiry(
    state_dir: Path, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
) -> None:
    task_status.started()
    while True:
        due = [
            s
            for s in active_sinks(state_dir)
            if (t := s.next_expiry()) is not None and t <= s.clock()
        ]
        for sink in due:
            try:
                await sink.expire()
            except QkdAgentError as exc:
                log.warning("%s: removing an expired PSK identity failed: %s", sink.name, exc)
        waits = [
            t - s.clock() for s in active_sinks(state_dir) if (t := s.next_expiry()) is not None
        ]
        wait = min([POLL, *waits])
        await trio.sleep(max(wait, 0.01))
