"""Jobs written the way SDK users write them (JSON arguments, async, ctx);
loaded into workers with --jobs tests.jobs_sdk."""

from __future__ import annotations

import asyncio
import time

import dworkers


@dworkers.job("add", max_attempts=2, timeout=20)
def add(a, b):
    return a + b


@dworkers.job("describe")
def describe(name, *, tags=(), ctx):
    return {"name": name, "tags": list(tags), "work_id": ctx.work_id, "attempt": ctx.attempt,
            "kind": ctx.kind, "seconds_left": round(ctx.deadline - time.time(), 1)}


@dworkers.job("async_double")
async def async_double(x):
    await asyncio.sleep(0.01)
    return x * 2


@dworkers.job("forgot_async")
def forgot_async(x):
    return asyncio.sleep(0, x)  # a coroutine, never awaited: the attempt must fail


@dworkers.job("not_json")
def not_json():
    return {1, 2, 3}


@dworkers.job("reject", max_attempts=1)
def reject(value):
    raise ValueError(f"bad input {value}")


@dworkers.job("reverse")
def reverse(payload: bytes) -> bytes:
    return payload[::-1]


@dworkers.job("nap")
def nap(seconds):
    time.sleep(seconds)
    return seconds
