"""How arguments and results travel: JSON unless the caller passes bytes.

The content type goes with the bytes (Work.content_type for a payload,
WorkResult.content_type for a result), so any language can decode them:
  application/json            a call's arguments as {"args": [...], "kwargs": {...}};
                              a result as any JSON value
  text/plain; charset=utf-8   a str
  "" (empty)                  opaque bytes, given to the job as they are
"""

from __future__ import annotations

import json
from typing import Any

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
BYTES = ""


class EncodingError(TypeError):
    """A value cannot travel: not bytes, str or JSON-serializable."""


def _json(value: Any, what: str) -> bytes:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise EncodingError(f"{what} is not JSON-serializable ({exc}); return or pass bytes, str or JSON "
                            "values (dict, list, str, int, float, bool, None)") from None


def encode_call(args: tuple = (), kwargs: dict | None = None) -> tuple[bytes, str]:
    """A call's arguments as a payload and its content type."""
    body: dict[str, Any] = {"args": list(args)}
    if kwargs:
        body["kwargs"] = kwargs
    return _json(body, "an argument"), JSON


def decode_call(payload: bytes, content_type: str) -> tuple[list, dict]:
    """The positional and keyword arguments a job is called with."""
    if content_type == JSON:
        body = json.loads(payload)
        if not isinstance(body, dict) or not isinstance(body.get("args", []), list) \
                or not isinstance(body.get("kwargs", {}), dict):
            raise ValueError('a JSON payload must be an object {"args": [...], "kwargs": {...}}')
        return body.get("args", []), body.get("kwargs", {})
    if content_type.startswith("text/plain"):
        return [payload.decode()], {}
    return [payload], {}


def encode_result(value: Any) -> tuple[bytes, str]:
    """A job's return value as result bytes and their content type."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), BYTES
    if isinstance(value, str):
        return value.encode(), TEXT
    if hasattr(value, "__await__"):
        raise EncodingError(f"the job returned {type(value).__name__} {value!r}: declare it `async def` to "
                            "have it awaited")
    return _json(value, f"the job's result ({type(value).__name__})"), JSON


def decode_result(result: bytes, content_type: str) -> Any:
    """A result as the job returned it (bytes when the type is unknown)."""
    if content_type == JSON:
        return json.loads(result)
    if content_type.startswith("text/plain"):
        return result.decode()
    return result
