"""What the dashboard's JSON endpoints answer: the frontend's messages shaped
for a browser (pure functions, no I/O)."""

from __future__ import annotations

import json
from typing import Any

from dworkers import codec
from dworkers.v1 import work_pb2

SHOWN_RESULT_BYTES = 64 * 1024  # of a result's bytes, pretty-printed or as hex; the size says the rest
STATES = ("PENDING", "SCHEDULED", "IN_PROGRESS", "DONE", "FAILED", "CANCELLED")
CANCELLABLE = ("PENDING", "SCHEDULED", "IN_PROGRESS")
RETRYABLE = ("FAILED", "CANCELLED")


def state_name(state: int) -> str:
    return work_pb2.State.Name(state)


def state_number(name: str) -> int:
    """A state's number from its name (any case); ValueError names the valid ones."""
    try:
        return work_pb2.State.Value(name.upper())
    except ValueError:
        raise ValueError(f"unknown state {name[:32]!r}: one of {', '.join(STATES)}") from None


def _backend(backend: work_pb2.BackendInfo) -> dict[str, Any] | None:
    if not backend.address and not backend.node:
        return None
    return {"address": backend.address, "epoch": backend.epoch, "node": backend.node}


def overview(info: work_pb2.ClusterInfoResponse, now: float) -> dict[str, Any]:
    return {
        "time": now,
        "master": _backend(info.master),
        "standbys": [_backend(b) for b in info.standbys],
        "counts": {"PENDING": info.pending, "SCHEDULED": info.scheduled, "IN_PROGRESS": info.in_progress,
                   "DONE": info.done, "FAILED": info.failed, "CANCELLED": info.cancelled},
        "finished": info.done + info.failed + info.cancelled,
        "last_sequence": info.last_sequence,
        "oldest_pending_seconds": info.oldest_pending_seconds,
        "pending_without_worker": info.pending_without_worker,
        "worker_slots": info.worker_slots,
        "unfinished_bytes": info.unfinished_bytes,
        "retained_result_bytes": info.retained_result_bytes,
        "kinds": [{"kind": k.kind, "slots": k.slots, "idle_slots": k.idle_slots, "pending": k.pending,
                   "rate_limit": k.rate_limit} for k in info.kinds],
        "workers": [{"worker_id": w.worker_id, "identity": w.identity, "host": w.host, "status": w.status,
                     "work_id": w.work_id, "kinds": list(w.kinds), "seconds_since_seen": w.seconds_since_seen,
                     "progress": w.progress if w.HasField("progress") else None} for w in info.workers],
    }


def rendered(data: bytes, content_type: str) -> dict[str, Any]:
    """Result (or payload) bytes for a person: JSON pretty-printed, text as
    text, anything else as hex; at most SHOWN_RESULT_BYTES of them."""
    shown = data[:SHOWN_RESULT_BYTES]
    out: dict[str, Any] = {"size": len(data), "content_type": content_type, "truncated": len(data) > len(shown)}
    if content_type == codec.JSON and not out["truncated"]:
        try:
            out["json"] = json.dumps(json.loads(data), indent=2, ensure_ascii=False)
            return out
        except ValueError:
            pass
    if content_type.startswith("text/"):
        out["text"] = shown.decode(errors="replace")
    else:
        out["hex"] = shown.hex(" ", 2)
    return out


def work(status: work_pb2.WorkStatus, with_result: bool = True) -> dict[str, Any]:
    state = state_name(status.state)
    out: dict[str, Any] = {
        "work_id": status.work_id, "kind": status.kind, "state": state, "attempts": status.attempts,
        "priority": status.priority, "error": status.error, "sequence": status.sequence,
        "not_before": status.not_before or None,
        "progress": status.progress if status.HasField("progress") else None,
        "progress_details": status.progress_details,
        "cancellable": state in CANCELLABLE, "retryable": state in RETRYABLE,
    }
    if state == "DONE" and with_result:
        out["result"] = rendered(status.result, status.content_type)
    return out


def page(response: work_pb2.ListWorksResponse) -> dict[str, Any]:
    return {"works": [work(w, with_result=False) for w in response.works],  # ListWorks carries no result bytes
            "next_page_token": response.next_page_token}


def preview(data: bytes, content_type: str, chars: int = 120) -> str:
    """A result on one short line: JSON and text as text, bytes as their size."""
    if content_type == codec.JSON or content_type.startswith("text/"):
        text = " ".join(data[:chars * 4].decode(errors="replace").split())
        return text if len(text) <= chars else text[:chars - 1] + "…"
    return f"{len(data):,} bytes"


def result(r: work_pb2.WorkResult) -> dict[str, Any]:
    """One line of the live tail: the last line of an error, a preview of a result."""
    lines = r.error.strip().splitlines()
    return {"sequence": r.sequence, "work_id": r.work_id, "kind": r.kind, "state": state_name(r.state),
            "attempts": r.attempts, "error": lines[-1][:200] if lines else "",
            "preview": preview(r.result, r.content_type) if r.state == work_pb2.DONE else ""}
