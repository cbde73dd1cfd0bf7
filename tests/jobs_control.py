"""Jobs for the work-control tests (cancel, delays, priorities, back-off,
permanent errors); loaded into workers with --jobs tests.jobs_control."""

from __future__ import annotations

import os
import time
from pathlib import Path

import dworkers


@dworkers.job("nap")
def nap(seconds: float, pid_file: str) -> str:
    """Says which process runs it, then sleeps."""
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(seconds)
    return "woke up"


@dworkers.job("stamp")
def stamp(label: str = "") -> dict:
    """When it ran, and the label it was given."""
    return {"label": label, "at": time.time()}


@dworkers.job("hold")
def hold(gate: str) -> str:
    """Runs until the file `gate` exists."""
    while not os.path.exists(gate):
        time.sleep(0.02)
    return "released"


@dworkers.job("always_fails")
def always_fails(log: str) -> None:
    """Notes when each attempt ran, then fails (a retryable error)."""
    with open(log, "a") as f:
        f.write(f"{time.time()}\n")
    raise ConnectionError("the service it needs is down")


@dworkers.job("hopeless", max_attempts=5)
def hopeless(what: str) -> None:
    raise dworkers.Permanent(f"{what} can never work")


@dworkers.job("picky", max_attempts=5, retry_for=ConnectionError)
def picky(what: str) -> None:
    raise ValueError(f"bad input {what!r}")


@dworkers.job("urgent", priority=9, backoff=(2.0, 3.0, 60.0))
def urgent() -> str:
    return "handled"


@dworkers.job("beating", heartbeat_timeout=1.5)
def beating(seconds: float, gate: str = "", *, ctx) -> str:
    """Runs for `seconds`, and then until the file `gate` exists, saying how far it got."""
    started = time.monotonic()
    while time.monotonic() - started < seconds or (gate and not os.path.exists(gate)):
        ctx.heartbeat(progress=min(1.0, (time.monotonic() - started) / seconds), details="working")
        time.sleep(0.1)
    return f"beat for {time.monotonic() - started:.1f} s"


@dworkers.job("silent", heartbeat_timeout=1.0, max_attempts=2)
def silent(seconds: float) -> str:
    """Never says it is alive."""
    time.sleep(seconds)
    return "woke up"


@dworkers.job("throttled", rate_limit=4)
def throttled() -> float:
    return time.time()
