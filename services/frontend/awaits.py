"""WaitWorks calls served over one long-lived AwaitResults stream per shard.

Opening a result stream to the master for each WaitWorks call costs the
frontend and the master more than the results themselves (a submit-then-wait
caller opens one per work). Here every call registers its ids with its
shard's stream instead; the master answers each awaited id once, and the
result goes to every call waiting for it. When the stream breaks (a
failover, a restart) it is opened again, to the active master, asking for
every id still awaited: results are durable before they are sent, so the
new master has them.

A WaitWorks call whose reader falls behind by more than MAX_BUFFERED_BYTES,
and every call while the master does not offer AwaitResults (an older
version), waits on a stream of its own (WaitWorks), where gRPC's flow
control holds the master back instead of this frontend's memory. The
clients' own AwaitResults streams register here too, adding ids as they go.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import grpc

from dworkers.common import validation
from dworkers.common.errors import InvalidInput, NoMaster, NotFound, Overloaded, WrongShard
from dworkers.common.proxy import MasterProxy, StreamHandle
from dworkers.common.routing import Shards
from dworkers.common.validation import MAX_BATCH_WORKS
from dworkers.v1 import work_pb2

log = logging.getLogger(__name__)

MAX_BUFFERED_BYTES = 4 * 1024 * 1024  # results held for one call that reads slowly
RECONNECT_TIMEOUT = 30.0  # a stream broken this long fails the calls waiting on it
RETRY_UNSUPPORTED = 60.0  # seconds before asking a master without AwaitResults again (an upgrade may end)

_END = object()  # ends a stream's requests
_CANCELLED = object()  # the call's client left
_ON_ITS_OWN = object()  # the call waits on a stream of its own from now on
_ABORTED = grpc.StatusCode.ABORTED.value[0]
_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
_UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED.value[0]
_OWN_WAY = (_EXHAUSTED, _UNIMPLEMENTED)  # refused so, a WaitWorks call waits on a stream of its own
_REFUSALS = {grpc.StatusCode.ABORTED.value[0]: WrongShard, grpc.StatusCode.NOT_FOUND.value[0]: NotFound}
_FINAL = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT,
          grpc.StatusCode.UNIMPLEMENTED)


class Waiter:
    """One call's share of the shards' streams: a WaitWorks call's, or a
    client's AwaitResults stream's. Items for it: (results, refusals, shard),
    an exception, _CANCELLED or _ON_ITS_OWN."""

    def __init__(self, work_ids=()):
        self.ids = set(work_ids)  # still awaited (under its lock)
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._buffered = 0  # bytes of results given to it, not read yet
        self.on_its_own = False
        self.closed = False  # no more registrations
        self.shards: set[ShardAwaits] = set()  # whose streams it is registered with

    def put(self, item, size: int = 0) -> int:
        """Queues an item; returns the bytes it holds unread."""
        with self._lock:
            self._buffered += size
            self._items.put((item, size))
            return self._buffered

    def cancel(self) -> None:
        self.put(_CANCELLED)

    def unread(self) -> int:
        with self._lock:
            return self._buffered

    def get(self):
        item, size = self._items.get()
        with self._lock:
            self._buffered -= size
        return item

    def done(self, work_ids) -> None:
        with self._lock:
            self.ids.difference_update(work_ids)

    def close(self) -> None:
        """Ends its registrations, on every shard."""
        with self._lock:
            self.closed = True
            shards = list(self.shards)
        for shard in shards:
            shard.remove(self)


class ShardAwaits:
    def __init__(self, proxy: MasterProxy, shard: int = 0):
        self.proxy = proxy
        self.shard = shard
        self._lock = threading.Lock()
        self._waiters: dict[str, list[Waiter]] = {}
        self._requests: queue.SimpleQueue | None = None  # the open stream's
        self._started = False
        self._closed = False
        self._stream = None
        self._unsupported_at: float | None = None  # when the master said it has no AwaitResults

    def wait(self, work_ids: list[str], handle: StreamHandle) -> Iterator[work_pb2.WatchResultsResponse]:
        """The results of `work_ids` as they finish, in batches; raises
        WrongShard or NotFound as the master refuses some."""
        waiter = Waiter(work_ids)
        handle.attach(waiter)
        if not self.add(waiter, work_ids):  # the master has no AwaitResults
            yield from self.proxy.wait_works(work_ids, handle=handle)
            return
        try:
            while waiter.ids:
                item = waiter.get()
                if item is _CANCELLED:
                    return
                if item is _ON_ITS_OWN:
                    yield from self.proxy.wait_works(sorted(waiter.ids), handle=handle)
                    return
                if isinstance(item, Exception):
                    raise item
                results, refused, _shard = item
                if any(r.code in _OWN_WAY for r in refused):  # too many awaited upstream, or an older master
                    yield from self.proxy.wait_works(sorted(waiter.ids), handle=handle)
                    return
                if refused:
                    raise _refusal(refused)
                results = [r for r in results if r.work_id in waiter.ids]
                waiter.done(r.work_id for r in results)
                if results:
                    yield work_pb2.WatchResultsResponse(results=results)
        finally:
            waiter.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            stream = self._stream
        if stream is not None:
            stream.cancel()

    # --- the calls' registrations --------------------------------------------

    def add(self, waiter: Waiter, work_ids) -> bool:
        """`waiter` awaits these ids (those it still awaits) here too, unless
        it is closed; False if the master has no AwaitResults."""
        with self._lock, waiter._lock:
            if self._unsupported_at is not None:
                if time.monotonic() - self._unsupported_at < RETRY_UNSUPPORTED:
                    return False
                self._unsupported_at, self._started = None, False  # ask again: an upgrade may have ended
            if waiter.closed or waiter.on_its_own:
                return True
            waiter.shards.add(self)
            new = []
            for work_id in work_ids:
                if work_id not in waiter.ids:
                    continue  # forgotten meanwhile
                waiters = self._waiters.get(work_id)
                if waiters is None:
                    self._waiters[work_id] = [waiter]
                    new.append(work_id)
                elif waiter not in waiters:
                    waiters.append(waiter)
            self._send(work_ids=new)
            if not self._started:
                self._started = True
                threading.Thread(target=self._run, name="await-results", daemon=True).start()
            return True

    def forget(self, waiter: Waiter, work_ids) -> None:
        """`waiter` no longer awaits these ids; ids nobody awaits are forgotten upstream."""
        with self._lock:
            self._unregister(waiter, work_ids)

    def _unregister(self, waiter: Waiter, work_ids) -> None:
        """(Under the lock.) Ids nobody awaits any more are forgotten upstream."""
        forget = []
        for work_id in work_ids:
            waiters = self._waiters.get(work_id)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[work_id]
                    forget.append(work_id)
        self._send(forget=forget)

    def remove(self, waiter: Waiter) -> None:
        with waiter._lock:
            ids = list(waiter.ids)
        self.forget(waiter, ids)

    def _send(self, work_ids: Sequence[str] = (), forget: Sequence[str] = ()) -> None:
        """Queues requests on the open stream (under the lock); a stream
        opened later asks for every id awaited then."""
        if self._requests is None:
            return
        for i in range(0, len(work_ids), MAX_BATCH_WORKS):
            self._requests.put(work_pb2.AwaitRequest(work_ids=work_ids[i:i + MAX_BATCH_WORKS]))
        for i in range(0, len(forget), MAX_BATCH_WORKS):
            self._requests.put(work_pb2.AwaitRequest(forget=forget[i:i + MAX_BATCH_WORKS]))

    # --- the stream ------------------------------------------------------------

    def _run(self) -> None:
        delay, broken_since = 0.02, None
        while not self._closed:
            answered = False
            try:
                answered = self._serve()
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                    self._unsupported()
                    return
                self._fail(lambda e=error: e)  # refused for good (access, a malformed request)
                log.warning("await stream refused: %s: %s", error.code().name, error.details())
            except (NoMaster, TimeoutError) as error:
                log.info("await stream: %s", error)
            except Exception:  # noqa: BLE001 - the stream must come back, whatever broke it
                log.exception("await stream failed")
            now = time.monotonic()
            if answered:
                broken_since, delay = now, 0.02
            broken_since = broken_since or now
            if now - broken_since > RECONNECT_TIMEOUT:
                self._fail(lambda: NoMaster(f"no master served results for {RECONNECT_TIMEOUT:.0f} s"))
                broken_since = now
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _serve(self) -> bool:
        """One stream, until it breaks: first every id awaited, then what
        the calls add or forget. Returns whether the master answered on it;
        raises the errors that are final."""
        address, _ = self.proxy.locator.current(RECONNECT_TIMEOUT)
        requests: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            self._requests = requests
            self._send(work_ids=list(self._waiters))
        stream = self.proxy.stub(address).AwaitResults(iter(requests.get, _END))
        with self._lock:
            self._stream = stream
        self.proxy.locator.on_change(stream.cancel)  # the master moved: ask the new one
        answered = False
        try:
            for response in stream:  # the first, empty, says the stream is open
                if not self.proxy.observe_epoch(response.epoch, response.cluster_id):
                    return answered  # a deposed master's
                answered = True
                self._dispatch(response)
        except grpc.RpcError as error:
            if error.code() in _FINAL:
                raise
            self.proxy.retry_hint(error, address)
            if error.code() != grpc.StatusCode.CANCELLED:
                log.info("await stream from %s ended (%s)", address, error.code().name)
        finally:
            self.proxy.locator.remove_listener(stream.cancel)
            with self._lock:
                self._requests = None
                self._stream = None
            requests.put(_END)
            stream.cancel()
        return answered

    def _dispatch(self, response: work_pb2.AwaitResponse) -> None:
        """Gives each waiting call its share of a response."""
        shares: dict[Waiter, tuple[list, list]] = {}
        with self._lock:
            for refusal in response.refused:
                for waiter in self._waiters.pop(refusal.work_id, ()):
                    shares.setdefault(waiter, ([], []))[1].append(refusal)
            for result in response.results:
                for waiter in self._waiters.pop(result.work_id, ()):
                    shares.setdefault(waiter, ([], []))[0].append(result)
            for waiter, (results, refused) in shares.items():
                if waiter.on_its_own:
                    continue  # it reads the rest on a stream of its own
                size = sum(r.ByteSize() for r in results) + sum(r.ByteSize() for r in refused)
                if waiter.put((results, refused, self.shard), size) > MAX_BUFFERED_BYTES:
                    self._detach(waiter)

    def _detach(self, waiter: Waiter) -> None:
        """A slow reader goes on on a stream of its own (under the lock)."""
        waiter.on_its_own = True
        with waiter._lock:
            ids = list(waiter.ids)
        self._unregister(waiter, ids)
        waiter.put(_ON_ITS_OWN)

    def _unsupported(self) -> None:
        """The master has no AwaitResults: every id awaited here is refused
        UNIMPLEMENTED (its call then waits on a stream of its own)."""
        with self._lock:
            self._unsupported_at = time.monotonic()
            shares: dict[Waiter, list] = {}
            for work_id, waiters in self._waiters.items():
                for waiter in waiters:
                    shares.setdefault(waiter, []).append(work_pb2.WorkRefusal(
                        work_id=work_id, code=_UNIMPLEMENTED, message="this master has no AwaitResults"))
            self._waiters.clear()
            for waiter, refused in shares.items():
                waiter.put(([], refused, self.shard))

    def _fail(self, error) -> None:
        """Ends every call waiting now with `error()`."""
        with self._lock:
            waiters = {w for ws in self._waiters.values() for w in ws}
            self._waiters.clear()
            for waiter in waiters:
                waiter.put(error())


def _refusal(refused: list[work_pb2.WorkRefusal]) -> Exception:
    """The error a WaitWorks call ends with when the master refuses some of its ids."""
    first = refused[0]
    kind = _REFUSALS.get(first.code, Overloaded)
    same = [r for r in refused if r.code == first.code]
    if kind is NotFound and len(same) > 1:
        shown = ", ".join(repr(r.work_id) for r in same[:5])
        more = f" and {len(same) - 5} more" if len(same) > 5 else ""
        return NotFound(f"no work {shown}{more}: never accepted, or its result left the retention window")
    return kind(first.message)



class ClientAwaits:
    """A client's own AwaitResults stream, served from the shards' shared
    streams: the ids it adds are registered with their shards; a shard that
    says some are not its own (they moved) is asked again with a newer map;
    the rest of what the masters answer goes back to the client."""

    MAX_AWAITED = 100_000  # ids one client awaits at once

    def __init__(self, shards: Shards, awaits_of: Callable[[int], ShardAwaits]):
        self.shards = shards
        self.awaits_of = awaits_of

    def responses(self, requests, handle: StreamHandle) -> Iterator[work_pb2.AwaitResponse]:
        waiter = Waiter()
        handle.attach(waiter)
        threading.Thread(target=self._read, args=(requests, waiter), name="await-requests", daemon=True).start()
        try:
            yield work_pb2.AwaitResponse()  # the stream is open
            while True:
                item = waiter.get()
                if item is _CANCELLED:
                    return
                if item is _ON_ITS_OWN:
                    raise Overloaded("this caller read its results too slowly: open the stream again and send the "
                                     "ids still awaited")
                if isinstance(item, Exception):
                    raise item
                results, refused, shard = item
                moved = [r.work_id for r in refused if r.code == _ABORTED]
                if moved:
                    threading.Thread(target=self._reroute, args=(waiter, moved), daemon=True).start()
                refused = [r for r in refused if r.code != _ABORTED]
                with waiter._lock:
                    results = [r for r in results if r.work_id in waiter.ids]
                    waiter.ids.difference_update(r.work_id for r in (*results, *refused))
                for result in results:
                    result.shard = shard
                if refused:
                    yield work_pb2.AwaitResponse(refused=refused)
                if results:
                    yield work_pb2.AwaitResponse(results=results)
        finally:
            waiter.close()

    def _read(self, requests, waiter: Waiter) -> None:
        try:
            for request in requests:
                if waiter.unread() > MAX_BUFFERED_BYTES:  # it asks and does not read: no more
                    waiter.put(Overloaded("this caller sends requests and does not read the answers"))
                    return
                validation.check_await(request)
                forget = set(request.forget)
                if forget:
                    with waiter._lock:
                        waiter.ids.difference_update(forget)
                    self._register(forget, lambda awaits, ids: awaits.forget(waiter, ids))
                with waiter._lock:
                    room = self.MAX_AWAITED - len(waiter.ids)
                    new = [w for w in dict.fromkeys(request.work_ids) if w not in forget and w not in waiter.ids]
                    new, over = new[:max(room, 0)], new[max(room, 0):]
                    waiter.ids.update(new)
                if over:
                    self._refuse(waiter, over, _EXHAUSTED,
                                 f"this stream already awaits {self.MAX_AWAITED:,} works: wait for fewer at once")
                self._register(new, lambda awaits, ids: awaits.add(waiter, ids) or self._refuse(
                    waiter, ids, _UNIMPLEMENTED, "this shard's master has no AwaitResults: use WaitWorks"))
        except InvalidInput as exc:
            waiter.put(exc)
        except Exception:  # noqa: BLE001 - the client went away: its stream ends with it
            pass

    @staticmethod
    def _refuse(waiter: Waiter, work_ids: list[str], code: int, message: str) -> None:
        refused = [work_pb2.WorkRefusal(work_id=w, code=code, message=message) for w in work_ids]
        waiter.put(([], refused, 0), sum(r.ByteSize() for r in refused))

    def _register(self, work_ids, act: Callable[[ShardAwaits, list[str]], object]) -> None:
        ids = list(work_ids)
        for shard, positions in self.shards.split(ids).items():
            act(self.awaits_of(shard), [ids[i] for i in positions])

    def _reroute(self, waiter: Waiter, work_ids: list[str]) -> None:
        """Ids a shard refused as not its own: again, with a newer shard map."""
        self.shards.wait_newer(self.shards.map.version, time.monotonic() + 1.0)  # a moment, or a newer map
        with waiter._lock:
            still = [w for w in work_ids if w in waiter.ids]
        self._register(still, lambda awaits, ids: awaits.add(waiter, ids))
