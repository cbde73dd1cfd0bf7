"""Checks on submitted work, shared by the master (the authority) and the
frontend (which rejects bad input before it crosses the network)."""

from __future__ import annotations

import math
import re
import uuid

from dworkers.v1 import work_pb2

MAX_PAYLOAD_BYTES = 256 * 1024  # per work; documented in the README
MAX_RESULT_BYTES = 256 * 1024  # a larger result fails its attempt
MAX_ERROR_CHARS = 4096  # longer error messages are cut
MERGE_BYTES = 4 * 1024 * 1024  # messages merged for one stream stay below this (gRPC allows 16 MB)
MAX_BATCH_WORKS = 10_000
MAX_ATTEMPTS_LIMIT = 100
DEFAULT_MAX_ATTEMPTS = 3
MAX_TIMEOUT_SECONDS = 24 * 3600.0
WORK_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
KIND_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


class InvalidWork(ValueError):
    """The request is malformed; the message says how, for a person."""


def new_work_id() -> str:
    return str(uuid.uuid4())


def check_work_id(work_id: str) -> None:
    if not WORK_ID_PATTERN.fullmatch(work_id):
        raise InvalidWork(
            f"malformed work_id {work_id[:64]!r}: use 1-128 characters from "
            "letters, digits and . _ : @ -, starting with a letter or digit"
        )


def to_work(request: work_pb2.SubmitWorkRequest, index: int | None = None) -> work_pb2.Work:
    """Validates one submission and returns the work to store (defaults filled in)."""
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
    except InvalidWork as exc:
        raise InvalidWork(where + str(exc)) from None
    return work_pb2.Work(
        work_id=work_id, kind=request.kind, payload=request.payload,
        max_attempts=request.max_attempts or DEFAULT_MAX_ATTEMPTS,
        timeout_seconds=timeout,
    )


def to_works(requests) -> list[work_pb2.Work]:
    if not requests:
        raise InvalidWork("no works in the request")
    if len(requests) > MAX_BATCH_WORKS:
        raise InvalidWork(f"{len(requests)} works in one call; the limit is {MAX_BATCH_WORKS}")
    works = [to_work(r, i if len(requests) > 1 else None) for i, r in enumerate(requests)]
    seen: set[str] = set()
    for work in works:
        if work.work_id in seen:
            raise InvalidWork(f"work_id {work.work_id!r} appears twice in one call")
        seen.add(work.work_id)
    return works
