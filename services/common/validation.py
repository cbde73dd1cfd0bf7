"""Checks on what crosses the network: submitted work, shared by the master
(the authority) and the frontend (which rejects bad input before it crosses
the network), and every field a worker sends the master."""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Callable

from dworkers.common.errors import InvalidInput, ProtocolError
from dworkers.common.limits import (
    MAX_ATTEMPTS_LIMIT,
    MAX_BACKOFF_MULTIPLIER,
    MAX_DELAY_SECONDS,
    MAX_PRIORITY,
    MAX_RATE_LIMIT,
    MAX_TIMEOUT_SECONDS,
)
from dworkers.common.shards import slot_of
from dworkers.v1 import master_pb2, work_pb2

MAX_PAYLOAD_BYTES = 256 * 1024  # per work; documented in the README
MAX_RESULT_BYTES = 256 * 1024  # a larger result fails its attempt
MAX_ERROR_CHARS = 4096  # longer error messages are cut
# Every message on a stream, in any direction, stays below this: stock gRPC
# clients in every language refuse messages above 4 MiB by default.
MAX_STREAM_MESSAGE_BYTES = 2 * 1024 * 1024
MAX_BATCH_WORKS = 10_000
DEFAULT_MAX_ATTEMPTS = 3
WORK_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
KIND_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
MAX_CONTENT_TYPE_CHARS = 100
CONTENT_TYPE_PATTERN = re.compile(r"([A-Za-z0-9][\x21-\x7e]*(; ?[\x21-\x7e]+)*)?")  # type/subtype; params
WORKER_ID_PATTERN = WORK_ID_PATTERN
MAX_SLOTS_PER_CONNECTION = 1024  # worker slots one worker process may register
# Hand-backs (a worker leaving returns what it holds) are free, up to this
# many per work: a worker that hands the same work back forever would keep
# it from ever running or failing; past it, a hand-back is a failed attempt.
MAX_HAND_BACKS = 20
MAX_PREFETCH = 16  # works a slot may hold beyond the one it runs
MAX_KINDS_PER_WORKER = 1000
MAX_HOST_CHARS = 255
MAX_REPORTS_PER_MESSAGE = 10_000
MAX_DETAILS_CHARS = 1024  # of a heartbeat's details


INVALID_ARGUMENT_CODE = 3  # google.rpc.Code, as in SubmitWorkResponse.code


class InvalidWork(InvalidInput):
    """A submission is malformed; the message says how, for a person."""


def new_work_id() -> str:
    return str(uuid.uuid4())


def check_work_id(work_id: str) -> None:
    if not WORK_ID_PATTERN.fullmatch(work_id):
        raise InvalidWork(
            f"malformed work_id {work_id[:64]!r}: use 1-128 characters from "
            "letters, digits and . _ : @ -, starting with a letter or digit"
        )


KindDefaults = Callable[[str], master_pb2.KindDefaults]  # kind -> its job's options (0 and unset: none)
NO_DEFAULTS = master_pb2.KindDefaults()


def to_work(request: work_pb2.SubmitWorkRequest, index: int | None = None,
            defaults: KindDefaults | None = None, now: float | None = None) -> work_pb2.Work:
    """Validates one submission and returns the work to store (defaults
    filled in: the request's, else its kind's, else the cluster's; a delay
    turned into not_before with `now`, the Unix time, if given)."""
    where = "" if index is None else f"work #{index}: "
    try:
        work_id = request.work_id or new_work_id()
        check_work_id(work_id)
        if not request.kind:
            raise InvalidWork("kind is empty: name the job to run, e.g. 'square'")
        if not KIND_PATTERN.fullmatch(request.kind):
            raise InvalidWork(f"malformed kind {request.kind[:64]!r}: use 1-64 characters from letters, "
                              "digits and _ . -, starting with a letter or _")
        if len(request.payload) > MAX_PAYLOAD_BYTES:
            raise InvalidWork(
                f"payload of {len(request.payload)} bytes exceeds the limit of {MAX_PAYLOAD_BYTES} bytes"
            )
        if request.max_attempts > MAX_ATTEMPTS_LIMIT:
            raise InvalidWork(f"max_attempts {request.max_attempts} is above the limit of {MAX_ATTEMPTS_LIMIT}")
        timeout = request.timeout_seconds
        if math.isnan(timeout) or timeout < 0 or timeout > MAX_TIMEOUT_SECONDS:
            raise InvalidWork(f"timeout_seconds must be between 0 and {MAX_TIMEOUT_SECONDS:.0f}")
        if not 0 <= request.heartbeat_timeout <= MAX_TIMEOUT_SECONDS:
            raise InvalidWork(f"heartbeat_timeout must be between 0 and {MAX_TIMEOUT_SECONDS:.0f}")
        check_content_type(request.content_type)
        if not -MAX_PRIORITY <= request.priority <= MAX_PRIORITY:
            raise InvalidWork(f"priority {request.priority} is outside -{MAX_PRIORITY} to {MAX_PRIORITY}")
        if not 0 <= request.delay_seconds <= MAX_DELAY_SECONDS:  # NaN fails too
            raise InvalidWork(f"delay_seconds must be between 0 and {MAX_DELAY_SECONDS:.0f} (366 days)")
        if request.not_before and request.delay_seconds:
            raise InvalidWork("set not_before or delay_seconds, not both")
        if not 0 <= request.not_before < 1e11:
            raise InvalidWork("not_before must be a Unix time in seconds (or 0: at once)")
        if now is not None and request.not_before > now + MAX_DELAY_SECONDS:
            raise InvalidWork(f"not_before is more than {MAX_DELAY_SECONDS / 86400:.0f} days ahead")
        check_backoff(request.backoff)
    except InvalidWork as exc:
        raise InvalidWork(where + str(exc)) from None
    job = defaults(request.kind) if defaults is not None else NO_DEFAULTS
    work = work_pb2.Work(
        work_id=work_id, kind=request.kind, payload=request.payload,
        max_attempts=request.max_attempts or job.max_attempts or DEFAULT_MAX_ATTEMPTS,
        timeout_seconds=timeout or job.timeout_seconds, content_type=request.content_type,
        priority=request.priority if request.HasField("priority") else job.priority,
        heartbeat_timeout=request.heartbeat_timeout or job.heartbeat_timeout,
    )
    backoff = request.backoff if request.backoff.initial_seconds else job.backoff
    if backoff.initial_seconds:
        work.backoff.CopyFrom(backoff)
    if now is not None:  # a time already past is no delay: the work is queued at once
        not_before = now + request.delay_seconds if request.delay_seconds else request.not_before
        if not_before > now:
            work.not_before = not_before
    return work


def check_backoff(backoff: work_pb2.Backoff, where: str = "backoff") -> None:
    """Raises InvalidWork unless the back-off's numbers are in range (all 0: none)."""
    initial, multiplier, cap = backoff.initial_seconds, backoff.multiplier, backoff.max_seconds
    if not (0 <= initial <= MAX_DELAY_SECONDS and (multiplier == 0 or 1 <= multiplier <= MAX_BACKOFF_MULTIPLIER)
            and 0 <= cap <= MAX_DELAY_SECONDS):
        raise InvalidWork(f"{where}: initial_seconds and max_seconds must be between 0 and "
                          f"{MAX_DELAY_SECONDS:.0f}, multiplier 0 (2) or between 1 and {MAX_BACKOFF_MULTIPLIER:g}")


def check_list(request: work_pb2.ListWorksRequest) -> None:
    """The fields of a ListWorks call that can be checked without the state."""
    if request.kind and not KIND_PATTERN.fullmatch(request.kind):
        raise InvalidWork(f"malformed kind {request.kind[:64]!r}")
    if len(request.page_token) > 300:
        raise InvalidWork("page_token: not one this listing gave")
    if request.page_size > 1000:
        raise InvalidWork(f"page_size {request.page_size} is above the limit of 1000")


def check_rate_limit(request: work_pb2.SetRateLimitRequest) -> float | None:
    """The limit a SetRateLimit call sets (None: the admin's limit goes)."""
    if not KIND_PATTERN.fullmatch(request.kind):
        raise InvalidWork(f"malformed kind {request.kind[:64]!r}")
    if not request.HasField("per_second"):
        return None
    if not 0 <= request.per_second <= MAX_RATE_LIMIT:
        raise InvalidWork(f"per_second must be between 0 (no limit) and {MAX_RATE_LIMIT:,.0f}")
    return request.per_second


def check_wait(request: work_pb2.WaitWorksRequest) -> list[str]:
    """The ids of a WaitWorks call: 1 to MAX_BATCH_WORKS well-formed ids."""
    return check_work_ids(request.work_ids, "wait for")


def check_await(request) -> None:
    """An AwaitRequest: ids to wait for and to forget, each list at most
    MAX_BATCH_WORKS well-formed ids, not both empty."""
    if not request.work_ids and not request.forget:
        raise InvalidWork("the request names no works to wait for or to forget")
    for ids, verb in ((request.work_ids, "wait for"), (request.forget, "forget")):
        if len(ids) > MAX_BATCH_WORKS:
            raise InvalidWork(f"{len(ids)} work ids to {verb} in one request; the limit is {MAX_BATCH_WORKS}")
        for work_id in ids:
            check_work_id(work_id)


def check_work_ids(work_ids, verb: str) -> list[str]:
    """The ids of a call about given works: 1 to MAX_BATCH_WORKS well-formed ids."""
    if not work_ids:
        raise InvalidWork(f"work_ids is empty: name the works to {verb}")
    if len(work_ids) > MAX_BATCH_WORKS:
        raise InvalidWork(f"{len(work_ids)} work ids in one call; the limit is {MAX_BATCH_WORKS}")
    for work_id in work_ids:
        check_work_id(work_id)
    return list(work_ids)


def valid_content_type(content_type: str) -> bool:
    """A media type such as application/json, or empty (opaque bytes)."""
    return len(content_type) <= MAX_CONTENT_TYPE_CHARS and CONTENT_TYPE_PATTERN.fullmatch(content_type) is not None


def check_content_type(content_type: str) -> None:
    if not valid_content_type(content_type):
        raise InvalidWork(f"malformed content_type {content_type[:64]!r}: use a media type such as "
                          f"application/json, at most {MAX_CONTENT_TYPE_CHARS} printable ASCII characters")


def to_works_each(requests, check_kind=None, defaults: KindDefaults | None = None, now: float | None = None
                  ) -> tuple[list[work_pb2.Work], list]:
    """Validates each submission on its own: returns the valid works, and
    for each request either its refusal (a SubmitWorkResponse with a code) or
    None where its work is in the first list (in the same order)."""
    if len(requests) > MAX_BATCH_WORKS:
        raise InvalidWork(f"{len(requests)} works in one call; the limit is {MAX_BATCH_WORKS}")
    works, answers, seen = [], [], set()
    for i, request in enumerate(requests):
        try:
            work = to_work(request, i, defaults, now)
            if work.work_id in seen:
                raise InvalidWork(f"work #{i}: work_id {work.work_id!r} appears twice in one call")
            if check_kind is not None:
                check_kind({work.kind})
        except InvalidWork as exc:
            answers.append(work_pb2.SubmitWorkResponse(work_id=request.work_id, code=INVALID_ARGUMENT_CODE,
                                                       message=str(exc)))
            continue
        seen.add(work.work_id)
        works.append(work)
        answers.append(None)
    return works, answers


def to_works(requests, defaults: KindDefaults | None = None, now: float | None = None) -> list[work_pb2.Work]:
    if not requests:
        raise InvalidWork("no works in the request")
    if len(requests) > MAX_BATCH_WORKS:
        raise InvalidWork(f"{len(requests)} works in one call; the limit is {MAX_BATCH_WORKS}")
    works = [to_work(r, i if len(requests) > 1 else None, defaults, now) for i, r in enumerate(requests)]
    seen: set[str] = set()
    for work in works:
        if work.work_id in seen:
            raise InvalidWork(f"work_id {work.work_id!r} appears twice in one call")
        seen.add(work.work_id)
    return works


class InvalidWorkerMessage(ProtocolError):
    """A worker broke the protocol; the message says how, for a person."""


def check_worker_message(message, registered: bool) -> None:
    """Checks every field of a worker's message: sizes, names, and that the
    stream registered before anything else. Reports on attempts the stream
    was not handed are not errors (they are stale); the master ignores them."""
    if not registered and not message.HasField("register"):
        raise InvalidWorkerMessage("register before anything else: the first message must carry RegisterWorker")
    if message.HasField("register"):
        r = message.register
        if not r.worker_ids:
            raise InvalidWorkerMessage("RegisterWorker names no worker slots")
        _check_slots(r.worker_ids, "RegisterWorker")
        if r.prefetch > MAX_PREFETCH:
            raise InvalidWorkerMessage(f"RegisterWorker asks a prefetch of {r.prefetch} works per slot; "
                                       f"the limit is {MAX_PREFETCH}")
        slots = set(r.worker_ids)
        if len(r.running) > len(slots) or not all(
                a.worker_id in slots and WORK_ID_PATTERN.fullmatch(a.work_id) and a.attempt_token
                and 0 <= a.seconds_left <= MAX_TIMEOUT_SECONDS for a in r.running):
            raise InvalidWorkerMessage("RegisterWorker.running: more attempts than slots, or one naming a slot it "
                                       "does not register, a malformed work id, no token, or a time out of range")
        if len(r.host) > MAX_HOST_CHARS:
            raise InvalidWorkerMessage(f"host of {len(r.host)} characters; the limit is {MAX_HOST_CHARS}")
        if len(r.busy_work_ids) > MAX_SLOTS_PER_CONNECTION * (1 + MAX_PREFETCH) or not all(
                WORK_ID_PATTERN.fullmatch(w) for w in r.busy_work_ids):
            raise InvalidWorkerMessage("busy_work_ids: too many, or a malformed work id")
        if len(r.kinds) > MAX_KINDS_PER_WORKER:
            raise InvalidWorkerMessage(f"{len(r.kinds)} kinds declared; the limit is {MAX_KINDS_PER_WORKER}")
        for kind in r.kinds:
            if not KIND_PATTERN.fullmatch(kind):
                raise InvalidWorkerMessage(f"malformed kind {kind[:64]!r}")
        if len(r.defaults) > MAX_KINDS_PER_WORKER:
            raise InvalidWorkerMessage(f"defaults for {len(r.defaults)} kinds; the limit is {MAX_KINDS_PER_WORKER}")
        for d in r.defaults:
            timeout = d.timeout_seconds
            if d.kind not in r.kinds or d.max_attempts > MAX_ATTEMPTS_LIMIT or math.isnan(timeout) \
                    or not 0 <= timeout <= MAX_TIMEOUT_SECONDS or not -MAX_PRIORITY <= d.priority <= MAX_PRIORITY \
                    or not 0 <= d.heartbeat_timeout <= MAX_TIMEOUT_SECONDS \
                    or not 0 <= d.rate_limit <= MAX_RATE_LIMIT:
                raise InvalidWorkerMessage(f"defaults of kind {d.kind[:64]!r}: a kind it does not declare, or "
                                           f"max_attempts above {MAX_ATTEMPTS_LIMIT}, a timeout, a priority or a "
                                           "rate limit out of range")
            try:
                check_backoff(d.backoff, f"defaults of kind {d.kind[:64]!r}: backoff")
            except InvalidWork as exc:
                raise InvalidWorkerMessage(str(exc)) from None
    # Reports and requests count only if they name a slot registered on this
    # stream (checked then) and, for reports, carry the token of an attempt
    # handed to it; of the rest only the result (bounded) and the error (cut)
    # are ever kept. Here only their numbers are checked.
    if len(message.request_work.worker_ids) > MAX_SLOTS_PER_CONNECTION:
        raise InvalidWorkerMessage(f"WorkerRequestsWork names {len(message.request_work.worker_ids)} slots; "
                                   f"the limit is {MAX_SLOTS_PER_CONNECTION} per stream")
    if len(message.withdraw_work.worker_ids) > MAX_SLOTS_PER_CONNECTION:
        raise InvalidWorkerMessage(f"WorkerWithdrawsWork names {len(message.withdraw_work.worker_ids)} slots; "
                                   f"the limit is {MAX_SLOTS_PER_CONNECTION} per stream")
    reports = len(message.done.completions) + len(message.failed.failures) + len(message.heartbeats.heartbeats)
    if reports > MAX_REPORTS_PER_MESSAGE:
        raise InvalidWorkerMessage(f"{reports} reports in one message; the limit is {MAX_REPORTS_PER_MESSAGE}")
    for beat in message.heartbeats.heartbeats:
        if len(beat.details) > MAX_DETAILS_CHARS or (beat.HasField("progress") and not 0 <= beat.progress <= 1):
            raise InvalidWorkerMessage(f"a heartbeat with progress outside 0 to 1, or details over "
                                       f"{MAX_DETAILS_CHARS} characters")


def _check_slots(worker_ids, where: str) -> None:
    if len(worker_ids) > MAX_SLOTS_PER_CONNECTION:
        raise InvalidWorkerMessage(
            f"{where} names {len(worker_ids)} slots; the limit is {MAX_SLOTS_PER_CONNECTION} per stream")
    for worker_id in worker_ids:
        if not WORKER_ID_PATTERN.fullmatch(worker_id):
            raise InvalidWorkerMessage(
                f"{where}: malformed worker_id {worker_id[:64]!r}: use 1-128 characters from letters, "
                "digits and . _ : @ -, starting with a letter or digit")


def check_import(request: master_pb2.ImportWorksRequest, move) -> None:
    """A part of a move (ImportWorks): well-formed ids of the moving slots,
    in the range it names, each result with its fingerprint."""
    if len(request.entries) + len(request.results) > MAX_BATCH_WORKS:
        raise InvalidWork(f"{len(request.entries) + len(request.results)} works in one part of a move; "
                          f"the limit is {MAX_BATCH_WORKS}")
    if len(request.result_fingerprints) != len(request.results):
        raise InvalidWork("a part of a move needs one fingerprint per result")
    if (request.entries or request.results) and not request.after < request.last_id:
        raise InvalidWork("a part of a move names its works' range: after < last_id")
    for work_id in [e.work.work_id for e in request.entries] + [r.work_id for r in request.results]:
        check_work_id(work_id)
        if not (request.after < work_id <= request.last_id and move.covers(slot_of(work_id))):
            raise InvalidWork(f"work {work_id!r} is not in this part of {move}")
