"""Jobs: Python callables registered by kind with `@job`.

A job is called with the arguments the work was submitted with (JSON), or
with its payload when it was submitted as bytes (or str as text); it returns
bytes, a str or a JSON value. `async def` jobs are awaited. A job with a
parameter named `ctx` also gets the work's Context (id, attempt, deadline).
Load job modules with `dworkers worker --jobs package.module`: the module
registers its jobs when imported."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dworkers import codec
from dworkers.common.limits import MAX_ATTEMPTS_LIMIT, MAX_TIMEOUT_SECONDS


@dataclass(frozen=True)
class Context:
    """What a running job may know about its work."""

    work_id: str
    kind: str
    attempt: int  # 1 for the first attempt
    deadline: float  # time.time() past which the attempt counts as timed out

    @property
    def remaining(self) -> float:
        return max(0.0, self.deadline - time.time())


@dataclass(frozen=True)
class Call:
    """One attempt of a work, as an executor receives it."""

    kind: str
    payload: bytes
    content_type: str = ""
    work_id: str = ""
    attempt: int = 1
    deadline: float = 0.0


class Job:
    """A registered job: call it directly like the function, or `.submit(...)`
    it to a cluster through a client (see dworkers.Client)."""

    def __init__(self, kind: str, func: Callable, max_attempts: int = 0, timeout: float = 0.0):
        self.kind, self.func = kind, func
        self.max_attempts, self.timeout = max_attempts, timeout
        self.is_async = inspect.iscoroutinefunction(func)
        self.wants_context = "ctx" in inspect.signature(func).parameters
        self.__doc__, self.__name__ = func.__doc__, getattr(func, "__name__", kind)

    def __call__(self, *args, **kwargs):
        return self.func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<job {self.kind!r} {self.func!r}>"

    def submit(self, *args, client=None, **kwargs):
        """Submits a work of this job (JSON arguments) with the client given or
        the default one (dworkers.connect); returns its handle."""
        from dworkers.client import default_client

        return (client or default_client()).submit(self.kind, *args, **kwargs)

    def run(self, call: Call, loop: asyncio.AbstractEventLoop | None = None) -> tuple[bytes, str]:
        """Runs one attempt; returns the result's bytes and content type."""
        args, kwargs = codec.decode_call(call.payload, call.content_type)
        if self.wants_context:
            kwargs["ctx"] = Context(call.work_id, call.kind, call.attempt, call.deadline)
        if self.is_async:
            if loop is None:
                value = asyncio.run(self.func(*args, **kwargs))
            else:
                value = loop.run_until_complete(self.func(*args, **kwargs))
        else:
            value = self.func(*args, **kwargs)
            if inspect.iscoroutine(value):
                value.close()  # never awaited: say so instead of a warning in the log
        return codec.encode_result(value)


JOBS: dict[str, Job] = {}


def job(kind: str, *, max_attempts: int = 0, timeout: float = 0.0):
    """Registers the decorated function as the job for `kind`; `max_attempts`
    and `timeout` (seconds per attempt) become the defaults of works of this
    kind that set neither, however submitted: workers declare them to the
    master (0: the cluster's defaults)."""

    if not 0 <= max_attempts <= MAX_ATTEMPTS_LIMIT:
        raise ValueError(f"@job({kind!r}): max_attempts must be between 0 and {MAX_ATTEMPTS_LIMIT}")
    if not 0 <= timeout <= MAX_TIMEOUT_SECONDS:  # NaN fails too
        raise ValueError(f"@job({kind!r}): timeout must be between 0 and {MAX_TIMEOUT_SECONDS:.0f} seconds")

    def register(func) -> Job:
        registered = Job(kind, func, max_attempts, timeout)
        JOBS[kind] = registered
        return registered

    return register


def load(modules: list[str]) -> dict[str, Job]:
    """Imports job modules; like `celery -A`, from the current directory too
    (absolute, so executor children, which inherit sys.path, find them)."""
    here = os.getcwd()
    if modules and here not in sys.path:
        sys.path.insert(0, here)
    for name in modules:
        importlib.import_module(name)
    return JOBS


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@job("square")
def square(n: Any) -> Any:
    """The sample's job. Submitted as text or bytes ("3"): "3 * 3 = 9";
    submitted as JSON (square.submit(3)): 9."""
    if isinstance(n, (bytes, str)):
        number = int(_text(n).strip())
        return f"{number} * {number} = {number * number}"
    return n * n


@job("sleep")
def sleep(seconds: Any) -> str:
    """Sleeps for the given number of seconds (for demos and timeouts)."""
    if isinstance(seconds, (bytes, str)):
        seconds = _text(seconds).strip() or "1"
    seconds = float(seconds)
    time.sleep(seconds)
    return f"slept {seconds:g} s"
