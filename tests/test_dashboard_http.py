"""The dashboard's HTTP endpoints on a real cluster, without a browser:
logins and sessions, what each role may do, refusals with the frontend's
reason, paging over many works, live streams, and the dashboard behind the
frontend's TLS while serving HTTPS itself."""

from __future__ import annotations

import http.cookiejar
import json
import ssl
import urllib.error
import urllib.request

import pytest

import dworkers
from dworkers import credentials
from dworkers.v1 import frontend_pb2_grpc
from tests.helpers import wait_kind, wait_until

pytestmark = pytest.mark.e2e
JOBS = ("--jobs", "tests.jobs_control")


class Browser:
    """urllib with a cookie jar: what a browser keeps between requests."""

    def __init__(self, base: str, context: ssl.SSLContext | None = None):
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        handlers = [urllib.request.HTTPCookieProcessor(self.jar)]
        if context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self.opener = urllib.request.build_opener(*handlers)

    def request(self, path: str, body=None, method: str | None = None, headers=None):
        """(status, headers, parsed JSON or text)."""
        data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
        all_headers = {"Content-Type": "application/json", **({"X-Dworkers": "1"} if data is not None else {}),
                       **(headers or {})}
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=all_headers)
        try:
            with self.opener.open(request, timeout=30) as response:
                return response.status, response.headers, _decoded(response.read(), response.headers)
        except urllib.error.HTTPError as error:
            return error.code, error.headers, _decoded(error.read(), error.headers)

    def get(self, path: str):
        return self.request(path)

    def post(self, path: str, body=None, headers=None):
        return self.request(path, body if body is not None else {}, "POST", headers)

    def events(self, path: str, count: int) -> list[tuple[str, dict]]:
        """The first `count` server-sent events of a stream."""
        out: list[tuple[str, dict]] = []
        with self.opener.open(self.base + path, timeout=30) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            event = None
            for raw in response:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    out.append((event or "message", json.loads(line[6:])))
                    if len(out) >= count:
                        return out
        return out


def _decoded(raw: bytes, headers):
    if headers.get("Content-Type", "").startswith("application/json"):
        return json.loads(raw)
    return raw.decode(errors="replace")


@pytest.fixture
def guarded(make_cluster):
    """A cluster checking access, a frontend, a dashboard on it; the dashboard's base URL."""
    cluster = make_cluster(access=True)
    cluster.start_master(wait=True)
    cluster.start_worker(2, *JOBS)
    front = cluster.start_frontend()
    wait_kind(frontend_pb2_grpc.FrontendStub(credentials.channel(front.address, False,
                                                                 token=cluster.tokens["admin"])), "stamp")
    board = cluster.start_dashboard(front.address)
    return cluster, front.address, f"http://{board.address}"


def test_visitors_log_in_with_a_token_and_act_as_its_identity(guarded):
    cluster, _front, base = guarded
    visitor = Browser(base)
    status, _, body = visitor.get("/api/overview")
    assert status == 401 and "credentials needed" in body["error"]
    status, _, body = visitor.post("/api/login", {"token": "dwk_not-a-real-token"})
    assert status == 401 and "unknown token" in body["error"]
    status, headers, body = visitor.post("/api/login", {"token": cluster.tokens["reader"]})
    assert status == 200 and body == {"name": "reader", "roles": ["read"], "access_checked": True, "logged_in": True}
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and cluster.tokens["reader"] not in cookie
    status, headers, overview = visitor.get("/api/overview")
    assert status == 200 and overview["master"]["address"] == cluster.active_master().address
    assert headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["Cache-Control"] == "no-store"
    status, _, body = visitor.post("/api/logout")
    assert status == 200
    assert visitor.get("/api/me")[0] == 401


def test_each_role_may_do_what_its_token_may_and_actions_need_the_dashboards_header(guarded):
    cluster, front, base = guarded
    gate = cluster.workdir / "gate"  # never made: the work runs until cancelled
    with dworkers.Client(front, token=cluster.tokens["admin"], timeout=60) as client:
        running = client.submit("hold", str(gate))
        wait_until(lambda: running.status().state == dworkers.v1.work_pb2.IN_PROGRESS, 30, "the work to run")
    reader, admin = Browser(base), Browser(base)
    assert reader.post("/api/login", {"token": cluster.tokens["reader"]})[0] == 200
    assert admin.post("/api/login", {"token": cluster.tokens["admin"]})[0] == 200
    status, _, body = reader.post(f"/api/works/{running.id}/cancel")
    assert status == 403 and "reader may not call CancelWork" in body["error"]
    assert reader.get(f"/api/works/{running.id}")[2]["state"] == "IN_PROGRESS"
    status, _, body = admin.post(f"/api/works/{running.id}/cancel", headers={"X-Dworkers": "0"})
    assert status == 403 and "X-Dworkers: 1" in body["error"]  # what another site's form would send
    status, _, body = admin.post(f"/api/works/{running.id}/cancel")
    assert status == 200 and body["state"] == "CANCELLED" and body["retryable"]
    status, _, body = admin.post(f"/api/works/{running.id}/retry")
    assert status == 200 and body["state"] in ("PENDING", "IN_PROGRESS")
    gate.touch()  # the retried work ends (rather than hold its worker at the test's end)
    wait_until(lambda: reader.get(f"/api/works/{running.id}")[2]["state"] == "DONE", 60, "the retried work to end")
    status, _, body = admin.post("/api/works/no-such-work/cancel")
    assert status == 404 and "no-such-work" in body["error"]


def test_bad_requests_are_refused_with_a_reason(guarded):
    cluster, _front, base = guarded
    visitor = Browser(base)
    assert visitor.post("/api/login", {"token": cluster.tokens["admin"]})[0] == 200
    status, _, body = visitor.get("/api/works?state=BOGUS")
    assert status == 400 and "unknown state 'BOGUS'" in body["error"] and "IN_PROGRESS" in body["error"]
    assert visitor.get("/api/works?state=DONE&page_size=0")[0] == 400
    assert visitor.get("/api/works?state=DONE&page_size=many")[0] == 400
    status, _, body = visitor.get("/api/works/never-submitted")
    assert status == 404 and "never-submitted" in body["error"]
    assert visitor.post("/api/login", b"not json")[0] == 400
    assert visitor.post("/api/login", {"token": ""})[0] == 400
    assert visitor.post("/api/login", b"x" * (200 * 1024))[0] == 413
    assert visitor.get("/works/anything")[0] == 200  # pages are the one page; its script shows the view


def test_works_are_listed_page_by_page_and_streams_carry_live_events(guarded):
    cluster, front, base = guarded
    with dworkers.Client(front, token=cluster.tokens["admin"], timeout=60) as client:
        handles = client.submit_many("stamp", [(f"n{i}",) for i in range(250)])
        for handle in handles:
            handle.result(timeout=60)
        submitted = {h.id for h in handles}
    visitor = Browser(base)
    assert visitor.post("/api/login", {"token": cluster.tokens["reader"]})[0] == 200
    listed, token, pages = [], "", 0
    while True:
        status, _, page = visitor.get(f"/api/works?state=DONE&kind=stamp&page_size=100&page_token={token}")
        assert status == 200
        listed += [w["work_id"] for w in page["works"]]
        pages += 1
        token = page["next_page_token"]
        if not token:
            break
    assert pages == 3 and len(listed) == len(set(listed)) == 250 and set(listed) == submitted
    status, _, one = visitor.get(f"/api/works/{handles[7].id}")
    assert one["state"] == "DONE" and json.loads(one["result"]["json"])["label"] == "n7"
    (kind, first), (_, second) = visitor.events("/api/overview/stream", 2)
    assert kind == "overview" and first["counts"]["DONE"] == 250 and second["time"] > first["time"]
    ((kind, tail),) = visitor.events("/api/results/stream", 1)
    assert kind == "results" and tail["results"][-1]["sequence"] == 250 and tail["results"][-1]["kind"] == "stamp"


def test_an_open_dashboard_acts_with_its_own_token_for_visitors(guarded, tmp_path):
    cluster, front, _base = guarded
    token_file = tmp_path / "dashboard-token"
    token_file.write_text(cluster.tokens["reader"] + "\n")
    board = cluster.start_dashboard(front, "--token-file", str(token_file))
    visitor = Browser(f"http://{board.address}")
    status, _, me = visitor.get("/api/me")
    assert status == 200 and me == {"name": "reader", "roles": ["read"], "access_checked": True, "logged_in": False}
    assert visitor.get("/api/overview")[0] == 200
    assert visitor.post("/api/works/anything/cancel")[0] == 403


def test_the_dashboard_reaches_a_tls_frontend_and_serves_https(make_cluster):
    cluster = make_cluster(tls=True, access=True)
    cluster.start_master(wait=True)
    front = cluster.start_frontend()
    certs = cluster.workdir / "tls"
    board = cluster.start_dashboard(front.address, "--https-cert", str(certs / "server.pem"),
                                    "--https-key", str(certs / "server-key.pem"), wait=False)
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    context.check_hostname = False  # the dev certificate names the services' hosts, not 127.0.0.1's
    visitor = Browser(f"https://{board.address}", context)
    wait_until(lambda: _answers(visitor), 30, "the dashboard to serve HTTPS")
    status, headers, body = visitor.post("/api/login", {"token": cluster.tokens["admin"]})
    assert status == 200 and body["name"] == "admin", body
    assert "Secure" in headers["Set-Cookie"]
    status, _, overview = visitor.get("/api/overview")
    assert status == 200 and overview["master"]["address"] == cluster.active_master().address


def _answers(visitor: Browser) -> bool:
    try:
        return visitor.get("/healthz")[0] == 200
    except OSError:
        return False
