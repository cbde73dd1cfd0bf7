"""Client verbs of the `dworkers` command, talking to a frontend:
submit, status, watch, cluster."""

from __future__ import annotations

import json
import sys
import time

import grpc

from dworkers.common import validation
from dworkers.common.errors import ConfigError
from dworkers.common.settings import add, in_range
from dworkers.common.wire import CHANNEL_OPTIONS
from dworkers.v1 import frontend_pb2_grpc, work_pb2

STATE_NAMES = {v: k for k, v in work_pb2.State.items()}


def add_parsers(sub) -> None:
    def client_parser(name, help, description):
        p = sub.add_parser(name, help=help, description=description)
        add(p, "--frontend", "127.0.0.1:7000", help="frontend address")
        add(p, "--timeout", 30.0, type=float, help="seconds to wait for each call")
        add(p, "--log-format", "text", help="text or json", choices=("text", "json"))
        add(p, "--log-level", "WARNING", help="logging level")
        p.add_argument("--json", action="store_true", help="print JSON instead of text")
        p.set_defaults(func=main)
        return p

    p = client_parser("submit", "submit works",
                      "Submit works of one kind: one per PAYLOAD argument, or one per line of --file (- for stdin).")
    p.add_argument("kind", help="the job to run, e.g. square")
    p.add_argument("payloads", nargs="*", help="one work per payload")
    p.add_argument("--file", help="read payloads, one per line, from this file (- for stdin)")
    p.add_argument("--id", help="the work id (a single work only; default: a new UUID)")
    p.add_argument("--max-attempts", type=in_range(int, low=0, high=100), default=0,
                   help="failed attempts before the work ends FAILED (default 3)")
    p.add_argument("--work-timeout", type=in_range(float, low=0, high=24 * 3600), default=0.0,
                   help="seconds per attempt (default: the master's)")
    p.add_argument("--batch", type=in_range(int, low=1, high=10_000), default=500, help="works per call")
    p.add_argument("--wait", action="store_true", help="wait for every work's result and print it")

    p = client_parser("status", "show one work", "Show the state, attempts and result of one work.")
    p.add_argument("work_id")

    p = client_parser("watch", "stream results as they finish",
                      "Stream finished works in order; resume with --after.")
    p.add_argument("--after", type=in_range(int, low=0), default=0, help="start after this result sequence number")
    p.add_argument("--count", type=in_range(int, low=0), default=0, help="stop after this many results (0: never)")

    client_parser("cluster", "show the cluster",
                  "Show the active master, its epoch, standbys, workers and work counts.")


class ClientError(ConfigError):
    """A client verb cannot go on: said in one line."""


def main(args) -> None:
    channel = grpc.insecure_channel(args.frontend, options=CHANNEL_OPTIONS)
    stub = frontend_pb2_grpc.FrontendStub(channel)
    try:
        COMMANDS[args.command](stub, args)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.UNAVAILABLE and "frontend" not in (error.details() or "") \
                and "master" not in (error.details() or ""):
            raise ConfigError(f"cannot reach the frontend at {args.frontend} ({error.details()})") from None
        raise ConfigError(f"{error.code().name}: {error.details()}") from None
    except OSError as exc:
        raise ConfigError(str(exc)) from None
    except ValueError as exc:  # e.g. a number too large for its field
        raise ConfigError(f"bad value: {exc}") from None
    finally:
        channel.close()


def _payloads(args) -> list[bytes]:
    payloads = [p.encode() for p in args.payloads]
    if args.file:
        stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
        with stream:
            payloads += [line.rstrip("\n").encode() for line in stream if line.strip()]
    if not payloads:
        raise ClientError("nothing to submit: give payloads as arguments or with --file")
    if args.id and len(payloads) != 1:
        raise ClientError("--id names a single work; give one payload")
    return payloads


def _progress(done: int, total: int, started: float) -> None:
    if not sys.stderr.isatty():
        return
    width = 30
    filled = width * done // max(total, 1)
    rate = done / max(time.monotonic() - started, 1e-6)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {rate:,.0f}/s")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def submit(stub, args) -> None:
    payloads = _payloads(args)
    start_sequence = 0
    if args.wait:
        start_sequence = stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=args.timeout).last_sequence
    requests = [work_pb2.SubmitWorkRequest(kind=args.kind, payload=p, work_id=args.id or "",
                                           max_attempts=args.max_attempts, timeout_seconds=args.work_timeout)
                for p in payloads]
    started, ids, duplicates = time.monotonic(), [], 0
    for i in range(0, len(requests), max(1, args.batch)):
        chunk = work_pb2.SubmitWorksRequest(works=requests[i:i + args.batch])
        for r in chunk.works:  # fixed before any retry, so a retry is idempotent
            if not r.work_id:
                r.work_id = validation.new_work_id()
        response = _with_backoff(lambda chunk=chunk: stub.SubmitWorks(chunk, timeout=args.timeout))
        ids += [w.work_id for w in response.works]
        duplicates += sum(w.duplicate for w in response.works)
        _progress(len(ids), len(requests), started)
    elapsed = time.monotonic() - started
    if args.json and not args.wait:
        print(json.dumps({"submitted": len(ids), "duplicates": duplicates, "seconds": round(elapsed, 3),
                          "work_ids": ids}))
    elif not args.wait:
        if len(ids) == 1:
            print(ids[0])
        print(f"submitted {len(ids)} works ({duplicates} duplicates) in {elapsed:.2f} s", file=sys.stderr)
    if args.wait:
        _wait(stub, args, set(ids), start_sequence)


def _with_backoff(call, tries: int = 8):
    delay = 0.1
    for attempt in range(tries):
        try:
            return call()
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt == tries - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _wait(stub, args, ids: set[str], after: int) -> None:
    waiting = set(ids)
    # Works that finished before we started watching (e.g. duplicates).
    for work_id in list(waiting):
        status = stub.GetWork(work_pb2.GetWorkRequest(work_id=work_id), timeout=args.timeout)
        if status.state in (work_pb2.DONE, work_pb2.FAILED) and status.sequence <= after:
            _print_result(args, work_pb2.WorkResult(sequence=status.sequence, work_id=work_id, state=status.state,
                                                    result=status.result, error=status.error, kind=status.kind))
            waiting.discard(work_id)
    if not waiting:
        return
    stream = stub.WatchResults(work_pb2.WatchResultsRequest(after_sequence=after))
    try:
        for batch in stream:
            for result in batch.results:
                if result.work_id in waiting:
                    waiting.discard(result.work_id)
                    _print_result(args, result)
            if not waiting:
                return
    finally:
        stream.cancel()
    raise ClientError(f"the result stream ended before {len(waiting)} works finished")


def _result_dict(r: work_pb2.WorkResult) -> dict:
    return {"sequence": r.sequence, "work_id": r.work_id, "kind": r.kind, "state": STATE_NAMES[r.state],
            "result": r.result.decode(errors="replace"), "error": r.error, "attempts": r.attempts}


def _print_result(args, r: work_pb2.WorkResult) -> None:
    if args.json:
        print(json.dumps(_result_dict(r)), flush=True)
    else:
        text = r.result.decode(errors="replace") if r.state == work_pb2.DONE else r.error
        print(f"{r.sequence:>8}  {r.work_id}  {STATE_NAMES[r.state]:<6}  {text}", flush=True)


def status(stub, args) -> None:
    s = stub.GetWork(work_pb2.GetWorkRequest(work_id=args.work_id), timeout=args.timeout)
    info = {"work_id": s.work_id, "kind": s.kind, "state": STATE_NAMES[s.state], "attempts": s.attempts,
            "result": s.result.decode(errors="replace"), "error": s.error, "sequence": s.sequence}
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:>9}: {value}")


def watch(stub, args) -> None:
    stream = stub.WatchResults(work_pb2.WatchResultsRequest(after_sequence=args.after))
    seen = 0
    try:
        for batch in stream:
            for result in batch.results:
                _print_result(args, result)
                seen += 1
                if args.count and seen >= args.count:
                    return
    finally:
        stream.cancel()


def cluster(stub, args) -> None:
    info = stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=args.timeout)
    data = {
        "master": {"address": info.master.address, "epoch": info.master.epoch},
        "standbys": [{"address": s.address, "epoch": s.epoch} for s in info.standbys],
        "workers": [{"worker_id": w.worker_id, "status": w.status, "work_id": w.work_id, "host": w.host}
                    for w in info.workers],
        "kinds": [{"kind": k.kind, "slots": k.slots, "idle_slots": k.idle_slots, "pending": k.pending}
                  for k in info.kinds],
        "pending": info.pending, "in_progress": info.in_progress, "done": info.done,
        "failed": info.failed, "last_sequence": info.last_sequence,
        "pending_without_worker": info.pending_without_worker, "worker_slots": info.worker_slots,
        "unfinished_bytes": info.unfinished_bytes, "retained_result_bytes": info.retained_result_bytes,
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return
    print(f"master     {info.master.address}  (epoch {info.master.epoch})")
    for s in info.standbys:
        print(f"standby    {s.address}  (epoch {s.epoch})")
    print(f"works      pending {info.pending}  in progress {info.in_progress}  done {info.done}  failed {info.failed}")
    if info.pending_without_worker:
        print(f"waiting    {info.pending_without_worker} pending works have no live worker for their kind")
    for k in info.kinds:
        print(f"kind       {k.kind:<20} slots {k.slots:>4} ({k.idle_slots} idle)  pending {k.pending}")
    print(f"workers    {info.worker_slots}")
    if info.workers:
        width = max(len(w.worker_id) for w in info.workers)
        print(f"  {'WORKER':<{width}}  STATUS  WORK")
        for w in sorted(info.workers, key=lambda w: w.worker_id):
            print(f"  {w.worker_id:<{width}}  {w.status:<6}  {w.work_id}")


COMMANDS = {"submit": submit, "status": status, "watch": watch, "cluster": cluster}
