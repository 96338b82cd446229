"""What a client hands the engine (`Request`: prompt ids, `GenParams`, a sink for `Event`s), the
checks a request passes before it is queued (`check_request`, `settings_problem`), the
engine's refusals (`QueueFull`, `EngineStopped`) and a request in flight (`InFlight`)."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np


class QueueFull(Exception):
    """The waiting queue holds `max_queue` requests already."""


class EngineStopped(Exception):
    """The engine is shutting down (or has failed) and takes no requests."""


@dataclasses.dataclass
class GenParams:
    """One request's generation settings (validated by the caller)."""

    max_tokens: int = 16  # 0 = score the prompt only (echo + logprobs)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    top_logprobs: int = 0  # alternatives wanted per generated token
    prompt_logprobs: bool = False  # log-probabilities of the prompt tokens (echo)
    ignore_eos: bool = False  # keep going after an EOS id (benchmarks, tests)


@dataclasses.dataclass
class Event:
    """kind 'token': one new token (token, logprob, top = [(id, logprob)]); 'prompt': the
    prompt's log-probabilities (prompt_logprobs: per position, None for the first); 'done':
    finished (finish_reason 'stop' | 'length' | 'cancelled' | 'error', error message)."""

    kind: str
    token: int = -1
    logprob: float = 0.0
    top: list | None = None
    prompt_logprobs: list | None = None
    finish_reason: str | None = None
    error: str | None = None
    eos: bool = False  # a 'token' that is an EOS id (no text)


def key_data(seed: int) -> np.ndarray:
    """[2] uint32 data of `jax.random.key(seed)` (threefry), computed on the host."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


class Request:
    """A prompt (token ids), its settings and where its events go. `cached_tokens`: prompt
    tokens served from the prefix cache (OpenAI's usage.prompt_tokens_details)."""

    _ids = iter(range(1 << 62))

    def __init__(self, prompt: list[int], params: GenParams, sink: Callable[[Event], None]):
        self.id = next(Request._ids)
        self.prompt = [int(t) for t in prompt]
        self.params = params
        self.sink = sink
        self.cancelled = threading.Event()
        self.finished = False
        self.t_submit = time.perf_counter()
        self.t_last: float | None = None
        self.generated = 0
        self.cached_tokens = 0
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        self.key = key_data(seed)
        self.prompt_lps: list = [None]


def check_request(
    prompt: Sequence[int], max_tokens: int, max_len: int, vocab: int, pool_tokens: int | None = None
) -> str | None:
    """Why a request cannot be served (a message naming the numbers), or None. pool_tokens:
    what the whole KV page pool holds (a longer sequence could never be admitted)."""
    if not prompt:
        return "the prompt is empty (at least one token is needed)"
    if max_tokens < 0:  # 0: score the prompt only (echo)
        return f"max_tokens must be >= 0, got {max_tokens}"
    if len(prompt) + max_tokens > max_len:
        return (
            f"this model's maximum context length is {max_len} tokens; the prompt has "
            f"{len(prompt)} tokens and max_tokens is {max_tokens} ({len(prompt) + max_tokens} "
            f"in all): lower max_tokens to at most {max(max_len - len(prompt), 0)} or shorten "
            f"the prompt"
        )
    if pool_tokens is not None and len(prompt) + max_tokens > pool_tokens:
        return (
            f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) needs more KV "
            f"cache than the server's whole page pool holds ({pool_tokens} tokens)"
        )
    bad = [t for t in prompt if not 0 <= int(t) < vocab]
    if bad:
        return f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})"
    return None


def settings_problem(p: GenParams) -> str | None:
    """Why a request's sampling settings cannot go into the programs' arrays (int32 top_k,
    float32 temperature / top_p / repetition_penalty: finite and in range), or None."""
    try:
        np.array([p.top_k], np.int32)  # numpy refuses an int past int32
        t, tp, r = (float(np.float32(x)) for x in (p.temperature, p.top_p, p.repetition_penalty))
    except (OverflowError, ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    if not (np.isfinite([t, tp, r]).all() and t >= 0 and 0 < tp <= 1 and r > 0):
        return (
            f"temperature {t}, top_p {tp}, repetition_penalty {r} as float32: need finite "
            f"temperature >= 0, 0 < top_p <= 1, repetition_penalty > 0"
        )
    return None


@dataclasses.dataclass
class InFlight:
    """A request in the engine: its tokens (prompt + sampled), its row, pages and how many of
    its tokens are in the cache (`scheduler.Engine`)."""

    req: Request
    tokens: list[int]  # prompt + sampled tokens
    row: int = -1
    pages: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0  # tokens whose K/V is in the cache
    fresh: bool = True  # its row's seen-token set must start empty
    lp_done: int = 0  # prompt positions whose log-probabilities were recorded

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.computed
