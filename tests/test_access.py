"""Access control on a real cluster: masters and frontends check an access
file of token hashes and certificate names with roles. Each refusal says
why; health stays open; a line removed from the file revokes at once;
tokens appear in no log."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import dworkers
from dworkers import credentials
from dworkers.common.auth import AccessFile, Authorizer, hash_token, new_token, parse
from dworkers.common.errors import ConfigError, PermissionDenied, Unauthenticated
from dworkers.v1 import frontend_pb2_grpc, master_pb2, master_pb2_grpc, work_pb2
from tests.helpers import ProtocolWorker, wait_kind, wait_until
from tests.test_cli import assert_one_line_error, clean_env, ok
from tests.test_cli import dworkers as cli

pytestmark = pytest.mark.e2e


@pytest.fixture
def guarded(make_cluster):
    """A cluster that checks access (plaintext), its frontend's address."""
    c = make_cluster(access=True)
    c.start_master(wait=True)
    c.start_worker(2, "--jobs", "tests.jobs_for_tests")
    front = c.start_frontend()
    wait_kind(frontend_pb2_grpc.FrontendStub(credentials.channel(front.address, False, token=c.tokens["admin"])),
              "square")
    return c, front.address


def call(address: str, method: str, request, token: str | None, tls=False):
    with credentials.channel(address, tls, token=token or "") as channel:
        return getattr(frontend_pb2_grpc.FrontendStub(channel), method)(request, timeout=30)


@contextlib.contextmanager
def refused(code: grpc.StatusCode, *fragments: str):
    """The block's call fails with `code`, its message holding `fragments`."""
    with pytest.raises(grpc.RpcError) as info:
        yield
    error = info.value
    assert error.code() == code, (error.code(), error.details())
    for fragment in fragments:
        assert fragment in error.details(), error.details()


def test_each_role_may_call_what_it_needs_and_is_told_why_when_not(guarded):
    cluster, address = guarded
    submit = work_pb2.SubmitWorkRequest(work_id="access-1", kind="sleep", payload=b"30")
    with refused(grpc.StatusCode.UNAUTHENTICATED, "credentials needed"):
        call(address, "SubmitWork", submit, None)
    with refused(grpc.StatusCode.UNAUTHENTICATED, "unknown token"):
        call(address, "SubmitWork", submit, "dwk_not-a-token")
    with refused(grpc.StatusCode.PERMISSION_DENIED, "reader may not call SubmitWork", "'submit'"):
        call(address, "SubmitWork", submit, cluster.tokens["reader"])
    assert call(address, "SubmitWork", submit, cluster.tokens["producer"]).work_id == "access-1"
    get = work_pb2.GetWorkRequest(work_id="access-1")
    with refused(grpc.StatusCode.PERMISSION_DENIED, "producer may not call GetWork", "'read'"):
        call(address, "GetWork", get, cluster.tokens["producer"])
    assert call(address, "GetWork", get, cluster.tokens["reader"]).work_id == "access-1"
    cancel = work_pb2.CancelWorkRequest(work_ids=["access-1"])
    for name in ("producer", "reader"):
        with refused(grpc.StatusCode.PERMISSION_DENIED, f"{name} may not call CancelWork", "'admin'"):
            call(address, "CancelWork", cancel, cluster.tokens[name])
    assert call(address, "CancelWork", cancel, cluster.tokens["admin"]).works[0].state == work_pb2.CANCELLED
    # Probes need no credentials.
    with credentials.channel(address, False) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_masters_port_takes_only_workers_and_frontends(guarded):
    cluster, _address = guarded
    master = cluster.active_master().address
    with credentials.channel(master, False, token=cluster.tokens["admin"]) as channel:
        stub = master_pb2_grpc.MasterStub(channel)
        with refused(grpc.StatusCode.PERMISSION_DENIED, "admin may not call ClusterInfo", "'frontend'"):
            stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=30)
        stream = stub.Connect(iter([master_pb2.WorkerMessage()]), timeout=30)
        with refused(grpc.StatusCode.PERMISSION_DENIED, "admin may not call Connect", "'worker'"):
            next(stream)
    with credentials.channel(master, False, token="") as channel:
        with refused(grpc.StatusCode.UNAUTHENTICATED, "credentials needed"):
            master_pb2_grpc.MasterStub(channel).ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=30)


def test_a_line_removed_from_the_access_file_revokes_its_token_without_a_restart(guarded):
    cluster, address = guarded
    info = work_pb2.ClusterInfoRequest()
    assert call(address, "ClusterInfo", info, cluster.tokens["reader"]).workers
    text = cluster.access_file.read_text()
    cluster.access_file.write_text("".join(line + "\n" for line in text.splitlines() if not line.startswith("reader ")))

    def revoked() -> bool:
        try:
            call(address, "ClusterInfo", info, cluster.tokens["reader"])
        except grpc.RpcError as error:
            return error.code() == grpc.StatusCode.UNAUTHENTICATED
        return False
    wait_until(revoked, 30, "the reader's token to be revoked")
    assert call(address, "ClusterInfo", info, cluster.tokens["admin"]).workers  # the others still work


def test_the_cli_presents_a_token_and_says_in_one_line_when_it_has_none(guarded, tmp_path):
    cluster, address = guarded
    token_file = tmp_path / "producer-token"
    token_file.write_text(cluster.tokens["admin"] + "\n")
    done = ok(cli("submit", "square", "9", "--wait", "--frontend", address, "--token-file", str(token_file),
                  timeout=60))
    assert "81" in done.stdout
    env = {**clean_env(), "DWORKERS_TOKEN": cluster.tokens["reader"]}
    ok(cli("cluster", "--frontend", address, env=env, timeout=60))
    assert_one_line_error(cli("cluster", "--frontend", address, timeout=60), "UNAUTHENTICATED", "credentials needed")
    assert_one_line_error(cli("cancel", "x", "--frontend", address, env=env, timeout=60),
                          "PERMISSION_DENIED", "reader may not call CancelWork")


def test_no_token_appears_in_any_log(guarded):
    cluster, address = guarded
    for name in ("reader", "producer"):
        try:
            call(address, "CancelWork", work_pb2.CancelWorkRequest(work_ids=["x"]), cluster.tokens[name])
        except grpc.RpcError:
            pass
    services_token = (cluster.workdir / "services-token").read_text().strip()
    for service in cluster.services:
        for token in (*cluster.tokens.values(), services_token):
            assert token not in service.log(), f"{service.role} logged a token"


def test_client_certificates_are_identities_too(make_cluster):
    cluster = make_cluster(tls=True, access=True)
    with cluster.access_file.open("a") as f:
        f.write("alice admin cert:admin\n")
    cluster.start_master(wait=True)
    cluster.start_worker(1)  # as the services' certificate, with the services' token
    front = cluster.start_frontend()
    certs = cluster.workdir / "tls"

    def declared() -> bool:  # the worker registered its kinds (submissions of others are refused)
        info = call(front.address, "ClusterInfo", work_pb2.ClusterInfoRequest(), "", tls=cluster.client_tls)
        return any(k.kind == "square" and k.slots for k in info.kinds)

    wait_until(declared, 60, "the worker's kinds")
    with dworkers.Client(front.address, tls=cluster.client_tls, token="", timeout=60) as client:  # cert "admin"
        assert client.submit("square", 5).result(timeout=60) == 25
    unnamed = dworkers.Tls(ca=str(certs / "ca.pem"), cert=str(certs / "frontend.pem"),
                           key=str(certs / "frontend-key.pem"))
    with refused(grpc.StatusCode.UNAUTHENTICATED, "no access for the client certificate 'frontend'"):
        call(front.address, "ClusterInfo", work_pb2.ClusterInfoRequest(), "", tls=unnamed)


@pytest.mark.unit
def test_access_files_that_cannot_work_are_refused_with_the_line_that_is_wrong(tmp_path):
    good = "ci submit,read sha256:" + "a" * 64 + "  # a comment\n\nops admin cert:alice\n"
    tokens, certs = parse(good, "access")
    assert tokens["sha256:" + "a" * 64].roles == {"submit", "read"} and certs["alice"].may("read")
    for text, fragment in [("ci submit", "access:1: expected"), ("ci boss sha256:" + "a" * 64, "unknown role boss"),
                           ("ok read cert:x\nci submit sha256:abc", "access:2: sha256: takes"),
                           ("gpu worker cert:gpu#1 kinds=render", "access:1: expected"),
                           ("gpu worker cert:gpu kinds=,", "kinds= names one or more kinds"),
                           ("ops admin cert:ops kinds=render", "for a worker identity")]:
        with pytest.raises(ConfigError) as error:
            parse(text, "access")
        assert fragment in str(error.value)
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError, match="cannot read"):
        AccessFile(str(missing))


def _write_settled(path, text: str, seconds_ago: float) -> None:
    """Writes `text` as if it had been written `seconds_ago`."""
    path.write_text(text)
    then = time.time() - seconds_ago
    os.utime(path, (then, then))


@pytest.mark.unit
def test_a_broken_access_file_leaves_the_last_good_one_in_force(tmp_path):
    path = tmp_path / "access"
    path.write_text("ops admin cert:alice\n")
    authorizer = Authorizer(AccessFile(str(path)), {"CancelWork": "admin"})

    class Context:
        def __init__(self, name):
            self.name = name

        def invocation_metadata(self):
            return ()

        def auth_context(self):
            return {"x509_common_name": [self.name.encode()]}

    assert authorizer.check("/dworkers.v1.Frontend/CancelWork", Context("alice")).name == "ops"
    _write_settled(path, "this is not an access file\n", 3)
    authorizer.access._checked = 0.0
    assert authorizer.check("/dworkers.v1.Frontend/CancelWork", Context("alice")).name == "ops"
    path.write_text("")  # being written (truncated, not yet filled): not read until it settles
    authorizer.access._checked = 0.0
    assert authorizer.check("/dworkers.v1.Frontend/CancelWork", Context("alice")).name == "ops"
    _write_settled(path, "ops read cert:alice\n", 2)
    authorizer.access._checked = 0.0
    with pytest.raises(PermissionDenied):
        authorizer.check("/dworkers.v1.Frontend/CancelWork", Context("alice"))
    with pytest.raises(Unauthenticated):
        authorizer.check("/dworkers.v1.Frontend/CancelWork", Context("mallory"))
    assert authorizer.check("/grpc.health.v1.Health/Check", Context("mallory")) is None


def test_a_worker_identity_limited_to_some_kinds_cannot_register_others(guarded):
    cluster, _address = guarded
    limited = new_token()
    with cluster.access_file.open("a") as f:
        f.write(f"echo-box worker {hash_token(limited)} kinds=echo,digest\n")
    master = cluster.active_master().address

    def refused_registration() -> str:
        probe = ProtocolWorker(master, "limited-0", token=limited)
        probe.send(register=master_pb2.RegisterWorker(worker_ids=["limited-0"], host="probe",
                                                      kinds=["echo", "square"]))
        probe.done.wait(30)
        probe.close()
        return "" if probe.error is None else f"{probe.error.code().name}: {probe.error.details()}"
    wait_until(lambda: refused_registration().startswith("PERMISSION_DENIED"), 30, "the access file to be read again")
    assert "may run only digest, echo; not square" in refused_registration()
    allowed = ProtocolWorker(master, "limited-1", token=limited)
    allowed.send(register=master_pb2.RegisterWorker(worker_ids=["limited-1"], host="probe", kinds=["echo"]))
    info = work_pb2.ClusterInfoRequest()
    wait_until(lambda: any(w.worker_id == "limited-1" for w in call(_address, "ClusterInfo", info,
                                                                     cluster.tokens["reader"]).workers),
               30, "the limited worker to register its allowed kind")
    assert allowed.error is None
    allowed.close()


def test_each_identity_is_held_to_its_submission_rate_and_stream_count(make_cluster):
    cluster = make_cluster(access=True)
    cluster.start_master(wait=True)
    cluster.start_worker(2)
    front = cluster.start_frontend(None, "--identity-submit-rate", "50", "--identity-streams", "1").address
    producer, reader = cluster.tokens["producer"], cluster.tokens["reader"]
    wait_kind(frontend_pb2_grpc.FrontendStub(credentials.channel(front, False, token=cluster.tokens["admin"])),
              "square")
    batch = work_pb2.SubmitWorksRequest(works=[work_pb2.SubmitWorkRequest(kind="square", payload=b"2")
                                               for _ in range(100)])
    wait_until(lambda: _accepted(front, batch, producer), 60, "a first batch (a full bucket lets it pass)")
    with refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "producer submits above its limit of 50 works per second"):
        call(front, "SubmitWork", work_pb2.SubmitWorkRequest(kind="square", payload=b"3"), producer)
    with credentials.channel(front, False, token=producer) as channel:  # a stream's calls count alike
        answers = list(frontend_pb2_grpc.FrontendStub(channel).SubmitStream(iter([batch, batch]), timeout=30))
        assert [a.code for a in answers][-1] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "producer submits above its limit of 50 works per second" in answers[-1].message
    # another identity has a bucket of its own
    assert call(front, "SubmitWork", work_pb2.SubmitWorkRequest(kind="square", payload=b"3"),
                cluster.tokens["admin"]).work_id
    with credentials.channel(front, False, token=reader) as channel:
        stub = frontend_pb2_grpc.FrontendStub(channel)
        first = stub.WatchResults(work_pb2.WatchResultsRequest(after_sequence=0), timeout=60)
        assert next(first).results  # open, and serving
        with refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "reader already has 1 result streams open"):
            next(stub.WatchResults(work_pb2.WatchResultsRequest(after_sequence=0), timeout=60))
        first.cancel()

        def second_opens() -> bool:
            try:
                stream = stub.WatchResults(work_pb2.WatchResultsRequest(after_sequence=0), timeout=60)
                next(stream)
                stream.cancel()
                return True
            except grpc.RpcError:
                return False
        wait_until(second_opens, 30, "the closed stream to be released")


def _accepted(front: str, batch, token: str) -> bool:
    try:
        return len(call(front, "SubmitWorks", batch, token).works) == len(batch.works)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.UNAVAILABLE:  # no master yet
            raise
        return False


def test_health_watch_and_reflection_streams_need_an_identity(guarded):
    cluster, address = guarded
    with credentials.channel(address, False, token="") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status  # probes stay open
        with refused(grpc.StatusCode.UNAUTHENTICATED, "credentials needed"):
            next(health.Watch(health_pb2.HealthCheckRequest(), timeout=30))
    with credentials.channel(address, False, token=cluster.tokens["reader"]) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_another_worker_identity_using_the_same_slot_id_cannot_take_over_its_attempt(guarded):
    """Slot ids are named within their identity: another one registering
    the same id gets a slot of its own; the first keeps its stream and its
    attempt, and a report sent on the other slot counts for nothing."""
    cluster, address = guarded
    first, second = new_token(), new_token()
    with cluster.access_file.open("a") as f:
        f.write(f"box-a worker {hash_token(first)}\nbox-b worker {hash_token(second)}\n")
    master = cluster.active_master().address
    owners: list[ProtocolWorker] = []

    def owner_registers() -> bool:  # once the master has read the new lines
        owners.append(ProtocolWorker(master, "shared-0", token=first))
        return _registers(owners[-1], "shared-0", "slot-probe")
    wait_until(owner_registers, 30, "the access file to be read again")
    owner = owners[-1]
    with dworkers.Client(address, token=cluster.tokens["admin"], timeout=60) as client:
        handle = client.submit("slot-probe", payload=b"mine")
        (assignment,) = owner.wait("works", 30).works.assignments
        other = ProtocolWorker(master, "shared-0", token=second)
        assert _registers(other, "shared-0", "slot-probe")  # a slot of its own, not a refusal
        other.send(failed=master_pb2.WorkFailed(failures=[master_pb2.Failure(
            worker_id="shared-0", work_id=assignment.work.work_id, attempt_token=assignment.attempt_token,
            error="not yours", permanent=True)]))
        other.wait("ack", 30)
        assert not owner.done.is_set()  # the first keeps its stream
        owner.send(done=master_pb2.WorkIsDone(completions=[master_pb2.Completion(
            worker_id="shared-0", work_id=assignment.work.work_id, attempt_token=assignment.attempt_token,
            result=b"from its owner")]))
        assert handle.result(timeout=60) == b"from its owner"
    for probe in (*owners, other):
        probe.close()


def _registers(probe: ProtocolWorker, worker_id: str, kind: str = "square") -> bool:
    probe.send(register=master_pb2.RegisterWorker(worker_ids=[worker_id], host="probe", kinds=[kind]),
               request_work=master_pb2.WorkerRequestsWork(worker_ids=[worker_id]))
    return not probe.done.wait(1.0)  # refused streams end at once


def _drop_line(cluster, name: str) -> None:
    kept = [line for line in cluster.access_file.read_text().splitlines() if not line.startswith(name + " ")]
    cluster.access_file.write_text("".join(line + "\n" for line in kept))


def _add_line(cluster, line: str) -> None:
    with cluster.access_file.open("a") as f:
        f.write(line + "\n")


def test_a_revoked_token_ends_the_idle_streams_it_holds_open(guarded):
    """Nothing flows on the streams when the line goes: they end anyway, with the reason."""
    cluster, address = guarded
    with dworkers.Client(address, token=cluster.tokens["admin"], timeout=60) as client:
        assert client.submit("square", 2).result(timeout=60) == 4  # a first result to watch
    with credentials.channel(address, False, token=cluster.tokens["reader"]) as channel:
        stream = frontend_pb2_grpc.FrontendStub(channel).WatchResults(
            work_pb2.WatchResultsRequest(after_sequence=0), timeout=120)
        assert next(stream).results
        health = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=120)
        assert next(health).status == health_pb2.HealthCheckResponse.SERVING
        _drop_line(cluster, "reader")
        for idle in (stream, health):
            with refused(grpc.StatusCode.UNAUTHENTICATED, "unknown token"):
                next(idle)


def test_a_revoked_worker_or_one_whose_kinds_changed_is_disconnected(guarded):
    cluster, _address = guarded
    revoked, narrowed = new_token(), new_token()
    _add_line(cluster, f"box-gone worker {hash_token(revoked)}")
    _add_line(cluster, f"box-narrow worker {hash_token(narrowed)} kinds=square,echo")
    master = cluster.active_master().address
    probes: dict[str, ProtocolWorker] = {}

    def both_register() -> bool:  # once the master has read the new lines
        for name, token in (("gone", revoked), ("narrow", narrowed)):
            if name not in probes or probes[name].done.is_set():
                probes[name] = ProtocolWorker(master, f"{name}-0", token=token)
        return all(_registers(probes[name], f"{name}-0") for name in probes)
    wait_until(both_register, 30, "the access file to be read again")
    _drop_line(cluster, "box-gone")
    text = cluster.access_file.read_text().replace("kinds=square,echo", "kinds=echo")
    cluster.access_file.write_text(text)
    for name, code, words in (("gone", grpc.StatusCode.UNAUTHENTICATED, "unknown token"),
                              ("narrow", grpc.StatusCode.PERMISSION_DENIED, "changed what box-narrow may do")):
        assert probes[name].done.wait(30), f"the {name} worker's stream is still open"
        assert probes[name].error.code() == code and words in probes[name].error.details(), probes[name].error
        probes[name].close()


def test_a_master_ends_the_result_stream_of_a_frontend_identity_it_no_longer_knows(guarded):
    cluster, address = guarded
    with dworkers.Client(address, token=cluster.tokens["admin"], timeout=60) as client:
        assert client.submit("square", 2).result(timeout=60) == 4  # a first result to watch
    token = new_token()
    _add_line(cluster, f"front-b frontend {hash_token(token)}")
    master = cluster.active_master().address

    def watch():
        channel = credentials.channel(master, False, token=token)
        stream = master_pb2_grpc.MasterStub(channel).WatchResults(work_pb2.WatchResultsRequest(after_sequence=0),
                                                                  timeout=120)
        try:
            return channel, stream, next(stream)
        except grpc.RpcError:
            channel.close()
            return None
    opened = wait_until(watch, 30, "the master to take the new frontend identity")
    channel, stream, _first = opened
    _drop_line(cluster, "front-b")
    with refused(grpc.StatusCode.UNAUTHENTICATED, "unknown token"):
        for _ in range(1000):  # what the master had already sent, then the end
            next(stream)
    channel.close()


def test_a_frontend_whose_own_credentials_are_refused_says_so_without_blaming_the_client(guarded, tmp_path):
    cluster, _address = guarded
    wrong = tmp_path / "wrong-token"
    wrong.write_text(new_token() + "\n")
    front = cluster.start_frontend(None, "--token-file", str(wrong))
    with refused(grpc.StatusCode.UNAVAILABLE, "a master refused its credentials"):
        call(front.address, "ClusterInfo", work_pb2.ClusterInfoRequest(), cluster.tokens["admin"])
    wait_until(lambda: "a master refused this process's credentials" in front.log(), 30, "the frontend to log it")


def test_the_async_client_presents_its_token_on_every_kind_of_call(guarded):
    cluster, address = guarded

    async def roundtrip():
        async with dworkers.AsyncClient(address, token=cluster.tokens["admin"], timeout=60) as client:
            return await (await client.submit("square", 6)).result(timeout=60)  # unary, then a stream
    assert asyncio.run(roundtrip()) == 36
