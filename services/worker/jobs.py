"""Jobs: Python callables registered by kind. A job takes the work's payload
(bytes) and returns its result (bytes, or str, which is UTF-8 encoded).
Load more with `dworkers worker --jobs package.module`: the module registers
its jobs with the `job` decorator when imported."""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Callable

JOBS: dict[str, Callable[[bytes], bytes | str]] = {}


def job(kind: str):
    """Registers the decorated function as the job for `kind`."""

    def register(func):
        JOBS[kind] = func
        return func

    return register


def load(modules: list[str]) -> dict[str, Callable]:
    """Imports job modules; like `celery -A`, from the current directory too
    (absolute, so executor children, which inherit sys.path, find them)."""
    here = os.getcwd()
    if modules and here not in sys.path:
        sys.path.insert(0, here)
    for name in modules:
        importlib.import_module(name)
    return JOBS


def as_bytes(value) -> bytes:
    if isinstance(value, bytes):
        return value
    if value is None:
        return b""
    return str(value).encode()


@job("square")
def square(payload: bytes) -> str:
    """The sample's job: n -> "n * n = n²"."""
    n = int(payload.decode().strip())
    return f"{n} * {n} = {n * n}"


@job("sleep")
def sleep(payload: bytes) -> str:
    """Sleeps for the given number of seconds (for demos and timeouts)."""
    seconds = float(payload.decode().strip() or "1")
    time.sleep(seconds)
    return f"slept {seconds:g} s"
