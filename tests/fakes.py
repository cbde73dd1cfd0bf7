"""Fakes for in-process tests of one component's own logic."""

from __future__ import annotations

import concurrent.futures

import grpc

from dworkers.master.journal import Journal


class HeldJournal(Journal):
    """A journal whose appends wait until the test settles them, in order."""

    def __init__(self):
        self.pending: list[tuple[int, concurrent.futures.Future]] = []

    def append(self, position, batch):
        future = concurrent.futures.Future()
        self.pending.append((position, future))
        return future

    def settle_first(self, result=None) -> None:
        """Settles the oldest append: durable at its position, or `result` if
        it is an exception."""
        position, future = self.pending.pop(0)
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(position if result is None else result)

    def settle(self, error: Exception | None = None) -> None:
        while self.pending:
            self.settle_first(error)

    def read(self, after=-1):
        return iter(())

    def discard_after(self, position):
        pass

    def write_snapshot(self, position, data):
        raise NotImplementedError

    def read_snapshot(self):
        return None

    def compact(self):
        return 0


class Failed(grpc.RpcError):
    """A call's failure, as a scripted peer raises it."""

    def __init__(self, code: grpc.StatusCode):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return self._code.name
