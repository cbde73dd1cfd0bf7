"""Logging with stable keys (work_id, worker_id, epoch): readable text by
default, one JSON object per line with --log-format json."""

from __future__ import annotations

import json
import logging
import sys
import time

KEYS = ("work_id", "worker_id", "epoch", "role")


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        keys = " ".join(f"{k}={getattr(record, k)}" for k in KEYS if hasattr(record, k))
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if keys:
            line += "  " + keys
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3), "level": record.levelname.lower(),
            "logger": record.name, "msg": record.getMessage(),
        }
        for key in KEYS:
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup(fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    quiet = max(logging.WARNING, root.level)  # libraries speak only of problems
    for noisy in ("kazoo", "grpc", "asyncio"):
        logging.getLogger(noisy).setLevel(quiet)
