"""The dashboard's HTTP side (aiohttp): pages, JSON endpoints and live
streams (server-sent events), each answered by calling a frontend with the
visitor's token — so the frontend's access file decides what a visitor may
see and do, as it does for any client. A visitor logs in with a token (kept
on the server; the browser holds only a random session id), or acts with
the dashboard's own token when it has one (an open, read-only dashboard).

Every POST needs the header `X-Dworkers: 1`: a page from another site
cannot send it without a CORS preflight, which is never granted, so no
other site can act through a visitor's session."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from aiohttp import web

from dworkers import credentials
from dworkers.common.errors import ConfigError
from dworkers.common.lifecycle import StopRequest
from dworkers.common.metrics import DashboardMetrics, process_registry, serve_metrics
from dworkers.common.tls import read_file
from dworkers.dashboard import views
from dworkers.dashboard.settings import DashboardSettings
from dworkers.v1 import frontend_pb2_grpc, work_pb2

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
PAGES = ("/", "/works", "/works/{work_id}", "/results", "/login")
SESSION_COOKIE = "dworkers_session"
MAX_SESSIONS = 10_000
MAX_REQUEST_BYTES = 64 * 1024
OVERVIEW_SECONDS = 1.0  # between two overview events
TAIL_FLUSH_SECONDS = 0.25  # results are sent to a tail this often at most ...
TAIL_PER_FLUSH = 50  # ... the latest this many of them (the rest are counted as skipped)
TAIL_BACKLOG = 50  # results before the latest that a new tail starts with
WRITE_TIMEOUT = 30.0  # a browser that takes no event for this long is dropped
HEARTBEAT_SECONDS = 15.0  # a comment on an idle stream: finds browsers that went away
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"
HTTP_STATUS = {
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
}


@dataclass
class Session:
    token: str
    name: str
    roles: tuple[str, ...]
    expires: float


@dataclass
class Visitor:
    """Who a request comes from: the token it acts with (None: none)."""
    token: str | None
    session_id: str | None = None
    session: Session | None = field(default=None, repr=False)

    def metadata(self) -> tuple | None:
        """What a call to the frontend carries for this visitor."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else None


class Sessions:
    """Logged-in visitors: a random id (the cookie) to the token they gave,
    for a limited time; the oldest go first beyond MAX_SESSIONS."""

    def __init__(self, lifetime: float):
        self.lifetime = lifetime
        self._by_id: dict[str, Session] = {}

    def open(self, token: str, name: str, roles: tuple[str, ...]) -> str:
        while len(self._by_id) >= MAX_SESSIONS:
            del self._by_id[next(iter(self._by_id))]
        session_id = secrets.token_urlsafe(32)
        self._by_id[session_id] = Session(token, name, roles, time.monotonic() + self.lifetime)
        return session_id

    def get(self, session_id: str | None) -> Session | None:
        session = self._by_id.get(session_id or "")
        if session is not None and session.expires < time.monotonic():
            del self._by_id[session_id or ""]
            return None
        return session

    def close(self, session_id: str | None) -> None:
        self._by_id.pop(session_id or "", None)

    def __len__(self) -> int:
        return len(self._by_id)


class Dashboard:
    def __init__(self, settings: DashboardSettings, stub: frontend_pb2_grpc.FrontendStub,
                 own_token: str | None, secure_cookies: bool, metrics: DashboardMetrics):
        self.settings = settings
        self.stub = stub
        self.own_token = own_token
        self.secure_cookies = secure_cookies
        self.sessions = Sessions(settings.session_hours * 3600)
        self.metrics = metrics
        self.streams = 0

    # --- who asks ------------------------------------------------------------

    def visitor(self, request: web.Request) -> Visitor:
        session_id = request.cookies.get(SESSION_COOKIE)
        session = self.sessions.get(session_id)
        if session is not None:
            return Visitor(session.token, session_id, session)
        return Visitor(self.own_token)

    async def call(self, visitor: Visitor, method: str, message):
        return await getattr(self.stub, method)(message, timeout=self.settings.call_timeout,
                                                metadata=visitor.metadata())

    # --- endpoints -----------------------------------------------------------

    async def me(self, request: web.Request) -> web.Response:
        visitor = self.visitor(request)
        who = await self.call(visitor, "WhoAmI", work_pb2.WhoAmIRequest())
        return web.json_response({"name": who.name, "roles": list(who.roles), "access_checked": who.access_checked,
                                  "logged_in": visitor.session is not None})

    async def login(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        token = body.get("token")
        if not isinstance(token, str) or not token.strip() or len(token) > 4096:
            raise _error(400, "give the token you were issued (dworkers token NAME --roles ...)")
        token = token.strip()
        who = await self.call(Visitor(token), "WhoAmI", work_pb2.WhoAmIRequest())
        session_id = self.sessions.open(token, who.name, tuple(who.roles))
        response = web.json_response({"name": who.name, "roles": list(who.roles),
                                      "access_checked": who.access_checked, "logged_in": True})
        response.set_cookie(SESSION_COOKIE, session_id, httponly=True, samesite="Strict", path="/",
                            secure=self.secure_cookies, max_age=int(self.settings.session_hours * 3600))
        log.info("%s logged in to the dashboard", who.name or "a visitor")
        return response

    async def logout(self, request: web.Request) -> web.Response:
        self.sessions.close(request.cookies.get(SESSION_COOKIE))
        response = web.json_response({"logged_in": False})
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    async def overview(self, request: web.Request) -> web.Response:
        info = await self.call(self.visitor(request), "ClusterInfo", work_pb2.ClusterInfoRequest())
        return web.json_response(views.overview(info, time.time()))

    async def works(self, request: web.Request) -> web.Response:
        query = request.query
        try:
            state = views.state_number(query.get("state", "PENDING"))
            size = int(query.get("page_size", "50"))
        except ValueError as exc:
            raise _error(400, str(exc)) from None
        if not 1 <= size <= 1000:
            raise _error(400, "page_size is 1 to 1000")
        page = await self.call(self.visitor(request), "ListWorks", work_pb2.ListWorksRequest(
            state=state, kind=query.get("kind", ""), page_token=query.get("page_token", ""), page_size=size))
        return web.json_response(views.page(page))

    async def work(self, request: web.Request) -> web.Response:
        status = await self.call(self.visitor(request), "GetWork",
                                 work_pb2.GetWorkRequest(work_id=request.match_info["work_id"]))
        return web.json_response(views.work(status))

    async def cancel(self, request: web.Request) -> web.Response:
        answer = await self.call(self.visitor(request), "CancelWork",
                                 work_pb2.CancelWorkRequest(work_ids=[request.match_info["work_id"]]))
        return web.json_response(views.work(answer.works[0]))

    async def retry(self, request: web.Request) -> web.Response:
        answer = await self.call(self.visitor(request), "RetryWork",
                                 work_pb2.RetryWorkRequest(work_ids=[request.match_info["work_id"]]))
        return web.json_response(views.work(answer.works[0]))

    # --- live streams (server-sent events) -------------------------------------

    async def overview_stream(self, request: web.Request) -> web.StreamResponse:
        visitor = self.visitor(request)
        info = await self.call(visitor, "ClusterInfo", work_pb2.ClusterInfoRequest())  # refused before it opens
        stream = _EventStream(self, request)
        async with stream:
            while True:
                await stream.send("overview", views.overview(info, time.time()))
                await asyncio.sleep(OVERVIEW_SECONDS)
                info = await self.call(visitor, "ClusterInfo", work_pb2.ClusterInfoRequest())
        return stream.response

    async def results_stream(self, request: web.Request) -> web.StreamResponse:
        visitor = self.visitor(request)
        after = request.query.get("after")
        if after is None:
            info = await self.call(visitor, "ClusterInfo", work_pb2.ClusterInfoRequest())
            start = max(0, info.last_sequence - TAIL_BACKLOG)
        elif after.isdigit():
            start = int(after)
        else:
            raise _error(400, "after is a result sequence number")
        call = self.stub.WatchResults(work_pb2.WatchResultsRequest(after_sequence=start), metadata=visitor.metadata())
        latest: deque = deque(maxlen=TAIL_PER_FLUSH)
        skipped = 0
        stream = _EventStream(self, request)
        reader = None
        try:
            async with stream:
                reader = asyncio.ensure_future(call.read())
                while True:
                    done, _ = await asyncio.wait({reader}, timeout=TAIL_FLUSH_SECONDS)
                    if done:
                        response = reader.result()
                        if response is grpc.aio.EOF:
                            break
                        for r in response.results:
                            if len(latest) == latest.maxlen:
                                skipped += 1
                            latest.append(r)
                        reader = asyncio.ensure_future(call.read())
                    elif latest:
                        await stream.send("results", {"results": [views.result(r) for r in latest],
                                                      "skipped": skipped})
                        latest.clear()
                        skipped = 0
        finally:
            if reader is not None:
                reader.cancel()
            call.cancel()
        return stream.response

    # --- the app ---------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REQUEST_BYTES,
                              middlewares=[self._count, self._errors, self._guard])
        for path in PAGES:  # one page; its script shows the view the path names
            app.router.add_get(path, _page)
        app.router.add_static("/static/", STATIC, append_version=False)
        app.router.add_get("/api/me", self.me)
        app.router.add_post("/api/login", self.login)
        app.router.add_post("/api/logout", self.logout)
        app.router.add_get("/api/overview", self.overview)
        app.router.add_get("/api/overview/stream", self.overview_stream)
        app.router.add_get("/api/works", self.works)
        app.router.add_get("/api/works/{work_id}", self.work)
        app.router.add_post("/api/works/{work_id}/cancel", self.cancel)
        app.router.add_post("/api/works/{work_id}/retry", self.retry)
        app.router.add_get("/api/results/stream", self.results_stream)
        app.router.add_get("/healthz", _healthz)
        return app

    @web.middleware
    async def _count(self, request: web.Request, handler):
        """Requests by route (its pattern, not the path: ids are not labels) and status."""
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as refused:
            status = refused.status
            raise
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.sessions.set(len(self.sessions))

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        """Actions need the header no other site can send (see the module's
        docstring); every answer carries headers that keep the page its own."""
        if request.method == "POST" and request.headers.get("X-Dworkers") != "1":
            raise _error(403, "actions need the header X-Dworkers: 1 (sent by the dashboard's own pages)")
        response = await handler(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if request.path.startswith("/api/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        """A frontend's refusal becomes the matching HTTP status with its message."""
        try:
            return await handler(request)
        except grpc.aio.AioRpcError as error:
            status = HTTP_STATUS.get(error.code(), 503)
            if status >= 500:
                log.warning("%s %s: the frontend answered %s %s", request.method, request.path,
                            error.code().name, error.details())
            return web.json_response({"error": error.details() or error.code().name, "code": error.code().name},
                                     status=status)


class _EventStream:
    """A server-sent events response within the bound on streams (`async
    with` it): `send` writes one event, and drops a browser that takes none
    for WRITE_TIMEOUT. A refusal of the frontend's ends it with a `failed`
    event saying why."""

    def __init__(self, dashboard: Dashboard, request: web.Request):
        self.dashboard = dashboard
        self.request = request
        self.response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                                    "X-Accel-Buffering": "no"})
        self._beat: asyncio.Task | None = None

    async def __aenter__(self):
        if self.dashboard.streams >= self.dashboard.settings.max_streams:
            raise _error(429, f"this dashboard already serves {self.dashboard.settings.max_streams} live streams")
        self.dashboard.streams += 1
        self.dashboard.metrics.streams.inc()
        try:
            await self.response.prepare(self.request)
        except BaseException:
            self.dashboard.streams -= 1
            self.dashboard.metrics.streams.dec()
            raise
        self._beat = asyncio.ensure_future(self._heartbeat())
        return self

    async def send(self, event: str, data) -> None:
        payload = f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
        await asyncio.wait_for(self.response.write(payload), WRITE_TIMEOUT)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            await asyncio.wait_for(self.response.write(b": still here\n\n"), WRITE_TIMEOUT)

    async def __aexit__(self, kind, error, trace) -> bool:
        self.dashboard.streams -= 1
        self.dashboard.metrics.streams.dec()
        if self._beat is not None:
            self._beat.cancel()
        if isinstance(error, grpc.aio.AioRpcError):  # the frontend refused or went away: the page says why
            status = HTTP_STATUS.get(error.code(), 503)
            try:
                await self.send("failed", {"error": error.details() or error.code().name,
                                           "code": error.code().name, "status": status})
            except (ConnectionError, asyncio.TimeoutError, RuntimeError):
                pass
            return True
        return isinstance(error, (ConnectionError, asyncio.TimeoutError))  # the browser went away


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _page(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def _json_body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise _error(400, "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise _error(400, "the body must be a JSON object")
    return body


def _error(status: int, message: str) -> web.HTTPException:
    classes = {400: web.HTTPBadRequest, 403: web.HTTPForbidden, 429: web.HTTPTooManyRequests}
    return classes[status](text=json.dumps({"error": message}), content_type="application/json")


def _https(settings: DashboardSettings) -> ssl.SSLContext | None:
    """The HTTPS context, loaded again when the files change (new
    connections get the new certificate)."""
    if not settings.https_cert and not settings.https_key:
        return None
    if not (settings.https_cert and settings.https_key):
        raise ConfigError("--https-cert needs --https-key (and the key its certificate)")
    for path in (settings.https_cert, settings.https_key):
        read_file(path)  # one clear line when missing or unreadable
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.https_cert, settings.https_key)
    return context


async def _reload_https(context: ssl.SSLContext, settings: DashboardSettings) -> None:
    def stamp():
        return tuple(os.stat(p).st_mtime_ns for p in (settings.https_cert, settings.https_key))
    seen = stamp()
    while True:
        await asyncio.sleep(5.0)
        try:
            now = stamp()
            if now != seen:
                context.load_cert_chain(settings.https_cert, settings.https_key)
                seen = now
                log.info("HTTPS certificate reloaded")
        except (OSError, ssl.SSLError) as exc:  # half-written: the last good one stays until both match
            log.warning("HTTPS certificate not reloaded: %s", exc)


def _host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--listen {listen!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


async def serve(settings: DashboardSettings, stopped: asyncio.Event, ready=None) -> None:
    tls = credentials.Tls(ca=settings.tls_ca, cert=settings.tls_cert, key=settings.tls_key,
                          server_name=settings.tls_server_name)
    use_tls = tls if settings.tls or tls != credentials.Tls() else False
    own_token = credentials.read_token(settings.token_file) if settings.token_file else None
    https = _https(settings)
    host, port = _host_port(settings.listen)
    channel = credentials.channel(settings.frontend, use_tls, aio=True, token="")
    registry = process_registry()
    serve_metrics(settings.metrics_port, registry)
    dashboard = Dashboard(settings, frontend_pb2_grpc.FrontendStub(channel), own_token, https is not None,
                          DashboardMetrics(registry))
    # A browser that goes away cancels its handler: a live stream frees its place at once.
    runner = web.AppRunner(dashboard.app(), access_log=None, shutdown_timeout=settings.shutdown_grace,
                           handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=https)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {settings.listen}: {exc.strerror or exc}") from None
    reload = asyncio.ensure_future(_reload_https(https, settings)) if https is not None else None
    bound = runner.addresses[0][1] if runner.addresses else port
    url = f"{'https' if https else 'http'}://{'localhost' if host in ('127.0.0.1', '0.0.0.0', '::') else host}:{bound}/"
    log.info("dashboard on %s (frontend %s)", url, settings.frontend)
    if ready is not None:
        ready(url)
    await stopped.wait()
    log.info("dashboard shutting down")
    if reload is not None:
        reload.cancel()
    await runner.cleanup()
    await channel.close()


def main(settings: DashboardSettings, stop: StopRequest) -> None:
    """Serves the dashboard until a stop request."""
    async def run() -> None:
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        stop.on_stop(lambda: loop.call_soon_threadsafe(stopped.set))
        await serve(settings, stopped)
    asyncio.run(run())
