"""Jobs used by the tests, loaded into workers with --jobs tests.jobs_for_tests."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from dworkers.worker.jobs import job


@job("fail")
def fail(payload: bytes) -> str:
    """Always raises: poison work."""
    raise RuntimeError(f"cannot handle {payload.decode(errors='replace')!r}")


@job("hang_once")
def hang_once(payload: bytes) -> str:
    """Hangs the first time it runs (per marker file), then succeeds."""
    marker = Path(payload.decode())
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        time.sleep(300)
    return "finished"


@job("blob")
def blob(payload: bytes) -> bytes:
    """A result of the given number of bytes (to fill a subscriber's buffers)."""
    return b"r" * int(payload.decode())


@job("echo")
def echo(payload: bytes) -> bytes:
    """Returns its payload: a result as large as the work."""
    return payload


@job("digest")
def digest(payload: bytes) -> str:
    """The payload's SHA-256 (a small result that proves the payload arrived whole)."""
    return hashlib.sha256(payload).hexdigest()
