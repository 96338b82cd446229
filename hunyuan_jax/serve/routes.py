"""The server's routes, added to the app by `api.create_app`: the information routes (health,
metrics, the model list), vLLM's tokenizer routes, and the two generation routes (completions,
chat completions) with what they share (`Generation`: the model check, sampling parameters,
the context check, running a request's prompts on the engine). What each route takes and
answers: the table in `api.py`'s docstring.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from hunyuan_jax.engine.requests import EngineStopped, GenParams, QueueFull, check_request
from hunyuan_jax.engine.requests import Request as EngineRequest
from hunyuan_jax.engine.scheduler import Engine
from hunyuan_jax.serve.guard import ApiError, parse_body
from hunyuan_jax.serve.guard import error_response as error_body
from hunyuan_jax.serve.schemas import (
    GREEDY_BELOW,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
)
from hunyuan_jax.serve.text import Choice

_TOP_P_MIN = float(np.finfo(np.float32).tiny)  # any top_p below keeps the top token alone


# ----------------------------------------------------------------------------- information
def add_info_routes(app: FastAPI, state) -> None:
    """GET /health, /metrics, /v1/models."""
    engine, metrics = state.engine, state.metrics

    @app.get("/health")
    async def health():
        if engine.error:
            return error_body(503, engine.error, "engine_error")
        return {"status": "ok", "slots": engine.ex.slots, "active_slots": engine.active_slots,
                "queue_length": engine.queue_length, "kv_pages_free": engine.pool.available(),
                "kv_pages": engine.ex.num_pages - 1}  # fmt: skip

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        card = {"id": state.model_name, "object": "model", "created": state.created,
                "owned_by": "hunyuan-jax", "max_model_len": state.max_len}  # fmt: skip
        return {"object": "list", "data": [card]}


def add_tokenizer_routes(app: FastAPI, state) -> None:
    """GET /tokenizer_info, POST /tokenize, POST /detokenize (as vLLM)."""
    tok = state.tokenizer

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        special = {v: k for k, v in tok.special_tokens.items()}
        name = lambda i: special.get(i) if i is not None else None
        eos = tok.eos_ids[0] if tok.eos_ids else None
        return {"eos_token": name(eos), "bos_token": name(_safe(lambda: tok.bos_id)),
                "pad_token": name(_safe(lambda: tok.pad_id)), "model_max_length": state.max_len,
                "tokenizer_class": type(tok).__name__}  # fmt: skip

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await parse_body(request, TokenizeRequest)
        ids = await run_in_threadpool(tok.encode, body.prompt, body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.max_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await parse_body(request, DetokenizeRequest)
        try:
            return {"prompt": await run_in_threadpool(tok.decode, body.tokens)}
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_request_error", "tokens") from None


# ----------------------------------------------------------------------------- generation
class Generation:
    """What the completions and chat routes share: the model check, a request's sampling
    parameters (fields left out: the checkpoint's defaults), the context check and running a
    request's prompts on the engine (`run`)."""

    def __init__(self, state):
        self.state = state
        self.tok, self.engine, self.metrics = state.tokenizer, state.engine, state.metrics
        self.vocab = self.engine.ex.vocab_limit

    def check_model(self, name: str):
        state = self.state
        if name != state.model_name:
            msg = f"the model '{name[:200]}' does not exist; this server serves "
            raise ApiError(404, msg + f"'{state.model_name}'", "not_found_error", "model",
                           "unknown_model")  # fmt: skip

    def params(self, body: SamplingFields, max_tokens: int, top_logprobs: int, prompt_lps: bool):
        d = self.state.defaults
        pick = lambda v, default: default if v is None else v
        top_k = int(pick(body.top_k, d.top_k))
        temperature = float(pick(body.temperature, d.temperature))
        return GenParams(
            max_tokens=max_tokens,
            temperature=0.0 if temperature < GREEDY_BELOW else temperature,
            top_k=0 if top_k <= 0 or top_k >= self.vocab else top_k,  # >= vocabulary: all tokens
            top_p=max(float(pick(body.top_p, d.top_p)), _TOP_P_MIN),
            repetition_penalty=float(pick(body.repetition_penalty, d.repetition_penalty)),
            seed=body.seed,
            top_logprobs=top_logprobs,
            prompt_logprobs=prompt_lps,
            ignore_eos=body.ignore_eos,
        )

    def check_fits(self, prompts, max_tokens):
        engine = self.engine
        if len(prompts) > max(engine.max_queue, 1):
            raise ApiError(400, f"{len(prompts)} prompts in one request: more than the queue "
                           f"holds ({engine.max_queue}, --max-queue)", "invalid_request_error",
                           "prompt")  # fmt: skip
        for p in prompts:
            msg = check_request(
                p, max_tokens, self.state.max_len, self.vocab, engine.ex.pool_tokens
            )
            if msg is not None:
                too_long = "context length" in msg or "page pool" in msg
                raise ApiError(400, msg, "invalid_request_error",
                               "max_tokens" if too_long else "prompt",
                               "too_long" if too_long else None)  # fmt: skip

    async def run(self, request: Request, prompts, params, stops, echo_prompt, stream, skip):
        """Submits one engine request per prompt; yields (choice, event) as they come (`skip`:
        generated text leaves special tokens out)."""
        tok, engine, metrics = self.tok, self.engine, self.metrics
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        k = params.top_logprobs
        make = lambda: [Choice(i, p, tok, stops, echo_prompt, k, skip)
                        for i, p in enumerate(prompts)]  # fmt: skip
        choices = await run_in_threadpool(make)  # echo decodes the whole prompt
        for c in choices:
            c.siblings = choices
        reqs = []
        for c in choices:
            sink = lambda ev, c=c: loop.call_soon_threadsafe(q.put_nowait, (c, ev))
            c.request = EngineRequest(c.prompt, params, sink)
            reqs.append(c.request)
        try:
            for r in reqs:
                engine.submit(r)
        except QueueFull as e:
            for r in reqs:
                engine.cancel(r)
            raise ApiError(429, str(e), "rate_limit_error", reason="queue_full") from None
        except EngineStopped as e:
            raise ApiError(503, str(e), "service_unavailable") from None
        if metrics is not None:
            metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        # a client that hangs up cancels its requests: polled until the first event of a stream
        # (then the response's own disconnect listener takes over), until the end otherwise
        watcher = asyncio.create_task(_watch(request, engine, reqs))
        try:
            pending = len(choices)
            while pending:
                c, ev = await q.get()
                was_done = c.finish_reason is not None
                delta = c.add(ev)
                if c.finish_reason is not None and not was_done:
                    pending -= 1
                    engine.cancel(reqs[c.index])  # a stop string: free the slot now
                    if metrics is not None:
                        metrics.request_seconds.observe(time.perf_counter() - reqs[0].t_submit)
                if stream and watcher is not None:
                    watcher.cancel()
                    watcher = None
                yield c, delta
        finally:
            if watcher is not None:
                watcher.cancel()
            for r in reqs:
                if not r.finished:
                    engine.cancel(r)


def stops_of(body) -> list[str]:
    stop = body.stop
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    return [s for s in stops if s]


# ----------------------------------------------------------------------------- completions
def add_completions_route(app: FastAPI, gen: Generation) -> None:
    """POST /v1/completions."""
    state, tok = gen.state, gen.tok

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse_body(request, CompletionRequest)
        gen.check_model(body.model)
        echo, stream = bool(body.echo), bool(body.stream)
        prompts = await run_in_threadpool(_prompts, body.prompt, tok)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        if max_tokens == 0 and not echo:
            raise ApiError(400, "max_tokens=0 needs echo=true (scoring a prompt)",
                           "invalid_request_error", "max_tokens")  # fmt: skip
        await run_in_threadpool(gen.check_fits, prompts, max_tokens)  # O(prompt)
        want_lp = body.logprobs is not None
        params = gen.params(body, max_tokens, body.logprobs or 0, want_lp and echo)
        stops, rid, created = stops_of(body), f"cmpl-{uuid.uuid4().hex}", int(time.time())
        events = gen.run(request, prompts, params, stops, echo, stream, body.skip_special_tokens)
        base = {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": state.model_name,
        }

        if stream:
            first = await _first(events)
            _raise_first(first)

            async def sse():
                async for c, delta in _chain(first, events):
                    if delta or c.finish_reason:
                        lp = None  # the first may hold the whole prompt's (echo): a thread
                        if want_lp:
                            lp = await run_in_threadpool(c.completion_logprobs, tok, True)
                        ch = {"index": c.index, "text": delta, "logprobs": lp,
                              "finish_reason": c.finish_reason}  # fmt: skip
                        yield _sse({**base, "choices": [ch]})
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse({**base, "choices": [], "usage": _usage(choices_of(first))})
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")
        done = {}
        async for c, _ in events:
            done[c.index] = c
        cs = [done[i] for i in sorted(done)]
        _raise_errors(cs)
        out = await run_in_threadpool(
            lambda: [{"index": c.index, "text": c.full_text(), "finish_reason": c.finish_reason,
                      "logprobs": c.completion_logprobs(tok) if want_lp else None} for c in cs]
        )  # fmt: skip
        return {**base, "choices": out, "usage": _usage(cs)}


# ----------------------------------------------------------------------------- chat
def add_chat_route(app: FastAPI, gen: Generation) -> None:
    """POST /v1/chat/completions."""
    state, tok = gen.state, gen.tok

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await parse_body(request, ChatRequest)
        gen.check_model(body.model)
        msgs = [{"role": m.role, "content": _content(m.content)} for m in body.messages]
        try:  # content is plain text: special-token text in it is no control token
            prompt = await run_in_threadpool(tok.apply_chat_template, msgs, content_as_text=True)
        except ValueError as e:
            raise ApiError(400, f"cannot render the chat: {e}", "invalid_request_error",
                           "messages") from None  # fmt: skip
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = max(state.max_len - len(prompt), 1)
        await run_in_threadpool(gen.check_fits, [prompt], max_tokens)
        top = (body.top_logprobs or 0) if body.logprobs else 0
        params = gen.params(body, max_tokens, top, False)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        events = gen.run(request, [prompt], params, stops_of(body), False, bool(body.stream),
                         body.skip_special_tokens)  # fmt: skip
        base = {"id": rid, "created": created, "model": state.model_name}

        if body.stream:
            first = await _first(events)
            _raise_first(first)
            chunk = {**base, "object": "chat.completion.chunk"}

            async def sse():
                role = {"index": 0, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None}  # fmt: skip
                yield _sse({**chunk, "choices": [role]})
                async for c, delta in _chain(first, events):
                    if delta or c.finish_reason:
                        lp = c.chat_logprobs(tok, delta_only=True) if body.logprobs else None
                        ch = {"index": 0, "delta": {"content": delta} if delta else {},
                              "logprobs": lp, "finish_reason": c.finish_reason}  # fmt: skip
                        yield _sse({**chunk, "choices": [ch]})
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse({**chunk, "choices": [], "usage": _usage(choices_of(first))})
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")
        seen = [item async for item in events]
        c = seen[-1][0]
        _raise_errors([c])
        msg = {"role": "assistant", "content": c.full_text()}
        ch = {"index": 0, "message": msg, "finish_reason": c.finish_reason,
              "logprobs": c.chat_logprobs(tok) if body.logprobs else None}  # fmt: skip
        return {**base, "object": "chat.completion", "choices": [ch], "usage": _usage([c])}


# ----------------------------------------------------------------------------- helpers
def _safe(fn):
    try:
        return fn()
    except ValueError:
        return None


def _prompts(prompt, tok) -> list[list[int]]:
    if isinstance(prompt, str):
        return [tok.encode(prompt)]
    if not prompt:
        raise ApiError(400, "prompt is empty", "invalid_request_error", "prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    if isinstance(prompt[0], str):
        return [tok.encode(p) for p in prompt]
    return [list(p) for p in prompt]


def _raise_errors(choices) -> None:
    for c in choices:
        if c.finish_reason == "error":
            raise ApiError(500, f"generation failed: {c.error}", "server_error")
        if c.finish_reason == "cancelled":
            raise ApiError(503, "the request was cancelled (server shutting down)", "server_error")


def _raise_first(first) -> None:
    """A single-prompt stream whose first event already failed it: an HTTP error instead."""
    if first is not None and len(choices_of(first)) == 1:
        _raise_errors([first[0]])


def _content(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, "only text content parts are supported", "invalid_request_error",
                           "messages")  # fmt: skip
        parts.append(part["text"])
    return "".join(parts)


def _usage(choices) -> dict:
    p = sum(len(c.prompt) for c in choices)
    n = sum(c.generated for c in choices)
    cached = sum(c.request.cached_tokens for c in choices)
    return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n,
            "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _first(events):
    """Waits for the first event, so that a refusal (429, 503) is an HTTP status, not a
    broken stream; returns (its item, or None when the stream is already over)."""
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None


async def _chain(first, events):
    if first is not None:
        yield first
        async for item in events:
            yield item


def choices_of(first):
    return first[0].siblings if first is not None else []


async def _watch(request: Request, engine: Engine, reqs) -> None:
    """Cancels `reqs` when the client of a non-streaming request disconnects."""
    while not all(r.finished for r in reqs):
        if await request.is_disconnected():
            for r in reqs:
                engine.cancel(r)
            return
        await asyncio.sleep(0.1)
