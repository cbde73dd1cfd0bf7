"""The asyncio client (grpc.aio): the same calls as dworkers.Client, awaited.

    async with dworkers.AsyncClient("127.0.0.1:7000") as client:
        handle = await client.submit("square", 3)
        await handle.result(timeout=10)   # 9

`submit` returns once the work is queued; a sender task batches queued
works into SubmitWorks calls (a few in flight), so many submissions share
each durable write. `await handle.accepted()` waits for the acknowledgement.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc

from dworkers import credentials
from dworkers.awaiting import AsyncAwaitStream
from dworkers.client import (
    BATCH_BYTES,
    BATCH_WORKS,
    CALLS_IN_FLIGHT,
    DEFAULT_TARGET,
    MAX_QUEUED_WORKS,
    RETRYABLE,
    STREAM_RETRYABLE,
    Feed,
    Feeds,
    Result,
    SubmitError,
    Unresolved,
    WatchCursor,
    as_call,
    left,
    split_done,
    submission,
)
from dworkers.common.errors import status_name
from dworkers.common.validation import MAX_BATCH_WORKS
from dworkers.credentials import Tls
from dworkers.v1 import frontend_pb2_grpc, work_pb2


def _forget(unacked: dict):
    """Done callback: drops a settled future from `unacked`, its error retrieved
    (a refused work whose handle nobody awaits is not an unhandled error)."""
    def done(future: asyncio.Future) -> None:
        unacked.pop(future, None)
        if not future.cancelled():
            future.exception()
    return done


class AsyncHandle:
    def __init__(self, client: AsyncClient, work_id: str, kind: str):
        self.id, self.kind = work_id, kind
        self._client = client
        self._accepted: asyncio.Future = asyncio.get_running_loop().create_future()
        self._result: Result | None = None

    def __repr__(self) -> str:
        return f"<AsyncHandle {self.id} {self.kind}>"

    async def accepted(self, timeout: float | None = None) -> bool:
        """True if the work was a duplicate; raises SubmitError if refused."""
        try:
            return await asyncio.wait_for(asyncio.shield(self._accepted), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"work {self.id} not acknowledged within {timeout:g} s") from None

    async def result(self, timeout: float | None = None) -> Any:
        """The job's return value; raises WorkFailed or TimeoutError."""
        if self._result is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            await self.accepted(timeout)
            await self._client._resolve(self, deadline)
        assert self._result is not None
        return self._result.unwrap()

    async def status(self) -> work_pb2.WorkStatus:
        """The work's state now (GetWork), once it is accepted."""
        await self.accepted(self._client.timeout)
        return await self._client.status(self.id)

    async def cancel(self) -> work_pb2.WorkStatus:
        """Cancels the work (see Client.cancel)."""
        await self.accepted()
        return (await self._client.cancel(self.id))[0]

    def done(self) -> bool:
        return self._result is not None


class AsyncClient:
    def __init__(self, target: str | None = None, *, timeout: float = 30.0, tls: Tls | bool | None = None,
                 token: str | None = None):
        """`tls` and `token` as for Client."""
        self.target = target or os.environ.get("DWORKERS_FRONTEND", DEFAULT_TARGET)
        self.timeout = timeout
        self._channel = credentials.channel(self.target, tls, aio=True, token=token)
        self.stub = frontend_pb2_grpc.FrontendStub(self._channel)
        self._queue: asyncio.Queue[tuple[AsyncHandle, work_pb2.SubmitWorkRequest]] = asyncio.Queue(MAX_QUEUED_WORKS)
        self._in_flight = asyncio.Semaphore(CALLS_IN_FLIGHT)
        self._calls: set[asyncio.Task] = set()
        self._unacked: dict[asyncio.Future, str] = {}  # -> its work id
        self._unresolved = Unresolved()
        self._covering: dict[str, Feed] = {}  # id -> the running feed that waits for it (see Feeds)
        self._feeds: set[asyncio.Task] = set()
        self._results_came = asyncio.Condition()
        self._awaits = AsyncAwaitStream(self.stub, self._unresolved.to_read_ahead,
                                        lambda results: self._unresolved.store([Result.of(r) for r in results]))
        self._closed = False
        self._sender = asyncio.get_running_loop().create_task(self._send_forever())

    async def submit(self, kind: str, *args, payload: bytes | bytearray | str | None = None,
                     **options) -> AsyncHandle:
        """As Client.submit; waits only while the queue of unacknowledged works is full."""
        if self._closed:
            raise RuntimeError("the client is closed")
        request = submission(kind, args, payload, options)
        handle = AsyncHandle(self, request.work_id, kind)
        await self._queue.put((handle, request))  # if this is cancelled, the work was never submitted
        self._unacked[handle._accepted] = handle.id
        handle._accepted.add_done_callback(_forget(self._unacked))
        return handle

    async def submit_many(self, kind: str, calls: Iterable[Any]) -> list[AsyncHandle]:
        return [await self.submit(kind, *args, payload=payload, **kwargs)
                for args, payload, kwargs in map(as_call, calls)]

    async def _send_forever(self) -> None:
        while True:
            batch = [await self._queue.get()]
            size = batch[0][1].ByteSize()
            while not self._queue.empty() and len(batch) < min(BATCH_WORKS, MAX_BATCH_WORKS):
                item = self._queue.get_nowait()
                batch.append(item)
                size += item[1].ByteSize()
                if size >= BATCH_BYTES:
                    break
            await self._in_flight.acquire()
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    async def _send(self, batch: list) -> None:
        request = work_pb2.SubmitWorksRequest(works=[r for _h, r in batch], each_on_its_own=True)
        deadline = time.monotonic() + self.timeout
        delay = 0.05
        try:
            while True:
                try:
                    response = await self.stub.SubmitWorks(request, timeout=max(0.1, deadline - time.monotonic()))
                except grpc.aio.AioRpcError as error:
                    if error.code() in RETRYABLE and time.monotonic() + delay < deadline:
                        await asyncio.sleep(delay)  # same ids: a retry is idempotent
                        delay = min(delay * 2, 1.0)
                        continue
                    for handle, _r in batch:
                        if not handle._accepted.done():
                            handle._accepted.set_exception(SubmitError(handle.id, error.code().name,
                                                                       error.details() or ""))
                    return
                for (handle, _r), answer in zip(batch, response.works):
                    if handle._accepted.done():
                        continue
                    if answer.code:
                        handle._accepted.set_exception(SubmitError(handle.id, status_name(answer.code),
                                                                   answer.message))
                    else:
                        handle._accepted.set_result(answer.duplicate)
                        self._unresolved.add(handle)
                return
        finally:
            self._in_flight.release()
            for handle, _r in batch:  # cancelled (the client closed): never leave a handle waiting
                if not handle._accepted.done():
                    handle._accepted.set_exception(SubmitError(handle.id, "CANCELLED", "the client was closed"))

    async def flush(self) -> None:
        """Waits until every submission so far is acknowledged (or failed)."""
        while self._unacked:
            await asyncio.wait(list(self._unacked))

    async def _resolve(self, handle: AsyncHandle, deadline: float | None) -> None:
        """As Client._resolve: waits on the client's result stream (see
        dworkers.awaiting); on a frontend without one, on a stream read ahead
        by a task (see dworkers.client.Feeds), or reads a lone handle's result
        itself."""
        if await self._awaits.wait(handle, deadline):
            return
        async with self._results_came:
            while handle._result is None:
                feed = self._covering.get(handle.id)
                if feed is None:
                    if len(self._feeds) >= Feeds.MAX_STREAMS:
                        break
                    ids = self._unresolved.to_read_ahead(handle, self._covering)
                    if len(ids) == 1:
                        break  # nothing to read ahead
                    feed = self._start_feed(ids)
                while handle._result is None and not feed.ended:
                    try:
                        await asyncio.wait_for(self._results_came.wait(), left(deadline))
                    except asyncio.TimeoutError:
                        raise TimeoutError(f"work {handle.id} not finished in time") from None
                if handle._result is None and feed.error is not None:
                    break  # perhaps another id made the call fail (e.g. past retention): ask alone
        if handle._result is None:
            async for results in self._wait_responses([handle.id], deadline):
                self._unresolved.store(results, handle)

    def _start_feed(self, ids: list[str]) -> Feed:
        feed = Feed(ids)
        for work_id in ids:
            self._covering[work_id] = feed
        task = asyncio.get_running_loop().create_task(self._read_feed(feed))
        self._feeds.add(task)
        task.add_done_callback(self._feeds.discard)
        return feed

    async def _read_feed(self, feed: Feed) -> None:
        """Gives the results of the feed's ids to their handles as they come."""
        try:
            async for results in self._wait_responses(feed.ids, None):
                self._unresolved.store(results)
                async with self._results_came:
                    for result in results:
                        if self._covering.get(result.work_id) is feed:
                            del self._covering[result.work_id]
                    self._results_came.notify_all()
        except asyncio.CancelledError:
            feed.error = RuntimeError("the client was closed")
            raise
        except Exception as exc:  # noqa: BLE001 - raised to whoever waits for these ids
            feed.error = exc
        finally:
            feed.ended = True
            for work_id in feed.ids:
                if self._covering.get(work_id) is feed:
                    del self._covering[work_id]
            async with self._results_came:
                self._results_came.notify_all()

    async def _wait(self, work_ids: list[str], deadline: float | None) -> AsyncIterator[Result]:
        async for results in self._wait_responses(work_ids, deadline):
            for result in results:
                yield result

    async def _wait_responses(self, work_ids: list[str], deadline: float | None) -> AsyncIterator[list[Result]]:
        remaining = set(work_ids)
        while remaining:
            timeout = left(deadline)
            if timeout == 0:
                raise TimeoutError(f"{len(remaining)} of {len(work_ids)} works not finished in time")
            stream = self.stub.WaitWorks(work_pb2.WaitWorksRequest(work_ids=sorted(remaining)), timeout=timeout)
            try:
                async for response in stream:
                    results = [Result.of(r) for r in response.results if r.work_id in remaining]
                    remaining.difference_update(r.work_id for r in results)
                    if results:
                        yield results
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise TimeoutError(f"{len(remaining)} of {len(work_ids)} works not finished in time") from None
                if error.code() not in STREAM_RETRYABLE:
                    raise
                await asyncio.sleep(0.1)
            finally:
                stream.cancel()

    async def as_completed(self, handles: Iterable[AsyncHandle],
                           timeout: float | None = None) -> AsyncIterator[AsyncHandle]:
        deadline = None if timeout is None else time.monotonic() + timeout
        done, by_id = split_done(handles)
        for handle in done:
            yield handle
        for handle in by_id.values():
            await handle.accepted(left(deadline))
        ids = list(by_id)
        for i in range(0, len(ids), MAX_BATCH_WORKS):
            async for result in self._wait(ids[i:i + MAX_BATCH_WORKS], deadline):
                handle = by_id[result.work_id]
                handle._result = result
                yield handle

    async def status(self, work_id: str) -> work_pb2.WorkStatus:
        return await self.stub.GetWork(work_pb2.GetWorkRequest(work_id=work_id), timeout=self.timeout)

    async def retry(self, *works: str | AsyncHandle) -> list[work_pb2.WorkStatus]:
        """As Client.retry."""
        ids = [w.id if isinstance(w, AsyncHandle) else w for w in works]
        response = await self.stub.RetryWork(work_pb2.RetryWorkRequest(work_ids=ids), timeout=self.timeout)
        for work in works:
            if isinstance(work, AsyncHandle):
                work._result = None
        return list(response.works)

    async def list_works(self, state: str | int, kind: str = "", page_size: int = 100
                         ) -> AsyncIterator[work_pb2.WorkStatus]:
        """As Client.list_works."""
        which = work_pb2.State.Value(state.upper()) if isinstance(state, str) else state
        token = ""
        while True:
            page = await self.stub.ListWorks(work_pb2.ListWorksRequest(state=which, kind=kind, page_token=token,
                                                                       page_size=page_size), timeout=self.timeout)
            for work in page.works:
                yield work
            token = page.next_page_token
            if not token:
                return

    async def set_rate_limit(self, kind: str, per_second: float | None) -> work_pb2.KindInfo:
        """As Client.set_rate_limit."""
        request = work_pb2.SetRateLimitRequest(kind=kind)
        if per_second is not None:
            request.per_second = per_second
        return await self.stub.SetRateLimit(request, timeout=self.timeout)

    async def cancel(self, *works: str | AsyncHandle) -> list[work_pb2.WorkStatus]:
        """As Client.cancel."""
        ids = [w.id if isinstance(w, AsyncHandle) else w for w in works]
        response = await self.stub.CancelWork(work_pb2.CancelWorkRequest(work_ids=ids), timeout=self.timeout)
        return list(response.works)

    async def watch(self, after: int = 0, resume_token: str = "") -> AsyncIterator[Result]:
        cursor = WatchCursor(after, resume_token)
        while True:
            stream = self.stub.WatchResults(cursor.request())
            try:
                async for response in stream:
                    for result in cursor.fresh(response):
                        yield result
            except grpc.aio.AioRpcError as error:
                if error.code() not in STREAM_RETRYABLE:
                    raise
                await asyncio.sleep(0.2)
            finally:
                stream.cancel()

    async def close(self) -> None:
        """Waits for submissions in flight to be acknowledged, then closes."""
        self._closed = True
        try:
            await asyncio.wait_for(self.flush(), self.timeout)
        finally:
            self._sender.cancel()
            await self._awaits.close()
            for call in [*self._calls, *self._feeds]:
                call.cancel()
            await self._channel.close()
            while not self._queue.empty():  # never sent
                handle, _r = self._queue.get_nowait()
                if not handle._accepted.done():
                    handle._accepted.set_exception(SubmitError(handle.id, "CANCELLED", "the client was closed"))
            for future, work_id in list(self._unacked.items()):
                if not future.done():
                    future.set_exception(SubmitError(work_id, "CANCELLED", "the client was closed"))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
