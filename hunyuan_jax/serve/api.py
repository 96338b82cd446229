"""The HTTP layer: OpenAI's completions and chat completions APIs (JSON and server-sent events),
the model list, health, Prometheus metrics and vLLM's tokenizer endpoints, on FastAPI.

    app = create_app(ServeState(engine, tokenizer, "hunyuan", max_len=512, defaults=...))

| route | what |
|---|---|
| POST /v1/completions | prompt: text, list of texts, token ids or lists of ids; max_tokens (0 with echo: score only), temperature, top_p, top_k, seed, stop, repetition_penalty, logprobs (0..20), echo (prompt logprobs), stream |
| POST /v1/chat/completions | messages rendered with the tokenizer's chat template; logprobs + top_logprobs; stream |
| GET /v1/models, GET /health, GET /metrics | |
| POST /tokenize, POST /detokenize, GET /tokenizer_info | as vLLM: lm-eval's `tokenizer_backend=remote` uses them |

Requests become `hunyuan_jax.engine` requests (one per prompt; `usage` reports the prompt
tokens served from the prefix cache as `prompt_tokens_details.cached_tokens`); the engine thread's events reach this
event loop through `loop.call_soon_threadsafe`. Text is detokenized incrementally (a token
that ends inside a multi-byte character waits for the next); `stop` strings end a request
(text cut before the stop, its pages freed) and, when streaming, the text that could be the
start of a stop string is held back. A client that disconnects cancels its requests (a watcher
polls `request.is_disconnected()`; once a stream has started, the response's own disconnect
listener cancels the stream instead). Request bodies are `schemas.py`; the routes `routes.py`.
Sampling fields left out take the checkpoint's generation_config.json defaults. Errors have
OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 400 bad input (malformed JSON,
invalid UTF-8, lone surrogates, invalid or out-of-range fields; prompt + max_tokens over the
context names the numbers), 401 missing or wrong API key, 404 unknown model or route, 405,
413 body over --max-body-bytes, 429 queue full, 500 one request failed in the engine, 503
engine stopped (`guard.py` checks the key and the body size before any endpoint runs).
Decoding JSON, tokenizing and detokenizing whole prompts run in worker threads, so a large
request does not stall /health or the other streams. Chat message content is encoded as plain
text: special-token text in it (`<|eos|>`, turn markers) never becomes a control token.
Generated text leaves special tokens out (vLLM's `skip_special_tokens`, default true).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from hunyuan_jax.decode.sampling import SamplingConfig
from hunyuan_jax.engine.scheduler import Engine
from hunyuan_jax.serve import routes
from hunyuan_jax.serve.guard import DEFAULT_MAX_BODY_BYTES, ApiError, Guard
from hunyuan_jax.serve.guard import error_response as error_body


@dataclasses.dataclass
class ServeState:
    engine: Engine
    tokenizer: Any  # hunyuan_jax.data.tokenizer.Tokenizer
    model_name: str
    max_len: int
    defaults: SamplingConfig
    metrics: Any = None
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


# ----------------------------------------------------------------------------- the app
def create_app(
    state: ServeState,
    *,
    api_key: str | None = None,
    api_key_metrics: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The app; `api_key`: required as `Authorization: Bearer KEY` everywhere but /health
    (and /metrics unless `api_key_metrics`); bodies over `max_body_bytes` are 413s."""
    app = FastAPI(title="hunyuan-jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    reject = rejection_counter(state.metrics)
    add_guard(app, reject, api_key, api_key_metrics, max_body_bytes)
    add_error_handlers(app, reject)
    routes.add_info_routes(app, state)
    routes.add_tokenizer_routes(app, state)
    gen = routes.Generation(state)
    routes.add_completions_route(app, gen)
    routes.add_chat_route(app, gen)
    return app


def rejection_counter(metrics):
    """reject(reason): counts a refused request in the metrics (if any)."""

    def reject(reason: str):
        if metrics is not None:
            metrics.rejected.labels(reason).inc()

    return reject


def add_guard(app: FastAPI, reject, api_key, api_key_metrics: bool, max_body_bytes: int):
    """The API key and the request-body cap (`guard.Guard`), before any endpoint runs."""
    open_paths = {"/health"} | (set() if api_key_metrics else {"/metrics"})
    app.add_middleware(Guard, api_key=api_key, open_paths=open_paths,
                       max_body_bytes=max_body_bytes, on_reject=reject)  # fmt: skip


def add_error_handlers(app: FastAPI, reject) -> None:
    """Every error as OpenAI's body: invalid fields (400), refusals (`ApiError`), routing
    (404, 405) and bugs (500)."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        reject("bad_request")
        parts = []
        for e in exc.errors()[:5]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
        first = exc.errors()[0].get("loc", ()) if exc.errors() else ()
        param = ".".join(str(x) for x in first if x != "body") or None
        return error_body(
            400, "invalid request: " + "; ".join(parts), "invalid_request_error", param
        )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        reason = exc.reason or ("bad_request" if exc.status == 400 else None)
        if reason is not None:
            reject(reason)
        return error_body(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):  # 404, 405 routing
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        return error_body(exc.status_code, msg, kind, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # a bug: OpenAI's body, traceback logged
        return error_body(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")
