"""Log output: human-readable text or one JSON object per line (for journald/collectors).

Nothing in qkdagent logs key bytes; this module only chooses the format.
"""

from __future__ import annotations

import json
import logging
import sys
import time

FIELDS = ("link", "epoch", "stage", "sink", "reason", "component", "kind", "duration_ms")
"""Structured fields a log call may pass with `extra=`; JSON lines carry them as keys, so a
collector can filter by link or stage without parsing messages. None of them is key material."""


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                data[name] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def setup_logging(fmt: str = "text", *, debug: bool = False, level: int | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if level is not None else (logging.DEBUG if debug else logging.INFO))
    # hypercorn's and httpx's per-request chatter is not useful at INFO
    for noisy in ("httpx", "httpcore", "hpack", "qkdagent.http"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
