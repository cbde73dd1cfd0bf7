"""Proof that this backend still leads, for reads.

A write proves it by its fenced multi-op; a read has no write to carry the
proof. A master resumed after a pause past its session believes it leads
until ZooKeeper tells it otherwise, and must not answer from stale state in
the meantime. So a read, after taking its answer, waits for a check that
started after it: ZooKeeper's `sync` and then `exists` on the election znode,
owned by this session. One check serves every read that arrived before it
started.
"""

from __future__ import annotations

import asyncio

from kazoo.client import KazooClient

CHECK_TIMEOUT = 2.0


class NotLeading(Exception):
    """This backend's election znode is gone, or not its own."""


class LeadershipCheck:
    def __init__(self, client: KazooClient):
        self.client = client
        self._current: asyncio.Future | None = None  # the check in flight
        self._next: asyncio.Future | None = None  # the check that starts when it ends

    async def confirm(self, node: str) -> None:
        """Returns once a check that started after this call saw `node` held by
        this session; raises otherwise."""
        loop = asyncio.get_running_loop()
        if self._current is None:
            self._current = loop.create_future()
            self._issue(node, self._current)
            waiter = self._current
        else:  # the check in flight may have started before this read
            if self._next is None:
                self._next = loop.create_future()
            waiter = self._next
        await asyncio.wait_for(asyncio.shield(waiter), CHECK_TIMEOUT)

    def _issue(self, node: str, future: asyncio.Future) -> None:
        loop = future.get_loop()
        try:
            self.client.sync_async(node.rsplit("/", 1)[0])  # then `exists` reads the leader's view
            check = self.client.exists_async(node)
        except Exception as exc:  # e.g. the client is stopped
            loop.call_soon(self._finished, node, future, exc)
            return

        def done(result) -> None:
            outcome: Exception | None
            try:
                stat = result.get()
                session = self.client.client_id[0] if self.client.client_id else None
                outcome = None if stat is not None and stat.ephemeralOwner == session else NotLeading(
                    "this backend's election znode is gone: it no longer leads")
            except Exception as exc:  # e.g. the connection or the session is lost
                outcome = exc
            loop.call_soon_threadsafe(self._finished, node, future, outcome)

        check.rawlink(done)

    def _finished(self, node: str, future: asyncio.Future, outcome: Exception | None) -> None:
        if not future.done():
            if outcome is None:
                future.set_result(None)
            else:
                future.set_exception(outcome)
                future.exception()  # retrieved: its readers may have timed out
        self._current, self._next = self._next, None
        if self._current is not None:
            self._issue(node, self._current)
