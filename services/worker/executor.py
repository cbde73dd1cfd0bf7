"""Runs jobs in a child process kept apart from the worker's control loop.

An exception in the job becomes a failure with its message; a child that
dies or runs past the attempt's timeout is killed and replaced, and its work
reported failed.
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
from dataclasses import dataclass

# spawn, not fork: the parent runs gRPC and ZooKeeper threads.
_CONTEXT = multiprocessing.get_context("spawn")


@dataclass(frozen=True)
class Outcome:
    ok: bool
    result: bytes = b""
    error: str = ""
    seconds: float = 0.0


def _child_main(connection, job_modules: list[str]) -> None:
    from services.worker import jobs

    registry = jobs.load(job_modules)
    while True:
        try:
            kind, payload = connection.recv()
        except (EOFError, KeyboardInterrupt):
            return
        func = registry.get(kind)
        try:
            if func is None:
                raise LookupError(f"this worker has no job of kind {kind!r}")
            connection.send((True, jobs.as_bytes(func(payload))))
        except Exception as exc:
            last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
            where = f" (at {last[0].filename}:{last[0].lineno})" if last else ""
            connection.send((False, f"{type(exc).__name__}: {exc}{where}"))


class Executor:
    """One child process, one job at a time."""

    def __init__(self, job_modules: list[str]):
        self.job_modules = job_modules
        self._process = None
        self._connection = None

    def _ensure(self) -> None:
        if self._process is not None and self._process.is_alive():
            return
        self.close()
        parent, child = _CONTEXT.Pipe()
        self._process = _CONTEXT.Process(target=_child_main, args=(child, self.job_modules), daemon=True)
        self._process.start()
        child.close()
        self._connection = parent

    def run(self, kind: str, payload: bytes, timeout: float) -> Outcome:
        started = time.perf_counter()
        try:
            self._ensure()
            self._connection.send((kind, payload))
            if not self._connection.poll(timeout):
                self.close()
                return Outcome(False, error=f"timed out after {timeout:g} s; executor killed",
                               seconds=time.perf_counter() - started)
            ok, value = self._connection.recv()
        except (EOFError, OSError, BrokenPipeError, AttributeError):
            process = self._process
            if process is not None:
                process.join(timeout=1)
            code = process.exitcode if process is not None else None
            self.close()
            return Outcome(False, error=f"executor process died (exit code {code})",
                           seconds=time.perf_counter() - started)
        seconds = time.perf_counter() - started
        return Outcome(True, result=value, seconds=seconds) if ok else Outcome(False, error=value, seconds=seconds)

    def close(self) -> None:
        """Kills the child (safe from any thread, any number of times)."""
        connection, self._connection = self._connection, None
        process, self._process = self._process, None
        if connection is not None:
            connection.close()
        if process is not None:
            if process.is_alive():
                process.kill()
            process.join(timeout=5)
