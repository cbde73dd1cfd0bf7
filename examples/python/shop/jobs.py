"""The shop's jobs. Workers load them with `dworkers worker --jobs shop.jobs`
(run from this folder); the producer imports them to submit works."""

import asyncio
import hashlib

import dworkers


@dworkers.job("price", max_attempts=5, timeout=10)
def price(items, *, coupon=None):
    """The total of an order: a dict comes back to the caller as a dict."""
    total = sum(item["quantity"] * item["unit_price"] for item in items)
    if coupon == "TENOFF":
        total *= 0.9
    if total < 0:
        raise ValueError(f"negative total {total}")  # the caller gets dworkers.WorkFailed
    return {"total": round(total, 2), "items": len(items)}


@dworkers.job("checksum")
def checksum(data: bytes) -> str:
    """Bytes in (submitted with payload=...): the work's input as it was sent."""
    return hashlib.sha256(data).hexdigest()


@dworkers.job("notify")
async def notify(customer, *, ctx):
    """An async job with its context: which work and which attempt this is."""
    await asyncio.sleep(0.01)  # e.g. an HTTP call with an async client
    return f"notified {customer} (work {ctx.work_id}, attempt {ctx.attempt})"
