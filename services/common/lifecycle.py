"""Stopping a service process: installed first thing, whatever the process is
doing (waiting for ZooKeeper included).

The first SIGTERM or SIGINT asks the process to stop: it runs the stop
callbacks and starts a deadline of the grace period plus a margin, after
which the process exits anyway. Another signal a second or more later exits
at once (one sooner is the same request arriving twice, e.g. Ctrl-C reaching
a whole process group and its supervisor passing it on).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

EXIT_OVERDUE = 1
REPEAT_SECONDS = 1.0  # a signal sooner than this after the first is the same request
WAKE_UP_SECONDS = 0.2  # how late a signal caught by another thread may be handled


class StopRequest:
    def __init__(self, grace: float, margin: float = 5.0):
        self.deadline_seconds = grace + margin
        self.requested = threading.Event()
        self._first = 0.0
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Calls `callback` (from the signal handler: keep it short) when a
        stop is requested, at once if it already was."""
        with self._lock:
            self._callbacks.append(callback)
            requested = self.requested.is_set()
        if requested:
            callback()

    def wait(self, timeout: float | None = None) -> bool:
        """Waits for a stop request. Wakes up every so often: a signal the
        kernel delivered to another thread is handled only once the main
        thread runs Python code, which a wait with no timeout never does."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = WAKE_UP_SECONDS if deadline is None else min(WAKE_UP_SECONDS, deadline - time.monotonic())
            if step <= 0:
                return self.requested.is_set()
            if self.requested.wait(step):
                return True

    def _on_signal(self, signum: int, _frame) -> None:
        if self.requested.is_set():
            if time.monotonic() - self._first < REPEAT_SECONDS:
                return
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            _exit(128 + signum)
        log.info("%s: stopping (at most %.0f s)", signal.Signals(signum).name, self.deadline_seconds)
        self._first = time.monotonic()
        self.requested.set()
        timer = threading.Timer(self.deadline_seconds, self._overdue)
        timer.daemon = True
        timer.start()
        with self._lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback()

    def _overdue(self) -> None:
        log.error("did not stop within %.0f s: exiting anyway", self.deadline_seconds)
        _exit(EXIT_OVERDUE)


def _exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


class Once:
    """Calls `func` the first time it is called, never again (from any thread)."""

    def __init__(self, func: Callable[[], object]) -> None:
        self._func = func
        self._lock = threading.Lock()
        self._done = False

    def __call__(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self._func()
