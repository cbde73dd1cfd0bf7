"""Generated requests, valid and invalid, thrown at a live frontend.

Every call is either accepted (its work ids, with `duplicate` set exactly for
ids accepted before) or refused with INVALID_ARGUMENT, ALREADY_EXISTS or
RESOURCE_EXHAUSTED and a message. Afterwards every accepted work is in the
result stream exactly once (DONE with n * n, or FAILED when the `square` job
cannot parse its payload), nothing else is, and every service is alive.

The expectations come from the README's limits, not from the code: payload
<= 256 KiB, work_id 1-128 characters from letters, digits and `._:@-`, a kind
some worker declares, max_attempts <= 100, 0 <= timeout_seconds <= 24 h."""

from __future__ import annotations

import math
import os
import string
import uuid
from collections import Counter
from dataclasses import dataclass, field

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dworkers.local_cluster import LocalCluster
from dworkers.v1 import work_pb2
from tests.helpers import ResultCollector, frontend, settle, wait_kind

pytestmark = pytest.mark.e2e

MAX_PAYLOAD = 256 * 1024
EXAMPLES = int(os.environ.get("DWORKERS_TEST_EXAMPLES", "60"))  # more for a longer hunt
ALNUM = string.ascii_letters + string.digits
ID_CHARS = ALNUM + "._:@-"
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED}
INVALID, CONFLICT = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS


# --- the oracle -------------------------------------------------------------------


def id_class(work_id: str) -> str:
    """'empty' (the server picks a UUID), 'valid', 'invalid', or 'unclear': only
    characters the README allows, but not starting with a letter or digit (the
    README does not say whether `-x` or `.x` is a work id)."""
    if work_id == "":
        return "empty"
    if len(work_id) > 128 or any(c not in ID_CHARS for c in work_id):
        return "invalid"
    return "valid" if work_id[0] in ALNUM else "unclear"


def request_is_invalid(r: work_pb2.SubmitWorkRequest) -> bool:
    timeout = r.timeout_seconds
    return (id_class(r.work_id) == "invalid" or r.kind != "square"  # the only kind the worker declares that we send
            or len(r.payload) > MAX_PAYLOAD or r.max_attempts > 100
            or math.isnan(timeout) or timeout < 0 or timeout > 24 * 3600)


def expected_result(payload: bytes) -> tuple[int, bytes]:
    """What the `square` job makes of a payload (n -> "n * n = n²")."""
    try:
        n = int(payload.decode().strip())
        return work_pb2.DONE, f"{n} * {n} = {n * n}".encode()
    except (UnicodeDecodeError, ValueError):
        return work_pb2.FAILED, b""


# --- strategies -------------------------------------------------------------------

id_text = st.text(alphabet=ID_CHARS, max_size=40)
valid_ids = st.one_of(
    st.builds(lambda first, rest: first + rest, st.sampled_from(ALNUM), id_text),
    st.builds(lambda first, n: f"{first}-{n}", st.sampled_from(ALNUM), st.integers(0, 10**12)),
    st.builds(lambda first, rest: (first + rest * 128)[:128], st.sampled_from(ALNUM),  # the longest allowed
              st.text(ID_CHARS, min_size=1, max_size=3)),
)
BAD_ID_CHARS = [" ", "/", "é", "ß", "\u2603", "\U0001F600", "\n", "\x00", "#", "?", "*", "\\", "\t"]
bad_ids = st.one_of(
    st.builds(lambda a, bad, b: a + bad + b, valid_ids, st.sampled_from(BAD_ID_CHARS), id_text),
    st.integers(129, 300).flatmap(lambda n: st.builds(lambda c: (c * n)[:n], st.sampled_from(ALNUM))),
    st.builds(lambda lead, rest: lead + rest, st.sampled_from("._:@-"), id_text),  # 'unclear'
    st.text(max_size=20),
)
# Each field has a strategy for values the README allows and one for values
# it refuses; a request draws most fields from the first, so that calls are
# accepted about as often as refused.
good_kinds = st.just("square")
bad_kinds = st.one_of(
    st.sampled_from(["", "no_such_kind", "sq uare", "square/x", "Square", "squaré", "a" * 65, "9lives", " square"]),
    st.text(max_size=70).filter(lambda k: k not in ("square", "sleep")),
)
integer_payloads = st.builds(lambda n, pad: f"{pad}{n}{pad}".encode(), st.integers(-10**30, 10**30),
                             st.sampled_from(["", "", " ", "\n", "\t "]))
unparsable_payloads = st.one_of(  # accepted, but the square job fails on them
    st.sampled_from([b"", b"abc", b"1.5", b"0x10", b"12abc", b"\xff\xfe", b"1 2", b"1" * MAX_PAYLOAD]),
    st.binary(max_size=20),
    st.text(max_size=20).map(str.encode),
)
good_payloads = st.one_of(integer_payloads, integer_payloads, integer_payloads, unparsable_payloads,
                          st.just("\u0661\u0662".encode()))  # Arabic-Indic 12: int() takes it
bad_payloads = st.sampled_from([b"7" * (MAX_PAYLOAD + 1), b"x" * (MAX_PAYLOAD + 1000)])
good_max_attempts = st.one_of(st.integers(0, 5), st.integers(0, 100))
bad_max_attempts = st.integers(101, 200)
good_timeouts = st.one_of(st.just(0.0), st.just(-0.0), st.floats(1.0, 120.0), st.just(24 * 3600.0))
bad_timeouts = st.one_of(
    st.floats(max_value=-1e-9, allow_infinity=True, allow_nan=False),
    st.just(math.nan), st.just(math.inf),
    st.floats(min_value=24 * 3600.0 + 1e-3, allow_infinity=False, allow_nan=False),
)
BAD_FIELDS = ("id", "kind", "payload", "max_attempts", "timeout")


@dataclass
class Spec:
    """One generated request; 'reuse' picks an earlier id when the call is made."""
    id_mode: str  # "fresh", "empty", "bad", "reuse"
    work_id: str
    reuse_index: int
    same_payload: bool
    kind: str
    payload: bytes
    max_attempts: int
    timeout: float


@st.composite
def specs(draw) -> Spec:
    bad = draw(st.one_of(st.just(frozenset()), st.just(frozenset()), st.just(frozenset()), st.just(frozenset()),
                         st.frozensets(st.sampled_from(BAD_FIELDS), min_size=1, max_size=2)))
    id_mode = "bad" if "id" in bad else draw(st.sampled_from(["fresh", "fresh", "empty", "reuse", "reuse"]))
    return Spec(
        id_mode=id_mode,
        work_id=draw(bad_ids if id_mode == "bad" else valid_ids),
        reuse_index=draw(st.integers(0, 10**6)),
        same_payload=draw(st.booleans()),
        kind=draw(bad_kinds if "kind" in bad else good_kinds),
        payload=draw(bad_payloads if "payload" in bad else good_payloads),
        max_attempts=draw(bad_max_attempts if "max_attempts" in bad else good_max_attempts),
        timeout=draw(bad_timeouts if "timeout" in bad else good_timeouts),
    )


def good(work_id: str, payload: bytes, max_attempts: int = 0) -> Spec:
    return Spec("empty" if not work_id else "fresh", work_id, 0, False, "square", payload, max_attempts, 0.0)


calls = st.one_of(
    st.tuples(st.just("one"), st.lists(specs(), min_size=1, max_size=1)),
    st.tuples(st.just("many"), st.lists(specs(), min_size=0, max_size=5)),
)


# --- the ledger -------------------------------------------------------------------


@dataclass
class Ledger:
    accepted: dict[str, work_pb2.SubmitWorkRequest] = field(default_factory=dict)  # as first accepted
    seen: dict[str, bytes] = field(default_factory=dict)  # every id sent -> its last payload
    calls: Counter = field(default_factory=Counter)  # outcome -> count
    log: list[str] = field(default_factory=list)

    def resolve(self, spec: Spec) -> work_pb2.SubmitWorkRequest:
        work_id, kind, payload = spec.work_id, spec.kind, spec.payload
        if spec.id_mode == "empty":
            work_id = ""
        elif spec.id_mode == "fresh" and id_class(work_id) != "valid":
            work_id = f"fresh-{uuid.uuid4().hex}"  # hypothesis gave a bad one: keep "fresh" valid
        elif spec.id_mode == "reuse" and self.seen:
            pool = sorted(self.seen)
            work_id = pool[spec.reuse_index % len(pool)]
            if spec.same_payload:
                known = self.accepted.get(work_id)
                kind, payload = "square", known.payload if known is not None else self.seen[work_id]
        return work_pb2.SubmitWorkRequest(work_id=work_id, kind=kind, payload=payload,
                                          max_attempts=spec.max_attempts, timeout_seconds=spec.timeout)

    def expectation(self, requests: list[work_pb2.SubmitWorkRequest]) -> set:
        """The outcomes allowed for one call: a set of status codes (None = OK)."""
        ids = [r.work_id for r in requests if r.work_id]
        invalid = not requests or len(ids) != len(set(ids)) or any(request_is_invalid(r) for r in requests)
        unclear = any(id_class(r.work_id) == "unclear" for r in requests)
        conflict = any(r.work_id in self.accepted and (self.accepted[r.work_id].kind, self.accepted[r.work_id].payload)
                       != (r.kind, r.payload) for r in requests)
        allowed = set()
        if invalid or unclear:
            allowed.add(INVALID)
        if conflict:  # with bad input as well, either refusal is fair
            allowed.add(CONFLICT)
        if not invalid and not conflict:
            allowed.add(None)
        return allowed


def describe(requests) -> str:
    def one(r):
        payload = r.payload if len(r.payload) <= 40 else r.payload[:20] + b"...(%d bytes)" % len(r.payload)
        return (f"(id={r.work_id[:60]!r} kind={r.kind[:30]!r} payload={payload!r} max_attempts={r.max_attempts} "
                f"timeout={r.timeout_seconds!r})")
    return "[" + ", ".join(one(r) for r in requests) + "]"


def call(stub, kind: str, requests: list[work_pb2.SubmitWorkRequest]):
    """Returns (responses, None) or (None, RpcError)."""
    try:
        if kind == "one":
            return [stub.SubmitWork(requests[0], timeout=15)], None
        return list(stub.SubmitWorks(work_pb2.SubmitWorksRequest(works=requests), timeout=15).works), None
    except grpc.RpcError as error:
        return None, error


# --- the test ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(zookeeper, tmp_path_factory, request):
    cluster = LocalCluster(workdir=tmp_path_factory.mktemp("properties"), root=f"/props-{uuid.uuid4().hex[:8]}",
                           session_timeout=2.0, zookeeper=zookeeper)
    failed_before = request.session.testsfailed
    try:
        cluster.start_master(wait=True)
        cluster.start_master(wait=True)
        cluster.start_worker(2)
        fe = cluster.start_frontend()
        stub = frontend(fe.address)
        wait_kind(stub, "square")
        yield cluster, stub
    finally:
        cluster.stop()
        if request.session.testsfailed > failed_before:
            cluster.print_logs(tail=6000)


@pytest.mark.timeout(300)
def test_generated_submissions_are_answered_and_finished_exactly_once(live):
    cluster, stub = live
    collector = ResultCollector(stub)  # from sequence 0: sees every result, wanted or not
    ledger = Ledger()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large])
    @given(st.lists(calls, min_size=1, max_size=4))
    @example([  # the same id again: same payload (a duplicate), another payload (a conflict), in a batch
        ("one", [good("dup-1", b"5")]), ("one", [good("dup-1", b"5")]), ("one", [good("dup-1", b"6")]),
        ("many", [good("dup-1", b"5"), good("dup-2", b"6")]), ("many", [good("dup-2", b"6"), good("dup-1", b"6")]),
        ("many", [good("dup-3", b"7"), good("dup-3", b"7")]),  # twice in one call
    ])
    @example([("many", [good("", b" " * (MAX_PAYLOAD - 2) + b"42") for _ in range(4)])])  # 1 MiB in one call
    def run(generated):
        for kind, batch in generated:
            requests = [ledger.resolve(spec) for spec in batch]
            if kind == "one" and not requests:
                continue
            allowed = ledger.expectation(requests)
            accepted_before = set(ledger.accepted)
            for r in requests:
                if r.work_id:
                    ledger.seen[r.work_id] = r.payload
            responses, error = call(stub, kind, requests)
            what = f"{'SubmitWork' if kind == 'one' else 'SubmitWorks'} {describe(requests)}"
            if error is not None:
                code, details = error.code(), error.details() or ""
                ledger.calls[code.name] += 1
                ledger.log.append(f"{what} -> {code.name}: {details[:200]}")
                assert code in REFUSALS, f"{what}: refused with {code.name}: {details!r}"
                assert details.strip(), f"{what}: refused with {code.name} and no message"
                if code != grpc.StatusCode.RESOURCE_EXHAUSTED:  # overload is always allowed
                    assert code in allowed, f"{what}: {code.name} ({details!r}); expected one of {allowed}"
                continue
            ledger.calls["OK"] += 1
            ledger.log.append(f"{what} -> OK {[(w.work_id, w.duplicate) for w in responses]}")
            assert None in allowed, f"{what}: accepted; expected a refusal, one of {allowed}"
            assert len(responses) == len(requests), what
            for r, response in zip(requests, responses):
                if r.work_id:
                    assert response.work_id == r.work_id, what
                else:
                    assert id_class(response.work_id) == "valid", f"{what}: generated id {response.work_id!r}"
                    assert response.work_id not in ledger.seen, f"{what}: generated id reused"
                    ledger.seen[response.work_id] = r.payload
                assert response.duplicate == (response.work_id in accepted_before), (
                    f"{what}: {response.work_id!r} duplicate={response.duplicate}, but it was "
                    f"{'' if response.work_id in accepted_before else 'never '}accepted before")
                if response.work_id not in ledger.accepted:
                    stored = work_pb2.SubmitWorkRequest()
                    stored.CopyFrom(r)
                    stored.work_id = response.work_id
                    ledger.accepted[response.work_id] = stored

    try:
        run()

        # Every accepted work finishes exactly once; nothing else appears.
        missing = collector.wait_for(ledger.accepted, timeout=120)
        assert not missing, f"{len(missing)} accepted works never finished, e.g. {sorted(missing)[:5]}"
        settle(collector, stub)  # anything extra is among them now
        results = list(collector.results)
        counts = Counter(r.work_id for r in results)
        assert not [w for w, n in counts.items() if n > 1], \
            f"results delivered twice: {[w for w, n in counts.items() if n > 1][:5]}"
        never = set(counts) - set(ledger.accepted)
        assert not never, f"results for ids never accepted: {sorted(never)[:5]}"
        assert [r.sequence for r in results] == list(range(1, len(results) + 1)), "sequence numbers with gaps"
        for r in results:
            work = ledger.accepted[r.work_id]
            state, text = expected_result(work.payload)
            assert r.kind == "square"
            assert r.state == state, f"{r.work_id!r} payload {work.payload[:40]!r}: {r.state} {r.error[:200]!r}"
            if state == work_pb2.DONE:
                assert r.result == text and r.attempts >= 1
            else:
                assert r.attempts == (work.max_attempts or 3), f"{r.work_id!r}: {r.attempts} attempts"
                assert r.error, f"{r.work_id!r} FAILED without an error"

        # A refused call changed nothing: ids only ever refused are unknown.
        for work_id in sorted(w for w in ledger.seen if w not in ledger.accepted and id_class(w) == "valid")[:40]:
            with pytest.raises(grpc.RpcError) as error:
                stub.GetWork(work_pb2.GetWorkRequest(work_id=work_id), timeout=10)
            assert error.value.code() == grpc.StatusCode.NOT_FOUND, f"{work_id!r}: {error.value.details()}"
        by_id = {r.work_id: r for r in results}
        for work_id in sorted(ledger.accepted)[:40]:
            status = stub.GetWork(work_pb2.GetWorkRequest(work_id=work_id), timeout=10)
            r = by_id[work_id]
            assert (status.state, status.result, status.sequence, status.attempts) == (
                r.state, r.result, r.sequence, r.attempts), work_id

        info = stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=10)
        assert (info.pending, info.in_progress) == (0, 0)
        assert info.done + info.failed == len(ledger.accepted) == info.last_sequence
        dead = [f"{s.role} {s.pid}" for s in cluster.services if not s.alive()]
        assert not dead, f"services died: {dead}"
        print(f"\n{sum(ledger.calls.values())} calls: {dict(ledger.calls)}; {len(ledger.accepted)} works accepted, "
              f"{sum(r.state == work_pb2.FAILED for r in results)} of them FAILED")
    finally:
        collector.stop()
        if ledger.log:
            print("\nlast calls:\n" + "\n".join(ledger.log[-15:]))
