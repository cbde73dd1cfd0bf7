"""Runs jobs apart from the worker's control loop.

`ProcessExecutor` (the default) runs them in a child process: an exception
becomes a failure with its message; a child that dies or runs past the
attempt's timeout is killed and replaced, and its work reported failed.
`ThreadExecutor` runs them on a thread of the worker process: far cheaper
for many slots or trivial jobs, but a hung job cannot be stopped (its
attempt still fails at the timeout) and a crash takes the worker down.

Both are driven the same way: `submit`, then wait until `connection` is
readable (multiprocessing.connection.wait over all slots), then `collect`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

from dworkers.worker import jobs
from dworkers.worker.jobs import Call

# spawn, not fork: the parent runs gRPC and ZooKeeper threads.
_CONTEXT = multiprocessing.get_context("spawn")
PR_SET_PDEATHSIG = 1
CANCELLED = "cancelled"


@dataclass(frozen=True)
class Outcome:
    ok: bool
    result: bytes = b""
    error: str = ""
    seconds: float = 0.0
    content_type: str = ""  # of the result
    permanent: bool = False  # a failure not worth retrying
    cancelled: bool = False  # stopped because its work was cancelled
    timed_out: bool = False  # stopped at its timeout (or lease)


@dataclass(frozen=True)
class Beat:
    """A running job's heartbeat (ctx.heartbeat): it is alive, this far along."""

    progress: float | None
    details: str


BEAT = "beat"  # first item of a heartbeat's message on an executor's pipe
TRACEBACK_FRAMES = 8  # the innermost frames an error keeps
TRACEBACK_CHARS = 3000


def describe(exc: BaseException) -> str:
    """`Type: message (at file:line)`, then the innermost frames of its
    traceback, bounded (the master keeps 4,096 characters of an error)."""
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    head = f"{type(exc).__name__}: {exc}"[:1000] + where
    if not frames:
        return head
    stack = "".join(traceback.format_list(frames[-TRACEBACK_FRAMES:]))
    if len(stack) > TRACEBACK_CHARS:
        stack = "..." + stack[-TRACEBACK_CHARS:]
    return f"{head}\nTraceback (innermost {min(len(frames), TRACEBACK_FRAMES)} of {len(frames)} frames):\n{stack}"


def _run_job(registry, call: Call, loop: asyncio.AbstractEventLoop | None, beat=None) -> tuple:
    """(True, result, content type) or (False, error, permanent)."""
    registered = registry.get(call.kind)
    try:
        if registered is None:
            raise LookupError(f"this worker has no job of kind {call.kind!r}")
        return (True, *registered.run(call, loop, beat))
    except Exception as exc:
        return False, describe(exc), registered is not None and not registered.retries(exc)


def _outcome(reply: tuple, seconds: float) -> Outcome | Beat:
    if reply[0] == BEAT:
        return Beat(reply[1], reply[2])
    if reply[0]:
        return Outcome(True, result=reply[1], content_type=reply[2], seconds=seconds)
    return Outcome(False, error=reply[1], seconds=seconds, permanent=reply[2])


def _die_with_parent() -> None:
    """On Linux, the kernel kills this child if the worker process dies,
    however it dies (a job that hangs must not outlive its worker)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the child still ends when its pipe closes, between jobs


def _child_main(connection, job_modules: list[str]) -> None:
    _die_with_parent()
    registry = jobs.load(job_modules)
    loop = asyncio.new_event_loop()  # one for the child's life: async jobs may keep loop-bound clients
    sending = threading.Lock()  # a job may beat from its own threads

    def beat(progress, details) -> None:
        with sending:
            connection.send((BEAT, progress, details))

    while True:
        try:
            call = connection.recv()
        except (EOFError, KeyboardInterrupt):
            return
        reply = _run_job(registry, call, loop, beat)
        with sending:
            connection.send(reply)


_MAIN_LOCK = threading.Lock()


@contextlib.contextmanager
def _main_hidden():
    """spawn re-imports the parent's __main__ in every child before it runs
    anything: here the whole command line tool, with the gRPC, ZooKeeper and
    PostgreSQL clients (tens of MB per job process). A job process needs only
    this module and the job modules, so the main module is hidden while a
    child starts."""
    main = sys.modules.get("__main__")
    with _MAIN_LOCK:
        if main is None:
            yield
            return
        hidden: dict[str, object] = {name: main.__dict__.pop(name) for name in ("__spec__", "__file__")
                                     if name in main.__dict__}
        main.__spec__ = None
        try:
            yield
        finally:
            del main.__spec__
            main.__dict__.update(hidden)


class ProcessExecutor:
    """One child process, one job at a time."""

    def __init__(self, job_modules: list[str]):
        self.job_modules = job_modules
        self._process: multiprocessing.process.BaseProcess | None = None
        self.connection: Connection | None = None
        self._started = 0.0
        self._starting = threading.Lock()  # start() runs from a starter thread and from submit()

    def start(self) -> None:
        with self._starting:
            if self._process is not None and self.connection is not None:
                return
            parent, child = _CONTEXT.Pipe()
            process = _CONTEXT.Process(target=_child_main, args=(child, self.job_modules), daemon=True)
            with _main_hidden():
                process.start()
            child.close()
            self._process, self.connection = process, parent

    def submit(self, call: Call) -> Outcome | None:
        """Starts a job; returns an outcome at once only if it could not start."""
        self._started = time.perf_counter()
        try:
            self.start()
            connection = self.connection
            if connection is None:  # closed by a timeout on another thread meanwhile
                return self._died()
            connection.send(call)
        except (OSError, ValueError):
            return self._died()
        return None

    def collect(self) -> Outcome | Beat:
        """The finished job's outcome, or a heartbeat of the running one (call
        when `connection` is readable)."""
        connection = self.connection
        if connection is None:
            return self._died()
        try:
            reply = connection.recv()
        except (EOFError, OSError):
            return self._died()
        return _outcome(reply, time.perf_counter() - self._started)

    def timed_out(self, timeout: float) -> Outcome:
        self.close()
        return Outcome(False, error=f"timed out after {timeout:g} s; executor killed",
                       seconds=time.perf_counter() - self._started, timed_out=True)

    def cancelled(self) -> Outcome:
        """Stops the running job: its child is killed (a new one starts for the next)."""
        self.close()
        return Outcome(False, error=CANCELLED, seconds=time.perf_counter() - self._started, cancelled=True)

    def _died(self) -> Outcome:
        process = self._process
        if process is not None:
            process.join(timeout=1)
        code = process.exitcode if process is not None else None
        self.close()
        return Outcome(False, error=f"executor process died (exit code {code})",
                       seconds=time.perf_counter() - self._started)

    def close(self) -> None:
        """Kills the child (safe from any thread, any number of times)."""
        connection, self.connection = self.connection, None
        process, self._process = self._process, None
        if connection is not None:
            connection.close()
        if process is not None:
            if process.is_alive():
                process.kill()
            process.join(timeout=5)


class ThreadExecutor:
    """Runs each job on a thread of the worker process."""

    def __init__(self, job_modules: list[str]):
        self.registry = jobs.load(job_modules)
        self.connection, self._sender = multiprocessing.Pipe(duplex=False)
        self._started = 0.0
        self._generation = 0  # a job abandoned at its timeout must not report later
        self._lock = threading.Lock()

    def start(self) -> None:
        pass

    def submit(self, call: Call) -> Outcome | None:
        self._started = time.perf_counter()
        self._generation += 1
        generation = self._generation

        def send(message) -> None:
            with self._lock:
                if generation == self._generation:
                    try:
                        self._sender.send(message)
                    except OSError:
                        pass

        def run() -> None:
            send(_run_job(self.registry, call, None, lambda progress, details: send((BEAT, progress, details))))

        threading.Thread(target=run, daemon=True, name=f"job-{call.kind}").start()
        return None

    def collect(self) -> Outcome | Beat:
        return _outcome(self.connection.recv(), time.perf_counter() - self._started)

    def timed_out(self, timeout: float) -> Outcome:
        with self._lock:  # the thread cannot be stopped: forget it and anything it sent
            self._generation += 1
            while self.connection.poll():
                self.connection.recv()
        return Outcome(False, error=f"timed out after {timeout:g} s (the job's thread was abandoned)",
                       seconds=time.perf_counter() - self._started, timed_out=True)

    def cancelled(self) -> Outcome:
        """A thread cannot be stopped: the job is abandoned (it runs on, unseen)."""
        self.timed_out(0)
        return Outcome(False, error=CANCELLED + " (the job's thread was abandoned)",
                       seconds=time.perf_counter() - self._started, cancelled=True)

    def close(self) -> None:
        with self._lock:
            self._generation += 1


EXECUTORS = {"process": ProcessExecutor, "thread": ThreadExecutor}
