"""The sample's flaky worker: its executor raises on its 3rd job and its
process exits on its 5th. Loaded with --jobs tests.jobs_flaky (replaces square)."""

from __future__ import annotations

import os

from dworkers.worker.jobs import job

_count = 0


@job("square")
def flaky_square(payload: bytes) -> str:
    global _count
    _count += 1
    if _count == 3:
        raise RuntimeError("flaky executor fails on its 3rd job")
    if _count == 5:
        os._exit(1)  # the executor process dies on its 5th job
    n = int(payload.decode())
    return f"{n} * {n} = {n * n}"
