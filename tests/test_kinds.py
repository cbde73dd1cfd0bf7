"""Work goes only to slots whose worker runs its kind; work of a kind no
live worker runs waits for one (it does not fail), and says so."""

from __future__ import annotations

import time

import grpc
import pytest

from dworkers.v1 import work_pb2
from tests.helpers import ResultCollector, frontend, submit_until_acked, wait_kind

pytestmark = pytest.mark.e2e


def info(stub) -> work_pb2.ClusterInfoResponse:
    return stub.ClusterInfo(work_pb2.ClusterInfoRequest(), timeout=10)


def test_work_goes_only_to_workers_that_run_its_kind(cluster):
    cluster.start_master(wait=True)
    cluster.start_worker(2)  # square and sleep only: idle the whole time
    blob_worker = cluster.start_worker(1, "--jobs", "tests.jobs_for_tests")
    stub = frontend(cluster.start_frontend().address)
    wait_kind(stub, "blob")
    wait_kind(stub, "square")
    results = ResultCollector(stub)
    ids = [submit_until_acked(stub, "blob", b"1000", f"blob-{n}").work_id for n in range(12)]
    assert not results.wait_for(ids, timeout=60)
    assert all(r.state == work_pb2.DONE and r.attempts == 1 for r in results.results)

    # The last blob worker leaves: blob work is still accepted, and waits.
    blob_worker.stop()
    submit_until_acked(stub, "blob", b"10", "blob-waits")
    end = time.monotonic() + 3.0  # the idle square workers ask for work all along
    while time.monotonic() < end:
        waiting = stub.GetWork(work_pb2.GetWorkRequest(work_id="blob-waits"), timeout=10)
        assert waiting.state == work_pb2.PENDING and waiting.attempts == 0
        time.sleep(0.2)
    cluster_info = info(stub)
    assert cluster_info.pending_without_worker == 1
    kinds = {k.kind: k for k in cluster_info.kinds}
    assert kinds["blob"].slots == 0 and kinds["blob"].pending == 1
    assert kinds["square"].slots == 2 and kinds["square"].idle_slots == 2

    cluster.start_worker(1, "--jobs", "tests.jobs_for_tests")
    assert not results.wait_for(["blob-waits"], timeout=30)
    assert results.results[-1].state == work_pb2.DONE
    assert info(stub).pending_without_worker == 0
    results.stop()


def test_a_kind_no_worker_ever_declared_is_refused(cluster):
    cluster.start_master(wait=True)
    cluster.start_worker(1)
    stub = frontend(cluster.start_frontend().address)
    wait_kind(stub, "square")
    with pytest.raises(grpc.RpcError) as error:
        stub.SubmitWork(work_pb2.SubmitWorkRequest(kind="sqaure", payload=b"1"), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no worker ever declared it" in error.value.details() and "square" in error.value.details()
