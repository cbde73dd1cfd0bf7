"""Every gRPC server is built one way: the services, health checking,
reflection (when enabled), and the interceptors that count calls and turn
errors into statuses, for the threaded servers (frontend) and the asyncio
ones (master) alike.

Handlers raise DworkersError (services/common/errors.py) or let a
grpc.RpcError from a call they made pass through; the interceptor aborts the
call with the matching status, message, trailing metadata and structured
details. No handler calls context.abort itself.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Iterable

import grpc
from google.protobuf import any_pb2
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dworkers.common.auth import Authorizer
from dworkers.common.errors import DworkersError
from dworkers.common.metrics import ServerMetrics
from dworkers.common.streamguard import ThreadGuard, Watched, guard_task
from dworkers.common.wire import SERVER_OPTIONS, listen

DETAILS_KEY = "grpc-status-details-bin"  # where gRPC carries a google.rpc.Status
log = logging.getLogger(__name__)


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str, tuple] | None:
    """The status a handler's error answers with, or None if it is a bug."""
    if isinstance(error, DworkersError):
        trailers = error.trailers()
        details = error.details()
        code = grpc.StatusCode[error.status]
        if details:
            packed = []
            for message in details:
                item = any_pb2.Any()
                item.Pack(message)
                packed.append(item)
            status = status_pb2.Status(code=code.value[0], message=error.message, details=packed)
            trailers += ((DETAILS_KEY, status.SerializeToString()),)
        return code, error.message, trailers
    if isinstance(error, grpc.RpcError) and isinstance(error, grpc.Call):
        if error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            # This server's own credentials, not the caller's: the caller can only wait.
            _log_refused(error)
            return (grpc.StatusCode.UNAVAILABLE, "this frontend cannot act for you now: a master refused its "
                    "credentials (its operator must fix them)", ())
        return error.code(), error.details() or "", ()  # a call this server made: its answer, passed on
    return None


_refused_logged = [0.0]


def _log_refused(error) -> None:
    """Once every ten seconds at most (status_of runs more than once per call)."""
    now = time.monotonic()
    if now - _refused_logged[0] >= 10.0:
        _refused_logged[0] = now
        log.error("a master refused this process's credentials (--token-file, --tls-cert): %s %s",
                  error.code().name, error.details())


def _method(details) -> str:
    return details.method.rsplit("/", 1)[-1]


class SyncInterceptor(grpc.ServerInterceptor):
    """Errors to statuses, calls counted by method and code, and checked
    against the access file when there is one (threaded server)."""

    def __init__(self, metrics: ServerMetrics, authorizer: Authorizer | None = None):
        self.metrics = metrics
        self.authorizer = authorizer
        self.guard = ThreadGuard()  # ends the streams of callers who lost access

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method, metrics, authorizer = _method(handler_call_details), self.metrics, self.authorizer
        full_method = handler_call_details.method

        def abort(context, error):
            status = status_of(error)
            if status is None:
                raise error
            context.abort(status[0], status[1]) if not status[2] else _abort_with(context, status)

        def unary(behavior):
            def wrapped(request, context):
                started = time.perf_counter()
                try:
                    if authorizer is not None:
                        authorizer.admit(full_method, context, request)
                    response = behavior(request, context)
                except Exception as error:
                    metrics.observe(method, _code(context, error), started)
                    abort(context, error)
                    raise
                metrics.observe(method, _code(context, None), started)
                return response
            return wrapped

        def streaming(behavior):
            def wrapped(request, context):
                started, code, release, watched = metrics.stream_opened(method), None, None, None
                try:
                    handler_context = context
                    if authorizer is not None:
                        identity, release = authorizer.admit(full_method, context, request)
                        watched = Watched(authorizer, full_method, context, identity)
                        handler_context = self.guard.watch(watched)
                    for item in behavior(request, handler_context):
                        if watched is not None and watched.denied is not None:
                            raise watched.denied
                        yield item
                    if watched is not None and watched.denied is not None:
                        raise watched.denied  # its handler ended because the guard stopped it
                except Exception as error:
                    error = watched.denied if watched is not None and watched.denied is not None else error
                    code = _code(context, error)
                    abort(context, error)
                    raise
                except BaseException:  # the caller went away
                    code = grpc.StatusCode.CANCELLED
                    raise
                finally:
                    if watched is not None:
                        self.guard.forget(watched)
                    if release is not None:
                        release()
                    metrics.stream_closed(method, code or _code(context, None), started)
            return wrapped

        return _rewrap(handler, unary, streaming)


class AsyncInterceptor(grpc.aio.ServerInterceptor):
    """The same for an asyncio server."""

    def __init__(self, metrics: ServerMetrics, authorizer: Authorizer | None = None):
        self.metrics = metrics
        self.authorizer = authorizer

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method, metrics, authorizer = _method(handler_call_details), self.metrics, self.authorizer
        full_method = handler_call_details.method

        async def abort(context, error):
            status = status_of(error)
            if status is None:
                raise error
            await context.abort(status[0], status[1], trailing_metadata=status[2])

        def unary(behavior):
            async def wrapped(request, context):
                started = time.perf_counter()
                try:
                    if authorizer is not None:
                        authorizer.admit(full_method, context, request)
                    response = await behavior(request, context)
                except Exception as error:
                    metrics.observe(method, _code(context, error), started)
                    await abort(context, error)
                    raise
                metrics.observe(method, _code(context, None), started)
                return response
            return wrapped

        def streaming(behavior):
            """Always a coroutine handler that writes each item itself: a
            cancel (the guard's, or the caller's) then lands in this `try`,
            never in gRPC's own loop around an async generator, which would
            swallow it and send no status."""
            generates = inspect.isasyncgenfunction(behavior)

            async def wrapped(request, context):
                started, code, release, watched, guard = metrics.stream_opened(method), None, None, None, None
                try:
                    if authorizer is not None:
                        identity, release = authorizer.admit(full_method, context, request)
                        watched = Watched(authorizer, full_method, context, identity)
                        guard = guard_task(watched, context)
                    if generates:
                        async for item in behavior(request, context):
                            await context.write(item)
                            if watched is not None and watched.denied is not None:
                                raise watched.denied
                    else:
                        await behavior(request, context)  # it writes with context.write
                    if watched is not None and watched.denied is not None:
                        raise watched.denied  # the handler swallowed the guard's cancel
                except asyncio.CancelledError:
                    if watched is None or watched.denied is None:
                        code = grpc.StatusCode.CANCELLED  # the caller went away
                        raise
                    _stop(guard)  # no second cancel while the status goes out
                    _uncancel()
                    code = _code(context, watched.denied)
                    await abort(context, watched.denied)
                except Exception as error:
                    failure: BaseException = error
                    if watched is not None and watched.denied is not None:
                        _stop(guard)
                        failure = watched.denied
                    code = _code(context, failure)
                    await abort(context, failure)
                    raise
                except BaseException:
                    code = grpc.StatusCode.CANCELLED
                    raise
                finally:
                    _stop(guard)
                    if release is not None:
                        release()
                    metrics.stream_closed(method, code or _code(context, None), started)
            return wrapped

        return _rewrap(handler, unary, streaming)


def _stop(guard: asyncio.Task | None) -> None:
    if guard is not None:
        guard.cancel()


def _uncancel() -> None:
    """The cancel was the guard's, handled: the task goes on to answer."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):  # Python 3.11+
        task.uncancel()


def _abort_with(context, status) -> None:
    context.abort_with_status(_Status(*status))


class _Status(grpc.Status):
    def __init__(self, code, details, trailing_metadata):
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata


def _code(context, error) -> grpc.StatusCode:
    if error is not None:
        status = status_of(error)
        return status[0] if status else grpc.StatusCode.UNKNOWN
    code = context.code() if callable(getattr(context, "code", None)) else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK


def _rewrap(handler, unary, streaming):
    """The handler with its behaviour wrapped (all four kinds of method)."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            streaming(handler.unary_stream), handler.request_deserializer, handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(
        streaming(handler.stream_stream), handler.request_deserializer, handler.response_serializer)


def build(servicers: Iterable[tuple[object, Callable, str]], address: str, metrics: ServerMetrics,
          reflection_on: bool = True, aio: bool = False, tls=None, authorizer: Authorizer | None = None,
          **options):
    """A server with `servicers` ((servicer, add_to_server, full service
    name) each), health checking and, if on, reflection, bound to `address`
    (serving TLS from `tls`, a TlsFiles, when given; each call checked by
    `authorizer`, when given). Returns (server, health servicer, port)."""
    interceptor = AsyncInterceptor(metrics, authorizer) if aio else SyncInterceptor(metrics, authorizer)
    if aio:
        server = grpc.aio.server(interceptors=[interceptor], options=SERVER_OPTIONS, **options)
        from grpc_health.v1._async import HealthServicer as AsyncHealth
        health = AsyncHealth()
    else:
        from concurrent import futures

        from grpc_health.v1 import health as sync_health

        threads = options.pop("threads")
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), interceptors=[interceptor],
                             options=SERVER_OPTIONS, **options)
        health = sync_health.HealthServicer()
    names = []
    for servicer, add, name in servicers:
        add(servicer, server)
        names.append(name)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if reflection_on:
        reflection.enable_server_reflection(
            (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    port = listen(server, address, tls.server_credentials() if tls is not None else None)
    return server, health, port

