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
        if was is None:
            return None
        if identity is None or identity.name != was.name or not _covers(identity.kinds, was.kinds):
            return PermissionDenied(f"the access file changed what {was.name} may do: call again")
        return None

    def end(self, reason: DworkersError) -> None:
        self.denied = reason
        for callback in list(self.callbacks):
            callback()


def _covers(kinds: frozenset[str] | None, before: frozenset[str] | None) -> bool:
    """A worker's allowed kinds still allow all it was allowed (a wider list
    keeps its stream; a narrower one makes it register again)."""
    return kinds is None or (before is not None and before <= kinds)


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
                try:
                    if watched.denied is None:
                        self._check(watched)
                except Exception:  # one stream's trouble must not end the checks of all
                    log.exception("checking the caller of %s failed", watched.full_method)

    def _check(self, watched: Watched) -> None:
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


def guard_task(watched: Watched, context) -> asyncio.Task:
    """Checks a stream of an asyncio server; once the caller lost access,
    cancels the calling task (the handler's) every RECHECK_SECONDS until the
    call ends (a handler may swallow one cancel). Ends with the call."""
    handler = asyncio.current_task()
    assert handler is not None  # called from the handler's task

    async def check_forever() -> None:
        while True:
            await asyncio.sleep(RECHECK_SECONDS)
            if watched.denied is None:
                try:
                    watched.denied = watched.denial()
                except Exception:
                    log.exception("checking the caller of %s failed", watched.full_method)
                    continue
                if watched.denied is not None:
                    log.info("stream %s ended: %s", watched.full_method, watched.denied)
            if watched.denied is not None:
                handler.cancel()
    task = asyncio.ensure_future(check_forever())
    context.add_done_callback(lambda _call: task.cancel())  # whatever becomes of the handler
    return task
