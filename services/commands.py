"""Client verbs of the `dworkers` command, talking to a frontend:
submit, status, watch, cluster."""

from __future__ import annotations

import datetime
import json
import sys
import textwrap
import time

import grpc

from dworkers import credentials
from dworkers.client import Client, Result, SubmitError, WatchCursor
from dworkers.codec import decode_result
from dworkers.common.errors import ConfigError
from dworkers.common.settings import add, boolean, in_range
from dworkers.credentials import Tls
from dworkers.v1 import frontend_pb2_grpc, work_pb2

STATE_NAMES = {v: k for k, v in work_pb2.State.items()}


def add_parsers(sub) -> None:
    def client_parser(name, help, description):
        p = sub.add_parser(name, help=help, description=description)
        add(p, "--frontend", "127.0.0.1:7000", help="frontend address")
        add(p, "--timeout", 30.0, type=float, help="seconds to wait for each call, and for --wait")
        add_tls_flags(p, "the frontend")
        add(p, "--token-file", "", help="a file holding the bearer token for a frontend that checks access "
                                        "(or the token itself in DWORKERS_TOKEN)")
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
    p.add_argument("--priority", type=in_range(int, low=-1000, high=1000), default=None,
                   help="higher first (default: the job's, else 0)")
    p.add_argument("--delay", type=in_range(float, low=0, high=366 * 86400), default=0.0,
                   help="seconds before the works may start (they wait SCHEDULED)")
    p.add_argument("--batch", type=in_range(int, low=1, high=10_000), default=500, help="works per call")
    p.add_argument("--wait", action="store_true", help="wait (within --timeout) for every work's result and print "
                                                       "it; exit 1 if any FAILED")

    p = client_parser("status", "show one work", "Show the state, attempts and result of one work.")
    p.add_argument("work_id")
    p.add_argument("--wait", action="store_true", help="wait (within --timeout) until it finishes; exit 1 if it "
                                                       "FAILED")
    p.add_argument("--follow", action="store_true", help="print its state and progress as they change, until it "
                                                         "finishes (within --timeout); exit 1 if it FAILED")

    p = client_parser("watch", "stream results as they finish",
                      "Stream finished works in order; resume with --after.")
    p.add_argument("--after", type=in_range(int, low=0), default=0, help="start after this result sequence number")
    p.add_argument("--resume-token", default="", help="start after the result that carried this token (--json "
                                                      "prints it on a cluster of several shards)")
    p.add_argument("--count", type=in_range(int, low=0), default=0, help="stop after this many results (0: never)")

    p = client_parser("cancel", "cancel works",
                      "Cancel works: pending and scheduled ones end CANCELLED at once, running ones too (their jobs "
                      "are stopped). All or none: an unknown or already finished work refuses the call.")
    p.add_argument("work_ids", nargs="+")

    p = client_parser("retry", "retry failed or cancelled works",
                      "Queue FAILED or CANCELLED works again, with fresh attempts. All or none: an unknown work, or "
                      "one in another state, refuses the call.")
    p.add_argument("work_ids", nargs="+")

    p = client_parser("list", "list works in one state",
                      "List works in one state, oldest first (queued, scheduled, running or finished), with their "
                      "attempts and last error.")
    p.add_argument("state", type=str.upper, choices=("PENDING", "SCHEDULED", "IN_PROGRESS", "DONE", "FAILED",
                                                     "CANCELLED"))
    p.add_argument("--kind", default="", help="only works of this kind")
    p.add_argument("--limit", type=in_range(int, low=1), default=100, help="at most this many (default 100)")

    p = client_parser("rate-limit", "limit how often works of a kind start",
                      "At most PER_SECOND works of KIND start per second across the cluster (0: no limit), "
                      "whatever the job's rate_limit says; --clear lets the job's apply again.")
    p.add_argument("kind")
    p.add_argument("per_second", nargs="?", type=in_range(float, low=0, high=1e6), default=None)
    p.add_argument("--clear", action="store_true", help="remove the limit set here")

    client_parser("cluster", "show the cluster",
                  "Show the active master, its epoch, standbys, workers and work counts.")


class ClientError(ConfigError):
    """A client verb cannot go on: said in one line."""


class WorksFailed(ClientError):
    """Every work finished, but some FAILED (exit status 1, not 2)."""

    exit_status = 1


def _unreachable(address: str, code: str, details: str) -> str | None:
    """The one line for a frontend that is not there (None if it answered)."""
    if code == "UNAVAILABLE" and "frontend" not in details and "master" not in details:
        return f"cannot reach the frontend at {address} ({details})"
    return None


def add_tls_flags(p, server: str) -> None:
    add(p, "--tls", False, type=boolean, help=f"TLS to {server} (on too with any --tls-* file)")
    add(p, "--tls-ca", "", help=f"PEM CA bundle to trust for {server} (empty: the system's)")
    add(p, "--tls-cert", "", help=f"PEM client certificate, for {server} if it requires one")
    add(p, "--tls-key", "", help="PEM private key of --tls-cert")
    add(p, "--tls-server-name", "", help=f"the name in {server}'s certificate, if not its host")


def tls_of(args) -> Tls | bool:
    """The TLS the flags of add_tls_flags ask for (their environment variables included)."""
    files = Tls(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name)
    return files if args.tls or files != Tls() else False


def token_of(args) -> str | None:
    return credentials.read_token(args.token_file) if args.token_file else None


def main(args) -> None:
    channel = credentials.channel(args.frontend, tls_of(args), token=token_of(args))
    stub = frontend_pb2_grpc.FrontendStub(channel)
    try:
        COMMANDS[args.command](stub, args)
    except grpc.RpcError as error:
        unreachable = _unreachable(args.frontend, error.code().name, error.details() or "")
        if unreachable:
            raise ConfigError(unreachable) from None
        raise ConfigError(f"{error.code().name}: {error.details()}") from None
    except BrokenPipeError:
        raise  # the reader has all it wanted: the command ends quietly (cli.main)
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


def _progress(what: str, done: int, total: int, started: float) -> None:
    if not sys.stderr.isatty() or total < 2:
        return
    width = 30
    filled = width * done // max(total, 1)
    rate = done / max(time.monotonic() - started, 1e-6)
    sys.stderr.write(f"\r{what:<8} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {rate:,.0f}/s")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def submit(stub, args) -> None:
    """Pipelined through the SDK's client: batched by count and bytes, ids
    fixed before any retry (idempotent)."""
    payloads = _payloads(args)
    started = time.monotonic()
    with Client(args.frontend, timeout=args.timeout, batch_works=args.batch, tls=tls_of(args),
                token=token_of(args)) as client:
        handles = [client.submit(args.kind, payload=p, work_id=args.id or None, max_attempts=args.max_attempts,
                                 timeout=args.work_timeout, priority=args.priority, delay=args.delay)
                   for p in payloads]
        ids, duplicates, refused = [], 0, []
        for done, handle in enumerate(handles, 1):
            try:
                duplicates += handle.accepted(max(0.0, started + args.timeout - time.monotonic()))
                ids.append(handle.id)
            except SubmitError as exc:
                unreachable = _unreachable(args.frontend, exc.code, exc.message)
                if unreachable:
                    raise ClientError(unreachable) from None
                refused.append(str(exc))
            except TimeoutError as exc:
                refused.append(str(exc))
            _progress("accepted", done, len(handles), started)
        elapsed = time.monotonic() - started
        if len(handles) == 1 and refused:
            raise ClientError(refused[0])
        if args.json and not args.wait:
            print(json.dumps({"submitted": len(ids), "duplicates": duplicates, "seconds": round(elapsed, 3),
                              "work_ids": ids, "refused": refused}))
        elif not args.wait and ids:
            print("\n".join(ids))
        if not args.json:
            print(f"submitted {_plural(len(ids), 'work')} ({_plural(duplicates, 'duplicate')}) in {elapsed:.2f} s",
                  file=sys.stderr)
        for reason in refused[:10]:
            print(f"dworkers: {reason}", file=sys.stderr)
        if args.wait:
            accepted = set(ids)
            failed = _wait(client, args, [h for h in handles if h.id in accepted])
            if failed:
                raise WorksFailed(f"{_plural(failed, 'work')} of {len(ids)} FAILED")
        if refused:
            raise ClientError(f"{_plural(len(refused), 'work')} of {len(handles)} not accepted")


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def _wait(client: Client, args, handles: list) -> int:
    """Prints each work's result as it finishes, within --timeout; returns
    how many FAILED."""
    if not args.json:
        print(f"waiting for {_plural(len(handles), 'result')} (at most {args.timeout:g} s)", file=sys.stderr)
    started, failed = time.monotonic(), 0
    try:
        for done, handle in enumerate(client.as_completed(handles, timeout=args.timeout), 1):
            result = handle._result
            failed += result.state != "DONE"
            _print_result(args, result)
            _progress("finished", done, len(handles), started)
    except TimeoutError as exc:
        raise ClientError(f"not all works finished within --timeout {args.timeout:g} s ({exc})") from None
    return failed


def _shown(value) -> str | object:
    """A result value for printing: JSON values as they are, bytes as text where they are text."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value


def _result_dict(r: Result) -> dict:
    shards = {"shard": r.shard, "resume_token": r.resume_token} if r.resume_token else {}
    return {"sequence": r.sequence, "work_id": r.work_id, "kind": r.kind, "state": r.state,
            "result": _shown(r.value), "error": r.error, "attempts": r.attempts, **shards}


def _print_result(args, r: Result) -> None:
    if args.json:
        print(json.dumps(_result_dict(r)), flush=True)
    else:
        shown = _shown(r.value)
        # one line per result: an error's traceback is in --json and in `status`
        text = (shown if isinstance(shown, str) else json.dumps(shown)) if r.state == "DONE" \
            else r.error.split("\n", 1)[0]
        where = f"{r.shard}:{r.sequence}" if r.resume_token else str(r.sequence)
        print(f"{where:>8}  {r.work_id}  {r.state:<6}  {text}", flush=True)


def _progress_line(s: work_pb2.WorkStatus) -> str:
    line = f"{STATE_NAMES[s.state]:<11} attempt {s.attempts}"
    if s.HasField("progress"):
        line += f"  {s.progress:6.1%}"
    return line + (f"  {s.progress_details}" if s.progress_details else "")


def follow(stub, args) -> work_pb2.WorkStatus:
    """Prints a work's state and progress as they change, until it finishes."""
    deadline, last = time.monotonic() + args.timeout, ""
    while True:
        s = stub.GetWork(work_pb2.GetWorkRequest(work_id=args.work_id), timeout=args.timeout)
        line = _progress_line(s)
        if line != last:
            print(json.dumps({"state": STATE_NAMES[s.state], "attempts": s.attempts,
                              "progress": s.progress if s.HasField("progress") else None,
                              "details": s.progress_details}) if args.json else line, flush=True)
            last = line
        if s.sequence:  # finished
            return s
        if time.monotonic() > deadline:
            raise ClientError(f"work {args.work_id} did not finish within --timeout {args.timeout:g} s")
        time.sleep(0.5)


def status(stub, args) -> None:
    if args.follow:
        s = follow(stub, args)
        if s.state in (work_pb2.FAILED, work_pb2.CANCELLED):
            raise WorksFailed(f"work {args.work_id} {STATE_NAMES[s.state]}")
        return
    if args.wait:
        with Client(args.frontend, timeout=args.timeout, tls=tls_of(args), token=token_of(args)) as client:
            try:
                for _ in client._wait([args.work_id], time.monotonic() + args.timeout):
                    pass
            except TimeoutError:
                raise ClientError(f"work {args.work_id} did not finish within --timeout {args.timeout:g} s") from None
    s = stub.GetWork(work_pb2.GetWorkRequest(work_id=args.work_id), timeout=args.timeout)
    result = _shown(decode_result(s.result, s.content_type)) if s.state == work_pb2.DONE else ""
    info = {"work_id": s.work_id, "kind": s.kind, "state": STATE_NAMES[s.state], "attempts": s.attempts,
            "result": result, "error": s.error, "sequence": s.sequence, "priority": s.priority}
    if s.HasField("progress") or s.progress_details:
        info["progress"] = f"{s.progress:.1%} {s.progress_details}".strip() if s.HasField("progress") \
            else s.progress_details
    if s.state == work_pb2.SCHEDULED:
        info["not_before"] = datetime.datetime.fromtimestamp(s.not_before, datetime.timezone.utc).isoformat()
    if args.json:
        print(json.dumps(info))
    else:
        error, _, traceback = s.error.partition("\n")
        info["error"] = error
        for key, value in info.items():
            print(f"{key:>9}: {value}")
        if traceback:
            print(textwrap.indent(traceback.rstrip("\n"), " " * 11))
    if args.wait and s.state in (work_pb2.FAILED, work_pb2.CANCELLED):
        raise WorksFailed(f"work {args.work_id} {STATE_NAMES[s.state]}")


def rate_limit(stub, args) -> None:
    if (args.per_second is None) != args.clear:
        raise ClientError("give PER_SECOND, or --clear")
    request = work_pb2.SetRateLimitRequest(kind=args.kind)
    if args.per_second is not None:
        request.per_second = args.per_second
    info = stub.SetRateLimit(request, timeout=args.timeout)
    limit = f"{info.rate_limit:g}/s" if info.rate_limit else "none"
    source = "set by an admin" if info.rate_limit_set_by_admin else "the job's own"
    print(f"{info.kind}: rate limit {limit} ({source})")


def list_works(stub, args) -> None:
    token, shown = "", 0
    while shown < args.limit:
        page = stub.ListWorks(work_pb2.ListWorksRequest(
            state=work_pb2.State.Value(args.state), kind=args.kind, page_token=token,
            page_size=min(1000, args.limit - shown)), timeout=args.timeout)
        for s in page.works:
            if args.json:
                print(json.dumps({"work_id": s.work_id, "kind": s.kind, "state": STATE_NAMES[s.state],
                                  "attempts": s.attempts, "priority": s.priority, "error": s.error,
                                  "sequence": s.sequence}), flush=True)
            else:
                error = s.error.split("\n", 1)[0]
                print(f"{s.work_id}  {s.kind}  {STATE_NAMES[s.state]}  attempts {s.attempts}"
                      + (f"  {error}" if error else ""), flush=True)
        shown += len(page.works)
        token = page.next_page_token
        if not token:
            break


def retry(stub, args) -> None:
    response = stub.RetryWork(work_pb2.RetryWorkRequest(work_ids=args.work_ids), timeout=args.timeout)
    _print_statuses(args, "retried", response.works)


def cancel(stub, args) -> None:
    response = stub.CancelWork(work_pb2.CancelWorkRequest(work_ids=args.work_ids), timeout=args.timeout)
    _print_statuses(args, "cancelled", response.works)


def _print_statuses(args, done: str, statuses) -> None:
    if args.json:
        print(json.dumps({done: [s.work_id for s in statuses]}))
    else:
        for s in statuses:
            print(f"{s.work_id}  {STATE_NAMES[s.state]}")


def watch(stub, args) -> None:
    cursor = WatchCursor(args.after, args.resume_token)
    stream = stub.WatchResults(cursor.request())
    seen = 0
    try:
        for batch in stream:
            for result in cursor.fresh(batch):
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
        "kinds": [{"kind": k.kind, "slots": k.slots, "idle_slots": k.idle_slots, "pending": k.pending,
                   "rate_limit": k.rate_limit} for k in info.kinds],
        "pending": info.pending, "in_progress": info.in_progress, "done": info.done,
        "failed": info.failed, "last_sequence": info.last_sequence,
        "pending_without_worker": info.pending_without_worker, "worker_slots": info.worker_slots,
        "unfinished_bytes": info.unfinished_bytes, "retained_result_bytes": info.retained_result_bytes,
        "scheduled": info.scheduled, "cancelled": info.cancelled,
        "shards": [{"shard": s.shard, "slots": s.slots, "master": s.master.address, "epoch": s.master.epoch,
                    "pending": s.pending, "in_progress": s.in_progress, "done": s.done, "failed": s.failed,
                    "map_version": s.map_version, "error": s.error, "moving": s.moving} for s in info.shards],
        "move": next((s.move for s in info.shards if s.move), ""),
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return
    print(f"master     {info.master.address}  (epoch {info.master.epoch})")
    for s in info.standbys:
        print(f"standby    {s.address}  (epoch {s.epoch})")
    for s in info.shards:
        state = s.error or (f"{s.master.address}  (epoch {s.master.epoch})  pending {s.pending}  in progress "
                            f"{s.in_progress}  done {s.done}  failed {s.failed}")
        moving = f"  ({s.moving} moving)" if s.moving else ""
        print(f"shard {s.shard:<4} {s.slots:>4} slots  {state}{moving}")
    if data["move"]:
        print(f"moving     {data['move']}")
    print(f"works      pending {info.pending}  scheduled {info.scheduled}  in progress {info.in_progress}  "
          f"done {info.done}  failed {info.failed}  cancelled {info.cancelled}")
    if info.pending_without_worker:
        print(f"waiting    {info.pending_without_worker} pending works have no live worker for their kind")
    for k in info.kinds:
        limit = f"  at most {k.rate_limit:g}/s" if k.rate_limit else ""
        print(f"kind       {k.kind:<20} slots {k.slots:>4} ({k.idle_slots} idle)  pending {k.pending}{limit}")
    print(f"workers    {info.worker_slots}")
    if info.workers:
        width = max(len(w.worker_id) for w in info.workers)
        print(f"  {'WORKER':<{width}}  STATUS  WORK")
        for w in sorted(info.workers, key=lambda w: w.worker_id):
            print(f"  {w.worker_id:<{width}}  {w.status:<6}  {w.work_id}")


COMMANDS = {"submit": submit, "status": status, "watch": watch, "cluster": cluster, "cancel": cancel,
            "rate-limit": rate_limit, "list": list_works, "retry": retry}
