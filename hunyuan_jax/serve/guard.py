"""What stands between the network and the endpoints: the API key, the request-body cap, the
parsing of JSON bodies and OpenAI's error body for every refusal.

    app.add_middleware(Guard, api_key="KEY", open_paths={"/health"}, max_body_bytes=4 << 20)
    body = await parse_body(request, CompletionRequest)   # in an endpoint: 400 on bad input

`Guard` (pure ASGI, the outermost layer) refuses a request without `Authorization: Bearer KEY`
(compared in constant time: `hmac.compare_digest` of the SHA-256 digests) with 401 before its
body is read, except on `open_paths`; then it reads the body, refusing one larger than
`max_body_bytes` with 413 (at once from `Content-Length`, else as soon as the streamed body
passes the cap), and hands the endpoint the buffered body. `parse_body` decodes and validates
a body off the event loop (a multi-megabyte JSON must not stall the other streams): invalid
UTF-8, invalid JSON, nesting too deep, lone surrogates in any string and schema violations are
400s naming the field. Every error here has OpenAI's body
`{"error": {"message", "type", "param", "code"}}` (`error_response`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable, Iterable

from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

DEFAULT_MAX_BODY_BYTES = 4 << 20  # 4 MiB: a 128K-token prompt as token ids is ~1 MB of JSON
# A refused body is read and dropped up to this many bytes before the 413 (closing a socket
# with unread data resets it, and the client may never see the response); past it, closed.
DRAIN_BYTES = 64 << 20


class ApiError(Exception):
    """A refusal with OpenAI's error body (status, message, type, the field at fault)."""

    def __init__(self, status: int, message: str, kind: str, param=None, reason=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.reason = reason  # the metrics' rejection reason (400s: "bad_request")


def error_response(
    status: int, message: str, kind: str, param=None, code=None, headers=None
) -> JSONResponse:
    err = {"message": message, "type": kind, "param": param, "code": code or status}
    return JSONResponse({"error": err}, status_code=status, headers=headers)


class Guard:
    """ASGI middleware: API key, then the body cap (see the module docstring)."""

    def __init__(
        self,
        app,
        *,
        api_key: str | None = None,
        open_paths: Iterable[str] = ("/health",),
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        on_reject: Callable[[str], None] | None = None,
    ):
        self.app = app
        self.key_digest = None if api_key is None else _digest(api_key.encode("utf-8"))
        self.open_paths = frozenset(open_paths)
        self.max_body_bytes = int(max_body_bytes)
        self.on_reject = on_reject or (lambda reason: None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        if self.key_digest is not None and scope["path"] not in self.open_paths:
            if not self._authorized(headers.get(b"authorization")):
                self.on_reject("unauthorized")
                msg = "invalid or missing API key: send the header 'Authorization: Bearer KEY'"
                response = error_response(401, msg, "invalid_request_error",
                                          code="invalid_api_key",
                                          headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
                return await response(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                response = error_response(400, "invalid Content-Length header",
                                          "invalid_request_error", "Content-Length")  # fmt: skip
                return await response(scope, receive, send)
            if declared > self.max_body_bytes:
                drained = declared <= DRAIN_BYTES and await _drain(receive, 0)
                return await self._too_large(scope, receive, send, declared, drained)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None  # the client is gone before its body arrived
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:  # streamed past the cap (no or a false length)
                drained = not message.get("more_body", False) or await _drain(receive, size)
                return await self._too_large(scope, receive, send, None, drained)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the client's disconnect

        return await self.app(scope, replay, send)

    def _authorized(self, value: bytes | None) -> bool:
        scheme, _, token = (value or b"").strip().partition(b" ")
        given = _digest(token.strip())  # always compared, so a missing header takes as long
        return hmac.compare_digest(given, self.key_digest) and scheme.lower() == b"bearer"

    async def _too_large(self, scope, receive, send, declared: int | None, drained: bool):
        self.on_reject("too_large")
        size = f"{declared} bytes" if declared is not None else "more"
        msg = (f"the request body ({size}) exceeds the server's limit of {self.max_body_bytes} "
               f"bytes (--max-body-bytes)")  # fmt: skip
        headers = None if drained else {"Connection": "close"}
        response = error_response(413, msg, "invalid_request_error", headers=headers)
        return await response(scope, receive, send)


async def _drain(receive, seen: int) -> bool:
    """Reads and drops the rest of a body (up to DRAIN_BYTES in all); True if it all came."""
    while seen <= DRAIN_BYTES:
        message = await receive()
        if message["type"] == "http.disconnect":
            return False
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
    return False


def _digest(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def _headers(scope) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for k, v in scope.get("headers", ()):
        out.setdefault(k.lower(), v)  # the first of repeated headers
    return out


# ----------------------------------------------------------------------------- bodies
async def parse_body(request: Request, model: type[BaseModel]):
    """The request's JSON body as `model`, decoded and validated in a worker thread."""
    return await run_in_threadpool(decode_body, await request.body(), model)


def decode_body(raw: bytes, model: type[BaseModel]):
    """bytes -> `model`; every fault is an `ApiError` 400 naming what is wrong."""
    bad = lambda msg, param=None: ApiError(400, msg, "invalid_request_error", param)
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as e:
        raise bad(f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise bad(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column "
                  f"{e.colno}") from None  # fmt: skip
    except (ValueError, RecursionError) as e:  # integers of > 4300 digits; nesting too deep
        raise bad(f"the request body is not acceptable JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise bad(f"the request body must be a JSON object, got {type(data).__name__}")
    where = _surrogate(data, ()) if _ESCAPED_SURROGATE.search(raw) else None
    if where is not None:
        path = ".".join(map(str, where)) or None
        raise bad(f"{path or 'the body'}: a string holds a lone surrogate (e.g. \\ud800), "
                  "which is not valid Unicode", path)  # fmt: skip
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        parts = []
        for err in errors[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()))
            parts.append(f"{loc or 'body'}: {err.get('msg')}")
        first = ".".join(str(x) for x in errors[0].get("loc", ())) if errors else None
        raise bad("invalid request: " + "; ".join(parts), first or None) from None


# a lone surrogate can only come from a JSON escape (UTF-8 itself cannot encode one)
_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def _surrogate(obj, path: tuple):
    """The path of the first string (key or value) with a lone surrogate, or None."""
    stack = [(obj, path)]
    while stack:
        x, p = stack.pop()
        if isinstance(x, str):
            if _has_surrogate(x):
                return p
        elif isinstance(x, dict):
            for k, v in x.items():
                if _has_surrogate(k):
                    return (*p, "<key>")
                stack.append((v, (*p, k)))
        elif isinstance(x, list):
            stack.extend((v, (*p, i)) for i, v in enumerate(x) if isinstance(v, (str, dict, list)))
    return None


def _has_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True
