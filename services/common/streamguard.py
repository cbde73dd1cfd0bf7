"""Streams end when their caller loses access. A stream may stay open for
hours while nothing flows on it (a worker's Connect, a result subscriber, a
health Watch), so its caller is checked against the access file again every
RECHECK_SECONDS: one whose credential was revoked, or whose identity changed
(another name, other kinds), has the stream ended with the reason.

Threaded servers: one thread checks every open stream and ends one by running
the callbacks its handler registered (context.add_callback: they stop what
the handler waits for). Asyncio servers: a task per stream, which cancels the
handler's task. A handler that registers no callback and waits for its
caller (server reflection, threaded) ends at the caller's next request."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from dworkers.common.auth import Authorizer, Identity
from dworkers.common.errors import DworkersError, PermissionDenied
from dworkers.common.lifecycle import Once

RECHECK_SECONDS = 1.0
log = logging.getLogger(__name__)


class Watched:
    """One open stream: its caller as admitted, and why it was ended, if it was."""

    def __init__(self, authorizer: Authorizer, full_method: str, context, admitted: Identity | None):
        self.authorizer = authorizer
        self.full_method = full_method
        self.context = context
        self.admitted = admitted
        self.denied: DworkersError | None = None
        self.callbacks: list[Once] = []

    def denial(self) -> DworkersError | None:
        """Why the caller may no longer hold the stream, or None."""
        try:
            identity = self.authorizer.check(self.full_method, self.context)
        except DworkersError as error:
            return error
        was = self.admitted
        if was is not None and (identity is None or (identity.name, identity.kinds) != (was.name, was.kinds)):
            return PermissionDenied(f"the access file changed what {was.name} may do: call again")
        return None

    def end(self, reason: DworkersError) -> None:
        self.denied = reason
        for callback in list(self.callbacks):
            callback()


class ThreadGuard:
    """Checks the open streams of a threaded server from one thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[Watched] = set()
        self._thread: threading.Thread | None = None

    def watch(self, watched: Watched) -> _GuardedContext:
        """Starts checking a stream; returns the context its handler gets."""
        with self._lock:
            self._open.add(watched)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stream-guard", daemon=True)
                self._thread.start()
        return _GuardedContext(watched)

    def forget(self, watched: Watched) -> None:
        with self._lock:
            self._open.discard(watched)

    def _run(self) -> None:
        while True:
            time.sleep(RECHECK_SECONDS)
            with self._lock:
                streams = list(self._open)
            for watched in streams:
                if watched.denied is not None:
                    continue
                reason = watched.denial()
                if reason is not None:
                    self.forget(watched)
                    log.info("stream %s ended: %s", watched.full_method, reason)
                    watched.end(reason)


class _GuardedContext:
    """The handler's context, keeping the callbacks it registers so that
    the guard can run them (once: gRPC runs them too when the call ends)."""

    def __init__(self, watched: Watched):
        self._watched = watched
        self._context = watched.context

    def __getattr__(self, name):
        return getattr(self._context, name)

    def add_callback(self, callback) -> bool:
        once = Once(callback)
        self._watched.callbacks.append(once)
        added = self._context.add_callback(once)
        if self._watched.denied is not None:  # ended before the handler got here
            once()
        return added


def guard_task(watched: Watched) -> asyncio.Task:
    """Checks a stream of an asyncio server; cancels the calling task (the
    handler's) when the caller lost access. Cancel the returned task when
    the stream ends."""
    handler = asyncio.current_task()
    assert handler is not None  # called from the handler's task

    async def check_forever() -> None:
        while True:
            await asyncio.sleep(RECHECK_SECONDS)
            reason = watched.denial()
            if reason is not None:
                log.info("stream %s ended: %s", watched.full_method, reason)
                watched.denied = reason
                handler.cancel()
                return
    return asyncio.ensure_future(check_forever())
