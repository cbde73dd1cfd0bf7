"""One AwaitResults stream: the works a frontend waits for on behalf of all
of its callers, over one long-lived stream instead of a WaitWorks call each.
Requests add ids (or forget them); each awaited work's result goes out once,
as soon as it is durable; ids this master cannot answer for go back refused,
before the results of the same request."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from dworkers.common import validation
from dworkers.common.errors import NotServing
from dworkers.master.shell import MasterShell, Moved, not_found
from dworkers.v1 import work_pb2

MAX_AWAITED = 2_000_000  # ids one stream waits for at once (a frontend's 128 WaitWorks calls of 10,000 fit)

_ABORTED = grpc.StatusCode.ABORTED.value[0]
_NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


class Ended:
    """The request side ended: cleanly (error None) or refused."""

    def __init__(self, error: Exception | None = None):
        self.error = error


class AwaitStream:
    def __init__(self, shell: MasterShell, takes: Callable[[str], bool], wrong_shard: Callable[[str], Exception]):
        self.shell = shell
        self.takes = takes  # whether this shard answers for the id (not another's, not moving away)
        self.wrong_shard = wrong_shard
        self.queue: asyncio.Queue = asyncio.Queue()  # results, Moved, refusals, Ended, None (master stopped)
        self.awaited: set[str] = set()

    def request(self, request: work_pb2.AwaitRequest) -> None:
        """Takes one request: its refusals and the results ready go on the queue."""
        validation.check_await(request)
        forget = set(request.forget)
        if forget:
            self.awaited.difference_update(forget)
            self.shell.forget_waits(self.queue, forget)
        refused, taken = [], []
        room = MAX_AWAITED - len(self.awaited)
        for work_id in dict.fromkeys(request.work_ids):
            if work_id in forget or work_id in self.awaited:
                continue
            if not self.takes(work_id):
                refused.append(work_pb2.WorkRefusal(work_id=work_id, code=_ABORTED,
                                                      message=str(self.wrong_shard(work_id))))
            elif room <= 0:
                refused.append(work_pb2.WorkRefusal(work_id=work_id, code=_EXHAUSTED, message=(
                    f"this stream already awaits {MAX_AWAITED:,} works: wait for fewer at once")))
            else:
                taken.append(work_id)
                room -= 1
        ready, unknown = self.shell.await_works(self.queue, taken)
        self.awaited.update(taken)
        self.awaited.difference_update(unknown)
        refused += [work_pb2.WorkRefusal(work_id=w, code=_NOT_FOUND, message=not_found([w])) for w in unknown]
        for item in (*refused, *ready):
            self.queue.put_nowait(item)

    def end(self, error: Exception | None = None) -> None:
        self.queue.put_nowait(Ended(error))

    async def responses(self):
        """The stream's messages, until its request side ends; raises what
        ended it otherwise (the master stopped, a malformed request)."""
        shell = self.shell
        while True:
            items = [await self.queue.get()]
            while not self.queue.empty() and len(items) < 500:
                items.append(self.queue.get_nowait())
            results: list[work_pb2.WorkResult] = []
            refused: list[work_pb2.WorkRefusal] = []
            ended: Ended | None = None
            for item in items:
                if item is None:
                    raise NotServing(shell.closed or "master stopped")
                if isinstance(item, Ended):
                    ended = item
                    break
                work_id = item.work_id
                if work_id not in self.awaited and not isinstance(item, work_pb2.WorkRefusal):
                    continue  # forgotten meanwhile, or sent already
                self.awaited.discard(work_id)
                if isinstance(item, Moved):
                    refused.append(work_pb2.WorkRefusal(work_id=work_id, code=_ABORTED, message=(
                        f"work {work_id!r} moved to another shard: ask it there")))
                elif isinstance(item, work_pb2.WorkRefusal):
                    refused.append(item)
                else:
                    results.append(item)
            if refused:  # first, and apart: results fill a message on their own
                yield work_pb2.AwaitResponse(refused=refused, epoch=shell.epoch, cluster_id=shell.cluster_id)
            while results:
                batch = await shell.stream_batch(results)
                del results[:len(batch)]
                yield work_pb2.AwaitResponse(results=batch, epoch=shell.epoch, cluster_id=shell.cluster_id)
            if ended is not None:
                if ended.error is not None:
                    raise ended.error
                return

    def close(self) -> None:
        self.shell.forget_waits(self.queue, self.awaited)
        self.awaited.clear()
