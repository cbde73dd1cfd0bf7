"""dworkers: distributed workers for Python.

    import dworkers

    @dworkers.job("square")
    def square(n):
        return n * n

    client = dworkers.Client("127.0.0.1:7000")
    client.submit("square", 3).result()   # 9

The SDK's names load on first use, so the services (and job processes)
importing dworkers.* pay nothing for them.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Client": "dworkers.client", "Handle": "dworkers.client", "Result": "dworkers.client",
    "WorkFailed": "dworkers.client", "WorkCancelled": "dworkers.client", "SubmitError": "dworkers.client",
    "connect": "dworkers.client",
    "AsyncClient": "dworkers.aio", "AsyncHandle": "dworkers.aio",
    "job": "dworkers.worker.jobs", "Job": "dworkers.worker.jobs", "Context": "dworkers.worker.jobs",
    "Permanent": "dworkers.worker.jobs",
    "Tls": "dworkers.credentials",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name == "__version__":
        from importlib.metadata import version

        return version("dworkers")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dworkers' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
