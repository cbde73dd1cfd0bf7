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
from dataclasses import dataclass, field
from typing import Any

from dworkers import codec
from dworkers.common.limits import (
    MAX_ATTEMPTS_LIMIT,
    MAX_BACKOFF_MULTIPLIER,
    MAX_DELAY_SECONDS,
    MAX_PRIORITY,
    MAX_RATE_LIMIT,
    MAX_TIMEOUT_SECONDS,
)


class Permanent(Exception):
    """Raised by a job (or raise ... from it) when retrying cannot help: the
    work ends FAILED after this attempt, whatever attempts it has left."""


HEARTBEAT_INTERVAL = 0.2  # a job's heartbeats leave at most this often (the others are dropped)
MAX_DETAILS_CHARS = 1024


@dataclass
class Context:
    """What a running job may know about its work, and how it says it is alive."""

    work_id: str
    kind: str
    attempt: int  # 1 for the first attempt
    deadline: float  # time.time() past which the attempt counts as timed out (renewed by heartbeats)
    heartbeat_timeout: float = 0.0  # > 0: the lease each heartbeat renews
    _beat: Callable[[float | None, str], None] | None = field(default=None, repr=False)
    _last_beat: float = field(default=0.0, repr=False)

    @property
    def remaining(self) -> float:
        return max(0.0, self.deadline - time.time())

    def heartbeat(self, progress: float | None = None, details: str = "") -> None:
        """Says the job is alive, and how far it got (`progress` from 0 to 1,
        `details` up to 1,024 characters): GetWork, ClusterInfo and `dworkers
        status` show them. With a heartbeat_timeout, each one renews the
        attempt's lease, so a long job needs no long timeout. Cheap: at most
        five a second leave the job's process; the others are dropped."""
        if progress is not None and not 0 <= progress <= 1:
            raise ValueError(f"progress must be between 0 and 1, not {progress!r}")
        now = time.monotonic()
        if self._beat is None or now - self._last_beat < HEARTBEAT_INTERVAL:
            return
        self._last_beat = now
        if self.heartbeat_timeout:
            self.deadline = max(self.deadline, time.time() + self.heartbeat_timeout)
        self._beat(progress, str(details)[:MAX_DETAILS_CHARS])


@dataclass(frozen=True)
class Call:
    """One attempt of a work, as an executor receives it."""

    kind: str
    payload: bytes
    content_type: str = ""
    work_id: str = ""
    attempt: int = 1
    deadline: float = 0.0
    heartbeat_timeout: float = 0.0


class Job:
    """A registered job: call it directly like the function, or `.submit(...)`
    it to a cluster through a client (see dworkers.Client)."""

    def __init__(self, kind: str, func: Callable, max_attempts: int = 0, timeout: float = 0.0,
                 priority: int = 0, backoff: tuple[float, float, float] | None = None,
                 retry_for: tuple[type[BaseException], ...] = (Exception,), heartbeat_timeout: float = 0.0,
                 rate_limit: float = 0.0):
        self.kind, self.func = kind, func
        self.max_attempts, self.timeout, self.heartbeat_timeout = max_attempts, timeout, heartbeat_timeout
        self.priority, self.backoff, self.retry_for = priority, backoff, retry_for
        self.rate_limit = rate_limit
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

    def retries(self, error: BaseException) -> bool:
        """Whether an attempt that raised `error` is worth retrying."""
        return not isinstance(error, Permanent) and isinstance(error, self.retry_for)

    def run(self, call: Call, loop: asyncio.AbstractEventLoop | None = None,
            beat: Callable[[float | None, str], None] | None = None) -> tuple[bytes, str]:
        """Runs one attempt; returns the result's bytes and content type.
        `beat` carries the job's heartbeats to its worker."""
        args, kwargs = codec.decode_call(call.payload, call.content_type)
        if self.wants_context:
            kwargs["ctx"] = Context(call.work_id, call.kind, call.attempt, call.deadline, call.heartbeat_timeout,
                                    beat)
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


def job(kind: str, *, max_attempts: int = 0, timeout: float = 0.0, priority: int = 0,
        backoff: tuple[float, float, float] | tuple[float, float] | None = None,
        retry_for: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        heartbeat_timeout: float = 0.0, rate_limit: float = 0.0):
    """Registers the decorated function as the job for `kind`. `max_attempts`,
    `timeout` (seconds per attempt), `priority` (higher first) and `backoff`
    ((initial, multiplier[, max]) seconds between failed attempts: the n-th
    retry waits initial * multiplier^(n-1), at most max, jittered into its
    upper half) and `heartbeat_timeout` (seconds an attempt may go without
    ctx.heartbeat(), instead of a timeout) become the defaults of works of
    this kind that set none, however submitted: workers declare them to the
    master (0 and None: the cluster's defaults, and retries at once). An
    attempt that raises an error outside `retry_for`, or `Permanent`, is
    not retried. `rate_limit`: at most this many works of the kind start
    per second across the cluster (an admin's SetRateLimit overrides it)."""

    if not 0 <= max_attempts <= MAX_ATTEMPTS_LIMIT:
        raise ValueError(f"@job({kind!r}): max_attempts must be between 0 and {MAX_ATTEMPTS_LIMIT}")
    if not 0 <= timeout <= MAX_TIMEOUT_SECONDS:  # NaN fails too
        raise ValueError(f"@job({kind!r}): timeout must be between 0 and {MAX_TIMEOUT_SECONDS:.0f} seconds")
    if not 0 <= rate_limit <= MAX_RATE_LIMIT:
        raise ValueError(f"@job({kind!r}): rate_limit must be between 0 (none) and {MAX_RATE_LIMIT:.0f} per second")
    if not 0 <= heartbeat_timeout <= MAX_TIMEOUT_SECONDS:
        raise ValueError(f"@job({kind!r}): heartbeat_timeout must be between 0 and {MAX_TIMEOUT_SECONDS:.0f} seconds")
    if not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
        raise ValueError(f"@job({kind!r}): priority must be between -{MAX_PRIORITY} and {MAX_PRIORITY}")
    backoff_values = _backoff(kind, backoff)
    retry_types = retry_for if isinstance(retry_for, tuple) else (retry_for,)

    def register(func) -> Job:
        registered = Job(kind, func, max_attempts, timeout, priority, backoff_values, retry_types, heartbeat_timeout,
                         rate_limit)
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


def _backoff(kind: str, backoff) -> tuple[float, float, float] | None:
    if backoff is None:
        return None
    values = tuple(float(v) for v in backoff)
    if len(values) == 2:
        values = (*values, 0.0)
    if len(values) != 3 or not (0 < values[0] <= MAX_DELAY_SECONDS and 1 <= values[1] <= MAX_BACKOFF_MULTIPLIER
                                and 0 <= values[2] <= MAX_DELAY_SECONDS):
        raise ValueError(f"@job({kind!r}): backoff is (initial, multiplier[, max]) seconds: initial above 0, "
                         f"multiplier from 1 to {MAX_BACKOFF_MULTIPLIER:g}, max 0 (none) or up to "
                         f"{MAX_DELAY_SECONDS:.0f}")
    return values


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
