"""A worker process: N worker slots, each with its own id and executor,
sharing one stream to the master of each shard (which it finds through that
shard's proxy). It registers periodically, pulls work for slots with room,
and resends every WorkIsDone/WorkFailed until the master that handed the
work out acks it.

With several shards, every slot is registered with every shard's master,
but its credit (its request for work) is lent to one shard at a time: to a
shard whose master said work is ready, the one lent to least recently
first, so that no shard starves; an idle slot whose shard gave it nothing
is moved to a shard with work (WorkerWithdrawsWork, then a request there).

A slot runs one work at a time and holds up to --prefetch more, handed out
ahead: when a job ends the next one starts at once, before the report
leaves, so the job process does not wait for a round trip to the master.

Threads: the stream reader hands each assignment to its slot's executor;
one dispatcher thread waits on every executor at once and reports outcomes;
gRPC's sender drains the outbox, merging what is queued into one message.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for_connections

import grpc

from dworkers.common.errors import ConfigError, NoMaster
from dworkers.common.lifecycle import StopRequest
from dworkers.common.memory import freeze_survivors
from dworkers.common.metrics import WorkerMetrics, process_registry, serve_metrics
from dworkers.common.proxy import MasterProxy, build_proxy
from dworkers.common.routing import Shards
from dworkers.common.settings import Contact, Logging, group, setting
from dworkers.common.tls import TlsSettings, files
from dworkers.common.validation import (
    MAX_ERROR_CHARS,
    MAX_PREFETCH,
    MAX_RESULT_BYTES,
    MAX_SLOTS_PER_CONNECTION,
    MAX_STREAM_MESSAGE_BYTES,
)
from dworkers.common.wire import MASTER_KEY, metadata_value
from dworkers.v1 import master_pb2
from dworkers.worker import jobs
from dworkers.worker.executor import EXECUTORS, Beat, Outcome
from dworkers.worker.jobs import Call

log = logging.getLogger(__name__)

OUTBOX_MESSAGES = 10_000
OUTBOX_BYTES = 64 * 1024 * 1024
REFUSED_RETRY_SECONDS = 5.0  # between attempts to connect while the master refuses this worker's credentials
UNUSED_CREDIT_SECONDS = 0.5  # a shard that left a lent slot idle this long has no work for it
# A credit unused this long moves to a shard that says it has work: a
# master dispatches at once to a credit when it has work, so the lender had
# none; the margin keeps a move from racing the lender's own new work (the
# lender may hand out before it reads the withdrawal: the work comes back).
SETTLE_SECONDS = 0.1
STICKY_SECONDS = 0.05  # a slot asks the shard it just served again, unless another waited this much longer
ROTATE_SECONDS = 0.2  # a shard with work but no slot gets one drained for it after this long
RESEND_CREDIT_SECONDS = 1.0  # a withdrawal not confirmed by then is sent again


@dataclass(frozen=True)
class WorkerSettings:
    contact: Contact = group(Contact)
    logging: Logging = group(Logging)
    tls: TlsSettings = group(TlsSettings)
    concurrency: int = setting(2, "worker slots (each with its own executor)", low=1, high=MAX_SLOTS_PER_CONNECTION)
    prefetch: int = setting(4, "works each slot holds beyond the one it runs, so that the next starts at once "
                            "(0: ask for the next work only when one ends; keep it low for long jobs, as a "
                            "prefetched work waits behind the running one)", low=0, high=MAX_PREFETCH)
    jobs: str = setting("", "comma-separated Python modules that register jobs")
    executor: str = setting("process", "process: each slot's jobs run in a child process (killable); thread: on a "
                            "thread of this process (cheap, for many slots or trivial jobs)",
                            choices=("process", "thread"))
    metrics_port: int = setting(9101, "Prometheus /metrics port (0: off)", low=0, high=65535)
    register_interval: float = setting(5.0, "seconds between registrations", above=0, high=3600)
    resend_interval: float = setting(3.0, "seconds between resends of unacknowledged reports", above=0, high=3600)
    shutdown_grace: float = setting(30.0, "seconds to finish running work on SIGTERM", low=0, high=24 * 3600)
    default_timeout: float = setting(30.0, "seconds an attempt may run when its hand-out names no timeout",
                                     above=0, high=24 * 3600)

    @property
    def job_modules(self) -> list[str]:
        return [m.strip() for m in self.jobs.split(",") if m.strip()]


class Outbox:
    """What waits to leave on one stream, bounded in count and in bytes. When
    full, a message is dropped: reports are resent until acked, registrations
    and requests are sent again periodically. None marks the stream's end."""

    def __init__(self, max_messages: int = OUTBOX_MESSAGES, max_bytes: int = OUTBOX_BYTES):
        self.max_messages, self.max_bytes = max_messages, max_bytes
        self._items: deque[tuple[master_pb2.WorkerMessage | None, int]] = deque()
        self._bytes = 0
        self._cond = threading.Condition()

    def put(self, message: master_pb2.WorkerMessage) -> bool:
        size = message.ByteSize()
        with self._cond:
            if len(self._items) >= self.max_messages or self._bytes + size > self.max_bytes:
                return False
            self._items.append((message, size))
            self._bytes += size
            self._cond.notify()
        return True

    def close(self) -> None:
        with self._cond:
            self._items.append((None, 0))
            self._cond.notify()

    def get(self, block: bool = True) -> master_pb2.WorkerMessage | None | bool:
        """The next message, None at the end, or False if none waits (block=False)."""
        with self._cond:
            while not self._items:
                if not block:
                    return False
                self._cond.wait()
            message, size = self._items.popleft()
            self._bytes -= size
            return message


class Slot:
    """One worker slot: its executor, the work it runs, and the works handed
    to it ahead (run in the order they came)."""

    def __init__(self, worker_id: str, executor, capacity: int = 1):
        self.worker_id = worker_id
        self.executor = executor
        self.capacity = capacity  # works it asks to hold, the running one included
        self.assignment: master_pb2.Assignment | None = None  # running
        self.queued: deque[master_pb2.Assignment] = deque()
        self.deadline = 0.0  # of the running one, from when it started here
        self.lent_to: int | None = None  # the shard holding its credit (several shards)
        self.lent_at = 0.0  # when its credit was lent, or last used
        self.withdrawing: int | None = None  # the shard whose confirmation of a withdrawal it awaits
        self.withdrawn_at = 0.0  # when that withdrawal was sent (again, if unconfirmed: it may be lost)
        self.next_lender: int | None = None  # where its credit goes once that comes

    @property
    def busy(self) -> bool:
        return self.assignment is not None

    @property
    def has_room(self) -> bool:
        return self.busy + len(self.queued) < self.capacity

    def holds(self, token: int) -> bool:
        return any(a.attempt_token == token for a in self.held())

    def held(self) -> list[master_pb2.Assignment]:
        return ([self.assignment] if self.assignment is not None else []) + list(self.queued)


class Link:
    """The stream to one shard's master, and what the worker knows of it."""

    def __init__(self, shard: int, proxy: MasterProxy):
        self.shard = shard
        self.proxy = proxy
        self.outbox: Outbox | None = None  # the current stream's, None between streams
        self.stream = None
        self.has_work = True  # its master said work is ready, and no credit lent to it sat unused since
        self.last_lent = 0.0


def slot_prefix(host: str, pid: int) -> str:
    """Slot ids are `<host>-<pid>-<n>`, in the characters the master accepts."""
    return re.sub(r"[^A-Za-z0-9._:@-]", "-", host)[:100].lstrip("._:@-") + f"-{pid}"


class Worker:
    def __init__(self, masters: Shards | MasterProxy, settings: WorkerSettings, metrics: WorkerMetrics):
        self.shards = masters if isinstance(masters, Shards) else Shards(masters)
        self.settings = settings
        self.metrics = metrics
        self.host = socket.gethostname()
        registry = jobs.load(settings.job_modules)
        self.kinds = sorted(registry)  # declared when registering, with their options
        self.defaults = [kind_defaults(job) for _, job in sorted(registry.items())
                         if job.max_attempts or job.timeout or job.priority or job.backoff or job.heartbeat_timeout
                         or job.rate_limit]
        prefix = slot_prefix(self.host, os.getpid())
        executor = EXECUTORS[settings.executor]
        self.slots = {f"{prefix}-{i}": Slot(f"{prefix}-{i}", executor(settings.job_modules), 1 + settings.prefetch)
                      for i in range(settings.concurrency)}
        self._lock = threading.Lock()
        # attempt token -> its done/failed report, resent until acked
        self._unacked: dict[int, master_pb2.WorkerMessage] = {}
        self._token_shard: dict[int, int] = {}  # attempt token -> the shard that handed it out
        self.links: dict[int, Link] = {}
        self._wake_reader, self._wake_writer = os.pipe()  # interrupts the dispatcher's wait
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._cancelling: set[int] = set()  # tokens of running attempts to stop (by the dispatcher)

    # --- running jobs --------------------------------------------------------

    def _take(self, assignment: master_pb2.Assignment, shard: int = 0) -> None:
        """A hand-out: runs it if its slot is idle, else queues it behind."""
        slot = self.slots.get(assignment.worker_id)
        with self._lock:
            if slot is None or slot.holds(assignment.attempt_token):
                return  # not ours, or a duplicate
            self._token_shard[assignment.attempt_token] = shard
            slot.lent_at = time.monotonic()  # its credit is in use
            if self._stopping.is_set() or not slot.has_room:
                # Sent before the master knew (the worker stops, or the slot's
                # credit moved to another shard that filled it): straight back.
                self._returned(slot.worker_id, assignment)
                return
            if slot.busy:
                slot.queued.append(assignment)
                return
            self._running(slot, assignment)
        self._run(slot, assignment)

    def _running(self, slot: Slot, assignment: master_pb2.Assignment) -> None:
        slot.assignment = assignment
        slot.deadline = time.monotonic() + self._allowed(assignment)

    def _allowed(self, assignment: master_pb2.Assignment) -> float:
        """Seconds the attempt may run: its lease if it has one (renewed by
        heartbeats), else its timeout."""
        return assignment.work.heartbeat_timeout or assignment.timeout_seconds or self.settings.default_timeout

    def _run(self, slot: Slot, assignment: master_pb2.Assignment) -> None:
        work = assignment.work
        log.debug("got work", extra={"work_id": work.work_id, "worker_id": slot.worker_id})
        allowed = self._allowed(assignment)
        failed_to_start = slot.executor.submit(Call(work.kind, work.payload, work.content_type, work.work_id,
                                                    assignment.attempt, time.time() + allowed,
                                                    work.heartbeat_timeout))
        if failed_to_start is not None:
            self._finished(slot, failed_to_start)
        os.write(self._wake_writer, b"x")

    def _dispatch_forever(self) -> None:
        """Waits on every busy executor at once; reports outcomes and timeouts."""
        wake = self._wake_reader
        while not self._stopped.is_set():
            with self._lock:
                busy = [s for s in self.slots.values() if s.busy and s.executor.connection is not None]
            by_connection = {s.executor.connection: s for s in busy}
            nearest = min((s.deadline for s in busy), default=time.monotonic() + 1.0)
            timeout = max(0.0, min(nearest - time.monotonic(), 1.0))
            try:
                ready = wait_for_connections([wake, *by_connection], timeout)
            except (OSError, ValueError):
                ready = []  # an executor closed under us: look again
            for item in ready:
                if item == wake:
                    os.read(wake, 4096)
                    continue
                slot = by_connection[item]
                outcome = slot.executor.collect()
                if isinstance(outcome, Beat):
                    self._beat(slot, outcome)
                else:
                    self._finished(slot, outcome)
            self._stop_cancelled()
            now = time.monotonic()
            for slot in busy:
                assignment = slot.assignment
                if assignment is not None and slot.deadline <= now and slot.executor.connection is not None \
                        and slot.executor.connection not in ready:
                    self._finished(slot, slot.executor.timed_out(self._allowed(assignment)))

    def _beat(self, slot: Slot, beat: Beat) -> None:
        """The running job is alive: its lease (if it has one) is renewed
        here and at the master, which also learns its progress."""
        with self._lock:
            assignment = slot.assignment
            if assignment is None:
                return
            lease = assignment.work.heartbeat_timeout
            if lease:
                slot.deadline = max(slot.deadline, time.monotonic() + lease)
        heartbeat = master_pb2.Heartbeat(worker_id=slot.worker_id, attempt_token=assignment.attempt_token,
                                         details=beat.details)
        if beat.progress is not None:
            heartbeat.progress = beat.progress
        self._send(master_pb2.WorkerMessage(heartbeats=master_pb2.Heartbeats(heartbeats=[heartbeat])),
                   self._shard_of(assignment.attempt_token))

    def _cancel(self, tokens, shard: int) -> None:
        """The master cancelled these attempts' works: those held ahead are
        dropped here; the dispatcher stops the running ones."""
        wanted = {t for t in tokens if self._token_shard.get(t) == shard}
        room = []
        with self._lock:
            for slot in self.slots.values():
                kept = deque(a for a in slot.queued if a.attempt_token not in wanted)
                if len(kept) < len(slot.queued):
                    for a in slot.queued:
                        if a.attempt_token in wanted:  # dropped here: no report will name it
                            self._token_shard.pop(a.attempt_token, None)
                    slot.queued = kept
                    if not self._stopping.is_set():
                        room.append(slot)
                if slot.assignment is not None and slot.assignment.attempt_token in wanted:
                    self._cancelling.add(slot.assignment.attempt_token)  # its report goes to this shard
            self._send_credit(*self._lend(room, shard))  # the master freed their places: fill them
        os.write(self._wake_writer, b"x")

    def _stop_cancelled(self) -> None:
        """Stops running attempts whose works were cancelled (on the dispatcher's thread)."""
        with self._lock:
            cancelling, self._cancelling = self._cancelling, set()
        if not cancelling:
            return
        for slot in list(self.slots.values()):
            assignment = slot.assignment
            if assignment is not None and assignment.attempt_token in cancelling:
                log.info("work cancelled: stopping it", extra={"work_id": assignment.work.work_id,
                                                              "worker_id": slot.worker_id})
                self._finished(slot, slot.executor.cancelled())

    def _finished(self, slot: Slot, outcome: Outcome) -> None:
        with self._lock:
            assignment, slot.assignment = slot.assignment, None
            following = slot.queued.popleft() if assignment is not None and slot.queued \
                and not self._stopping.is_set() else None
            if following is not None:
                self._running(slot, following)
        if assignment is None:
            return
        if following is not None:  # the next job first: the report can wait, the job process should not
            self._run(slot, following)
        work = assignment.work
        if outcome.ok and len(outcome.result) > MAX_RESULT_BYTES:
            outcome = Outcome(False, error=f"result of {len(outcome.result)} bytes exceeds the limit of "
                                           f"{MAX_RESULT_BYTES} bytes", seconds=outcome.seconds)
        if len(outcome.error) > MAX_ERROR_CHARS:
            outcome = dataclasses.replace(outcome, error=outcome.error[:MAX_ERROR_CHARS - 3] + "...")
        self.metrics.executed(work.kind, "ok" if outcome.ok else "cancelled" if outcome.cancelled
                              else "timeout" if outcome.timed_out else "error", outcome.seconds)
        if outcome.ok:
            message = master_pb2.WorkerMessage(done=master_pb2.WorkIsDone(completions=[
                master_pb2.Completion(worker_id=slot.worker_id, work_id=work.work_id, result=outcome.result,
                                      attempt=assignment.attempt, attempt_token=assignment.attempt_token,
                                      content_type=outcome.content_type)]))
            log.debug("work complete", extra={"work_id": work.work_id, "worker_id": slot.worker_id})
        else:
            message = master_pb2.WorkerMessage(failed=master_pb2.WorkFailed(failures=[
                master_pb2.Failure(worker_id=slot.worker_id, work_id=work.work_id, error=outcome.error,
                                   attempt=assignment.attempt, attempt_token=assignment.attempt_token,
                                   permanent=outcome.permanent)]))
            if not outcome.cancelled:
                log.warning("work failed: %s", outcome.error.split("\n", 1)[0],
                            extra={"work_id": work.work_id, "worker_id": slot.worker_id})
        shard = self._shard_of(assignment.attempt_token)
        with self._lock:
            requests, withdrawals = self._lend([slot], shard) if not self._stopping.is_set() and slot.has_room \
                else ({}, {})
            if shard in requests:  # the same message asks for the next work
                message.request_work.worker_ids.extend(requests.pop(shard))
            self._unacked[assignment.attempt_token] = message
            # In this order, and under the lock so that no other decision's
            # messages come between: the withdrawal before the report (its
            # master must not fill the slot meanwhile), the requests after.
            self._withdraw(withdrawals)
            self._send(message, shard)
            self._request(requests)

    # --- the stream -----------------------------------------------------------

    def _send(self, message: master_pb2.WorkerMessage, shard: int = 0) -> None:
        link = self.links.get(shard)
        outbox = link.outbox if link is not None else None
        if outbox is not None:
            outbox.put(message)  # if the stream is stuck, reports are resent on the next one

    def _shard_of(self, token: int) -> int:
        return self._token_shard.get(token, 0)

    def _register(self, shard: int) -> master_pb2.WorkerMessage:
        """Every slot, and the attempts it holds of this shard's."""
        now = time.monotonic()
        with self._lock:
            mine = self._token_shard
            busy = [a.work.work_id for s in self.slots.values() for a in s.held()
                    if mine.get(a.attempt_token, 0) == shard]
            running = [master_pb2.RunningAttempt(worker_id=s.worker_id, work_id=s.assignment.work.work_id,
                                                 attempt_token=s.assignment.attempt_token,
                                                 seconds_left=max(0.0, s.deadline - now))
                       for s in self.slots.values() if s.assignment is not None
                       and mine.get(s.assignment.attempt_token, 0) == shard]
        return master_pb2.WorkerMessage(register=master_pb2.RegisterWorker(
            worker_ids=list(self.slots), host=self.host[:255], busy_work_ids=busy, kinds=self.kinds,
            defaults=self.defaults, prefetch=self.settings.prefetch, running=running))

    # --- lending slots' credit to shards ----------------------------------------

    def _lend(self, slots: list[Slot], preferred: int) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
        """Lends these slots' credit (they have room): all to the one shard
        of a cluster of one. With several, the slots are spread evenly over
        the shards with work, and stay: a master fills a slot up to its
        capacity counting only its own works in it, so a slot holding works
        asks only their shard for more, unless that shard holds two slots
        more than another shard with work, or one more than a shard with
        none that waited ROTATE_SECONDS (then it drains, and is lent once
        empty); an empty slot goes to the connected shard with work that
        holds the fewest slots, the one lent to least recently among equals
        (`preferred`, whose work it just reported, by STICKY_SECONDS); to
        `preferred` if none has work. A credit lent to another shard before
        is withdrawn there first, and the slot lent on once that master
        confirms (what it handed out meanwhile arrives first). Returns the
        requests and the withdrawals to send, by shard; under the lock."""
        if len(self.links) <= 1:
            for slot in slots:
                slot.lent_to = preferred
            return ({preferred: [s.worker_id for s in slots]} if slots else {}), {}
        requests: dict[int, list[str]] = {}
        withdrawals: dict[int, list[str]] = {}
        now = time.monotonic()
        connected = [link for link in self.links.values() if link.outbox is not None]
        shares = self._shares()
        for slot in slots:
            if slot.withdrawing is not None:
                continue  # lent again once its last lender confirms
            with_work = [link for link in connected if link.has_work]
            holder = self._holder(slot)
            chosen: Link | None
            if holder is not None:
                mine = shares[holder]
                starved = any(link.shard != holder and (
                    shares[link.shard] + 1 < mine
                    or shares[link.shard] == 0 and now - link.last_lent > ROTATE_SECONDS)
                    for link in with_work)
                chosen = None if starved else self.links.get(holder)
            elif with_work:
                chosen = min(with_work, key=lambda candidate: (shares[candidate.shard], candidate.last_lent - (
                    STICKY_SECONDS if candidate.shard == preferred else 0.0)))
            else:
                chosen = self.links.get(preferred)
            if chosen is not None and chosen.outbox is None:
                chosen = None
            if slot.lent_to is not None and (chosen is None or chosen.shard != slot.lent_to):
                # Lent elsewhere only once the last lender confirms: what it
                # handed out before reading the withdrawal arrives first.
                withdrawals.setdefault(slot.lent_to, []).append(slot.worker_id)
                shares[slot.lent_to] -= 1
                slot.withdrawing, slot.lent_to = slot.lent_to, None
                slot.next_lender = chosen.shard if chosen is not None else None
                continue
            if chosen is None:
                slot.lent_to = None  # lent once empty, when a shard connects or says work is ready
                continue
            chosen.last_lent = now
            if slot.lent_to != chosen.shard:
                shares[chosen.shard] += 1
            slot.lent_to, slot.lent_at = chosen.shard, now
            requests.setdefault(chosen.shard, []).append(slot.worker_id)
        return requests, withdrawals

    def _shares(self) -> Counter:
        """Slots per shard: lent to it, or holding its works."""
        shares: Counter = Counter()
        for slot in self.slots.values():
            owner = slot.lent_to if slot.lent_to is not None else self._holder(slot)
            if owner is not None:
                shares[owner] += 1
        return shares

    def _withdrawn(self, worker_ids, shard: int) -> None:
        """The shard confirms these slots' credit is withdrawn: lend it on."""
        with self._lock:
            confirmed = []
            for worker_id in worker_ids:
                slot = self.slots.get(worker_id)
                if slot is not None and slot.withdrawing == shard:
                    slot.withdrawing = None
                    if slot.has_room and not self._stopping.is_set():
                        confirmed.append(slot)
            requests: dict[int, list[str]] = {}
            withdrawals: dict[int, list[str]] = {}
            for slot in confirmed:
                target = slot.next_lender if slot.next_lender is not None else shard
                more, less = self._lend([slot], target)
                for group, into in ((more, requests), (less, withdrawals)):
                    for key, ids in group.items():
                        into.setdefault(key, []).extend(ids)
            self._send_credit(requests, withdrawals)

    def _holder(self, slot: Slot) -> int | None:
        """The shard whose works the slot holds (None: it holds none)."""
        held = slot.assignment or (slot.queued[0] if slot.queued else None)
        return None if held is None else self._shard_of(held.attempt_token)

    def _send_credit(self, requests: dict[int, list[str]], withdrawals: dict[int, list[str]]) -> None:
        """Withdrawals first, then requests (under the lock: in the order decided)."""
        self._withdraw(withdrawals)
        self._request(requests)

    def _withdraw(self, withdrawals: dict[int, list[str]]) -> None:
        now = time.monotonic()
        for worker_ids in withdrawals.values():
            for worker_id in worker_ids:
                self.slots[worker_id].withdrawn_at = now
        for shard, worker_ids in withdrawals.items():
            self._send(master_pb2.WorkerMessage(withdraw_work=master_pb2.WorkerWithdrawsWork(worker_ids=worker_ids)),
                       shard)

    def _request(self, requests: dict[int, list[str]]) -> None:
        for shard, worker_ids in requests.items():
            self._send(master_pb2.WorkerMessage(request_work=master_pb2.WorkerRequestsWork(worker_ids=worker_ids)),
                       shard)

    def _rebalance(self, ready: int | None = None) -> None:
        """Several shards: idle slots whose credit a shard left unused move to
        shards with work (`ready` just said it has some); slots lent to no
        shard are lent. A shard that leaves a credit unused has no work.
        Messages a master may have dropped (it drops inputs while its journal
        is backed up) are sent again: a withdrawal not confirmed within
        RESEND_CREDIT_SECONDS, and the requests of idle slots lent to `ready`."""
        if len(self.links) <= 1 or self._stopping.is_set():
            return
        now = time.monotonic()
        with self._lock:
            if ready is not None and ready in self.links:
                self.links[ready].has_work = True
            moving = []
            again: dict[int, list[str]] = {}  # withdrawals not confirmed yet
            asked: dict[int, list[str]] = {}  # requests of idle slots lent to `ready`
            for slot in self.slots.values():
                if slot.withdrawing is not None:
                    if now - slot.withdrawn_at >= RESEND_CREDIT_SECONDS:
                        again.setdefault(slot.withdrawing, []).append(slot.worker_id)
                    continue
                if not slot.has_room:
                    continue
                if slot.lent_to is None:
                    moving.append(slot)
                    continue
                lender = self.links.get(slot.lent_to)
                if slot.busy or lender is None or now - slot.lent_at < SETTLE_SECONDS:
                    continue
                if slot.lent_to == ready:
                    asked.setdefault(ready, []).append(slot.worker_id)
                    continue
                unused = now - slot.lent_at >= UNUSED_CREDIT_SECONDS
                if unused:
                    lender.has_work = False
                if (unused or ready is not None) and any(
                        link.has_work and link.shard != slot.lent_to and link.outbox is not None
                        for link in self.links.values()):
                    lender.has_work = False  # its master had nothing for an idle slot with credit
                    moving.append(slot)  # withdrawn there, lent elsewhere
            requests, withdrawals = self._lend(moving, ready if ready is not None else 0) if moving else ({}, {})
            for shard, worker_ids in asked.items():
                requests.setdefault(shard, []).extend(worker_ids)
            for shard, worker_ids in again.items():
                withdrawals.setdefault(shard, []).extend(worker_ids)
            self._send_credit(requests, withdrawals)

    def _rebalance_forever(self) -> None:
        while not self._stopped.wait(0.1):
            self._rebalance()

    def _request_idle(self, shard: int) -> master_pb2.WorkerMessage:
        """On a new stream: slots with room lent to this shard (or to none,
        or all of them with one shard) ask it for work."""
        now = time.monotonic()
        with self._lock:
            room = [s for s in self.slots.values() if s.has_room and (len(self.links) <= 1 or (
                s.lent_to in (None, shard) and s.withdrawing is None and self._holder(s) in (None, shard)))]
            for slot in room:
                slot.lent_to, slot.lent_at = shard, now
        return master_pb2.WorkerMessage(request_work=master_pb2.WorkerRequestsWork(
            worker_ids=[s.worker_id for s in room]))

    def _outgoing(self, outbox: Outbox):
        """The request stream: whatever is queued leaves as one message."""
        while True:
            message = outbox.get()
            if not isinstance(message, master_pb2.WorkerMessage):
                return
            batch, size, held = [message], message.ByteSize(), None
            # A withdrawal leaves alone: merged, a request for the same slot
            # queued before it would be read after it (see merge).
            while len(batch) < 1000 and not message.HasField("withdraw_work"):
                nxt = outbox.get(block=False)
                if nxt is False:
                    break
                if not isinstance(nxt, master_pb2.WorkerMessage):
                    yield merge(batch)
                    return
                if nxt.HasField("withdraw_work") or size + nxt.ByteSize() > MAX_STREAM_MESSAGE_BYTES - 1024:
                    held = nxt  # it leaves first in the next message
                    break
                batch.append(nxt)
                size += nxt.ByteSize()
            yield merge(batch)
            if held is not None:
                yield held

    def _session(self, link: Link, address: str) -> None:
        shard = link.shard
        with self._lock:  # works queued on the stream before went back to the master's queue with it
            for slot in self.slots.values():
                dropped = [a.attempt_token for a in slot.queued if self._shard_of(a.attempt_token) == shard]
                for token in dropped:
                    self._token_shard.pop(token, None)
                slot.queued = deque(a for a in slot.queued if a.attempt_token not in dropped)
        outbox = Outbox()
        outbox.put(self._register(shard))
        with self._lock:
            for token, message in self._unacked.items():
                if self._shard_of(token) == shard:
                    outbox.put(message)
        link.outbox = outbox
        if not self._stopping.is_set():
            outbox.put(self._request_idle(shard))
        stream = link.proxy.stub(address).Connect(self._outgoing(outbox))
        link.stream = stream
        link.proxy.locator.on_change(stream.cancel)  # the master moved: reconnect at once
        threading.Thread(target=self._timers, args=(link, outbox), daemon=True).start()
        try:
            for message in stream:
                if not link.proxy.observe_epoch(message.epoch, message.cluster_id):
                    continue  # a deposed master's late message
                self._handle(message, shard)
        finally:
            link.proxy.locator.remove_listener(stream.cancel)
            link.outbox = None
            outbox.close()
            stream.cancel()
            with self._lock:  # their credit ended with the stream
                for slot in self.slots.values():
                    if slot.lent_to == shard:
                        slot.lent_to = None
                    if slot.withdrawing == shard:
                        slot.withdrawing = None

    def _handle(self, message: master_pb2.MasterMessage, shard: int) -> None:
        if message.HasField("ack"):
            with self._lock:
                for token in message.ack.attempt_tokens:
                    if self._unacked.pop(token, None) is not None:
                        self._token_shard.pop(token, None)
        if message.HasField("works"):
            if shard in self.links:
                self.links[shard].has_work = True
            for assignment in message.works.assignments:
                self._take(assignment, shard)
        if message.HasField("withdrawn"):
            self._withdrawn(message.withdrawn.worker_ids, shard)
        if message.HasField("cancel"):
            self._cancel(message.cancel.attempt_tokens, shard)
        if message.HasField("work_is_ready") and not self._stopping.is_set():
            if len(self.links) <= 1:
                self._send(self._request_idle(shard), shard)
            else:
                self._rebalance(ready=shard)

    def _timers(self, link: Link, outbox: Outbox) -> None:
        """Periodic re-registration and resending of unacked reports."""
        next_register = time.monotonic() + self.settings.register_interval
        next_resend = time.monotonic() + self.settings.resend_interval
        while link.outbox is outbox:
            time.sleep(0.2)
            now = time.monotonic()
            if now >= next_register:
                self._send(self._register(link.shard), link.shard)
                next_register = now + self.settings.register_interval
            if now >= next_resend:
                with self._lock:
                    pending = [m for token, m in self._unacked.items() if self._shard_of(token) == link.shard]
                for message in pending:
                    self._send(message, link.shard)
                next_resend = now + self.settings.resend_interval

    # --- life -----------------------------------------------------------------

    def run(self) -> None:
        starters = [threading.Thread(target=s.executor.start, daemon=True) for s in self.slots.values()]
        for starter in starters:  # spawn the executors together, not one after another
            starter.start()
        threading.Thread(target=self._dispatch_forever, name="dispatcher", daemon=True).start()
        self._link_shards(self.shards.map)
        if self.shards.follower is not None:
            self.shards.follower.on_change(self._link_shards)
            threading.Thread(target=self._rebalance_forever, name="credits", daemon=True).start()
        self._stopped.wait()

    def _link_shards(self, current) -> None:
        """A stream to every shard of the map (the map may gain shards)."""
        with self._lock:
            new = [Link(shard, self.shards.proxy(shard)) for shard in range(current.shards)
                   if shard not in self.links]
            for link in new:
                self.links[link.shard] = link
        for link in new:
            threading.Thread(target=self._serve_shard, args=(link,), name=f"shard-{link.shard}",
                             daemon=True).start()

    def _serve_shard(self, link: Link) -> None:
        """Keeps a stream open to the shard's active master."""
        delay = 0.05
        while not self._stopped.is_set():
            started = time.monotonic()
            try:
                address, _ = link.proxy.locator.current(timeout=5.0)
                log.info("connecting to master at %s", address, extra={"shard": link.shard})
                self._session(link, address)
            except NoMaster as exc:
                log.info("waiting for a master: %s", exc)
                continue
            except Exception as exc:  # never leave the process without a stream
                if not isinstance(exc, grpc.RpcError):
                    log.exception("worker stream failed: %r", exc)
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                if self._stopped.is_set():
                    break
                if time.monotonic() - started > 5:
                    delay = 0.05
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    # The master is fine; this worker's credentials were refused or changed: connect
                    # again (now allowed, perhaps) after a while, to the same master.
                    log.warning("the master refused this worker: %s %s", exc.code().name, exc.details())
                    if self._stopped.wait(REFUSED_RETRY_SECONDS):
                        break
                    continue
                log.info("stream to master ended: %s %s", exc.code().name, exc.details())
                hint = metadata_value(exc.trailing_metadata(), MASTER_KEY)
                if hint:
                    link.proxy.locator.hint(hint)
                else:  # it died, or is no master: with contact points, try the next one
                    link.proxy.locator.invalidate(address)
            if self._stopped.wait(delay):
                break
            delay = min(delay * 2, 1.0)

    def stop(self) -> None:
        """Hands back at once the works held ahead, finishes running work
        within the grace period, hands back what is still running after it
        (neither is a failed attempt), then stops."""
        self._stopping.set()
        self._hand_back(running=False)
        deadline = time.monotonic() + self.settings.shutdown_grace
        while time.monotonic() < deadline and self._busy():
            time.sleep(0.1)
        self._hand_back(running=True)
        deadline = time.monotonic() + 5.0  # for the acks of what we reported
        while time.monotonic() < deadline:
            with self._lock:
                if not self._unacked:
                    break
            time.sleep(0.05)
        self._stopped.set()
        for link in list(self.links.values()):
            if link.stream is not None:
                link.stream.cancel()
        for slot in self.slots.values():
            slot.executor.close()

    def _hand_back(self, running: bool) -> None:
        """Returns to the master the works queued on every slot and, if
        `running`, the ones still running."""
        with self._lock:
            back = []
            for slot in self.slots.values():
                back += [(slot.worker_id, a) for a in slot.queued]
                slot.queued.clear()
                if running and slot.assignment is not None:
                    back.append((slot.worker_id, slot.assignment))
            for worker_id, a in back:
                self._returned(worker_id, a)

    def _returned(self, worker_id: str, a: master_pb2.Assignment) -> None:
        """Hands a work back unfinished (not a failed attempt); under the lock."""
        log.info("handing work back", extra={"work_id": a.work.work_id, "worker_id": worker_id})
        message = master_pb2.WorkerMessage(failed=master_pb2.WorkFailed(failures=[
            master_pb2.Failure(worker_id=worker_id, work_id=a.work.work_id, error="worker shut down",
                               returned=True, attempt=a.attempt, attempt_token=a.attempt_token)]))
        self._unacked[a.attempt_token] = message
        self._send(message, self._shard_of(a.attempt_token))

    def _busy(self) -> bool:
        with self._lock:
            return any(s.busy for s in self.slots.values())


def kind_defaults(job: jobs.Job) -> master_pb2.KindDefaults:
    """A job's options, as its workers declare them to the master."""
    defaults = master_pb2.KindDefaults(kind=job.kind, max_attempts=job.max_attempts, timeout_seconds=job.timeout,
                                       priority=job.priority, heartbeat_timeout=job.heartbeat_timeout,
                                       rate_limit=job.rate_limit)
    if job.backoff is not None:
        b = defaults.backoff
        b.initial_seconds, b.multiplier, b.max_seconds = job.backoff
    return defaults


def merge(messages: list[master_pb2.WorkerMessage]) -> master_pb2.WorkerMessage:
    """Merges queued messages into one: the latest registration, every report,
    and the union of requesting slots (the master reads reports before requests)."""
    merged = master_pb2.WorkerMessage()
    requested: dict[str, None] = {}
    beats: dict[int, master_pb2.Heartbeat] = {}  # the latest per attempt
    for message in messages:
        if message.HasField("register"):
            merged.register.CopyFrom(message.register)
        if message.HasField("done"):
            merged.done.completions.extend(message.done.completions)
        if message.HasField("failed"):
            merged.failed.failures.extend(message.failed.failures)
        if message.HasField("request_work"):
            requested.update(dict.fromkeys(message.request_work.worker_ids))
        if message.HasField("withdraw_work"):  # sent alone (see _outgoing): kept as it is
            merged.withdraw_work.worker_ids.extend(message.withdraw_work.worker_ids)
        for beat in message.heartbeats.heartbeats:
            beats[beat.attempt_token] = beat
    if beats:
        merged.heartbeats.heartbeats.extend(beats.values())
    if requested:
        merged.request_work.worker_ids.extend(requested)
    return merged


def main(settings: WorkerSettings, stop: StopRequest) -> None:
    """Runs a worker process until a stop request, then finishes its work."""
    registry = process_registry()
    serve_metrics(settings.metrics_port, registry)
    shards = Shards(build_proxy(settings.contact, tls=files(settings.tls)))
    try:
        worker = Worker(shards, settings, WorkerMetrics(registry))
    except ImportError as exc:
        raise ConfigError(f"cannot load jobs module: {exc}") from None
    log.info("worker with %d slots (prefetch %d) for kinds %s", settings.concurrency, settings.prefetch,
             ", ".join(worker.kinds))
    threading.Thread(target=worker.run, name="worker", daemon=True).start()
    freeze_survivors()
    stop.wait()
    log.info("worker stopping: finishing current work")
    worker.stop()
    shards.close()
