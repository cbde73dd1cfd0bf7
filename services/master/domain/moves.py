"""Moving slots between shards: what the source sends (pure: built from its
state; the shell adds payloads and results its journal keeps apart).

A move goes, on the source shard's master: MoveStarted (the slots' pending
and scheduled works are held apart, running ones finish here), then the
held works, those kept to be retried and the retained results of the slots
are copied to the target in parts ordered by work id (the target journals
each part, WorksImported, and says how far it got), then MoveReleased (they
are gone from here), then the shard map names the target as their owner.
Each step is journaled or stored before the next, so the source's next
master, or the target's, resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Container

from dworkers.common.shards import slot_of
from dworkers.master.domain.state import WorkState, recorded
from dworkers.v1 import master_pb2

PART_ITEMS = 1_000  # works per ImportWorks call...
PART_BYTES = 1024 * 1024  # ...and bytes, beyond the first work (payloads and results are up to 1 MiB each)
RELEASED_PER_EVENT = 10_000  # work ids per MoveReleased event


def running_in(state: WorkState, first: int, last: int, running: Container[int] = ()) -> int:
    """Works of the slots that run here (a move waits for them): in progress,
    or held with an attempt a slot still runs (queued again by a failover
    while its worker goes on: its report still counts)."""
    return sum(1 for work_id in state.in_progress if first <= slot_of(work_id) <= last) + \
        sum(1 for entry in state.held.values() if entry.token and entry.token in running)


def ids_to_move(state: WorkState, first: int, last: int) -> list[str]:
    """Every work of the slots the target must know, in the order they are sent."""
    def moving(work_id: str) -> bool:
        return first <= slot_of(work_id) <= last

    ids = set(state.held)
    ids.update(w for w in state.finished if moving(w))
    ids.update(w for w in state.retryable if moving(w))
    return sorted(ids)


def export_part(state: WorkState, ids: list[str], start: int, move_key: str, source: int,
                limit: int = PART_ITEMS) -> tuple[master_pb2.ImportWorksRequest, int]:
    """The part of `ids` from `start` on that fits one call (`limit` works at
    most), and where the next starts. Ids that left the state meanwhile
    (forgotten) are skipped."""
    request = master_pb2.ImportWorksRequest(move_key=move_key, source_shard=source,
                                            after=ids[start - 1] if start else "")
    size, i = 0, start
    while i < len(ids) and (i == start or (i - start < limit and size < PART_BYTES)):
        work_id = ids[i]
        i += 1
        entry = state.held.get(work_id)
        if entry is not None:
            size += entry.size
            request.entries.append(recorded(entry))
            continue
        result = state.finished.get(work_id)
        if result is None or state.unfinished(work_id) is not None:
            continue
        request.results.append(result)
        request.result_fingerprints.append(state.fingerprints.get(work_id, b""))
        size += result.ByteSize()
        kept = state.retryable.get(work_id)
        if kept is not None:
            size += kept[1].size
            request.entries.append(recorded(kept[1], retryable_until=kept[0]))
    request.last_id = ids[i - 1] if i > start else request.after
    return request, i
