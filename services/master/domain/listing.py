"""Listing works in one state, page by page, in an order that stays stable
while works come and go (see ListWorksRequest). Pure: reads WorkState.

A page token is `<state number>:<cursor>`; the cursor is the last listed
work's place: its queue ticket (pending), its time and id (scheduled), its
id (in progress) or its result sequence (finished). Works a move holds
apart (not handed out while their slots are copied to another shard) are
listed too: pending ones after the queue, by id (cursor `h<id>`),
scheduled ones among the others."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator

from dworkers.common.errors import InvalidInput
from dworkers.master.domain.state import Entry, WorkState
from dworkers.v1 import work_pb2

DEFAULT_PAGE = 100
MAX_PAGE = 1000
FINISHED = (work_pb2.DONE, work_pb2.FAILED, work_pb2.CANCELLED)


def list_works(state: WorkState, which: int, kind: str = "", token: str = "", size: int = 0
               ) -> tuple[list[work_pb2.WorkStatus], str]:
    """A page of works in state `which` (of `kind`, if given) after the
    page token; returns them (without result bytes) and the next token
    (empty after the last page)."""
    if which not in (work_pb2.PENDING, work_pb2.SCHEDULED, work_pb2.IN_PROGRESS, *FINISHED):
        raise InvalidInput("state: choose PENDING, SCHEDULED, IN_PROGRESS, DONE, FAILED or CANCELLED")
    if size > MAX_PAGE:
        raise InvalidInput(f"page_size {size} is above the limit of {MAX_PAGE}")
    size = size or DEFAULT_PAGE
    cursor = _cursor(token, which)
    places: Iterator[tuple[str, str]]  # (work id, its cursor)
    if which == work_pb2.PENDING:
        places = _pending(state, kind, cursor)
    elif which == work_pb2.SCHEDULED:
        at, _, last_id = cursor.partition("/")
        after_key = (float(at or "-inf"), last_id)
        held = (e for e in state.held.values() if e.ready_at)
        ordered = sorted((e.ready_at, e.work_id) for e in _of_kind(itertools.chain(state.scheduled.values(), held),
                                                                       kind))
        places = ((work_id, f"{ready_at!r}/{work_id}") for ready_at, work_id in ordered
                  if (ready_at, work_id) > after_key)
    elif which == work_pb2.IN_PROGRESS:
        ids = sorted(e.work_id for e in _of_kind(state.in_progress.values(), kind) if e.work_id > cursor)
        places = ((work_id, work_id) for work_id in ids)
    else:
        first = max(int(cursor or 0), state.forgotten_up_to) + 1
        results = (state.results.get(s) for s in range(first, state.last_sequence + 1))
        finished = state.finished  # a work's latest result only: one retried since has a later one, or none yet
        places = ((r.work_id, str(r.sequence)) for r in results
                  if r is not None and r.state == which and (not kind or r.kind == kind)
                  and finished.get(r.work_id) is r)
    page = list(itertools.islice(places, size + 1))
    statuses = []
    for work_id, _ in page[:size]:
        status = state.status(work_id)
        if status is not None:
            status.ClearField("result")
            statuses.append(status)
    return statuses, f"{which}:{page[size - 1][1]}" if len(page) > size else ""


def _pending(state: WorkState, kind: str, cursor: str) -> Iterator[tuple[str, str]]:
    """The queue in order, then the pending works a move holds, by id."""
    if not cursor.startswith("h"):
        after = int(cursor or -1)
        yield from ((e.work_id, str(e.ticket)) for e in _of_kind(state.pending.entries(), kind) if e.ticket > after)
    last_id = cursor[1:] if cursor.startswith("h") else ""
    held = sorted(e.work_id for e in _of_kind(state.held.values(), kind) if not e.ready_at and e.work_id > last_id)
    yield from ((work_id, f"h{work_id}") for work_id in held)


def _of_kind(entries: Iterable[Entry], kind: str) -> Iterable[Entry]:
    return entries if not kind else (e for e in entries if e.kind == kind)


def _cursor(token: str, which: int) -> str:
    if not token:
        return ""
    state, _, cursor = token.partition(":")
    if state != str(which) or not cursor or len(token) > 300:
        raise InvalidInput("page_token: not one this listing gave (a token only goes with the state it came from)")
    try:  # the cursor must parse as this state's kind of place
        if which == work_pb2.PENDING and cursor.startswith("h"):
            pass  # past the queue: the last held work's id
        elif which in (work_pb2.PENDING, *FINISHED):
            int(cursor)
        elif which == work_pb2.SCHEDULED and not math.isfinite(float(cursor.partition("/")[0])):
            raise ValueError(cursor)
    except ValueError:
        raise InvalidInput("page_token: malformed") from None
    return cursor
