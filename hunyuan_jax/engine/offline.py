"""Offline generation on the serving engine: a list of prompts in, their completions out, on
the same programs and scheduler the server runs (infer.py, the smoke run, RL rollouts).

    gen = OfflineGenerator(model, sampling=SamplingConfig(), eos_ids=[2])
    out = gen.generate([[1, 2, 3], [4, 5]], max_new_tokens=32, seed=0)
    out.tokens          # new tokens of each prompt (its EOS included when it stopped on one)

Every prompt is one request: request i samples with its own key (from `seed` and i), so its
tokens do not depend on the other prompts; each new token comes with its log-probability under
the model (`out.logprobs`). Repeats of one prompt (RL groups: G completions each) compute its
full pages once: the scheduler holds a request back while another is still computing a page it
shares, then it takes the page from the prefix cache. `set_params(state)` points every engine at new arrays of the
same tree (the weights a train step just updated: rollouts on the trained arrays, no copy). The engine is sized per call (rows = prompts up to
`max_seqs`, a page pool that holds every request at once unless `pool_tokens` says less) and
built lazily: only the step programs a call meets are compiled, once per engine shape.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from hunyuan_jax.decode.sampling import SamplingConfig
from hunyuan_jax.decode.state import Generation, check_prompts
from hunyuan_jax.engine.core import EngineCore
from hunyuan_jax.engine.requests import GenParams, Request
from hunyuan_jax.engine.scheduler import Engine

# stream(i, token, done): request i produced `token` (None when it finished without one)
TokenFn = Callable[[int, int | None, bool], None]


def request_seed(seed: int, i: int) -> int:
    """Request i's 64-bit sampling seed from the run's seed."""
    state = np.random.SeedSequence([int(seed) & (2**63 - 1), i]).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


class OfflineGenerator:
    """Engines for one model, sampling configuration and cache dtype, reused across calls of
    the same shape (rows, longest sequence, pool)."""

    def __init__(
        self,
        model,
        *,
        sampling: SamplingConfig | None = None,
        eos_ids: Sequence[int] = (),
        cache_dtype: str | None = None,
        vocab_limit: int | None = None,
        page_size: int = 16,
        token_budget: int = 512,
        max_seqs: int = 64,
        pool_tokens: int | None = None,
    ):
        self.model = model
        self.sampling = sampling or SamplingConfig()
        vocab = model.cfg.vocab_size
        bad = [int(e) for e in eos_ids if not 0 <= int(e) < vocab]
        if bad:
            raise ValueError(f"eos ids {bad} are outside the model's vocabulary [0, {vocab})")
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self.cache_dtype = cache_dtype
        self.vocab_limit = vocab_limit
        self.page_size, self.token_budget, self.max_seqs = page_size, token_budget, max_seqs
        self.pool_tokens = pool_tokens
        self._cores: dict[tuple, EngineCore] = {}
        self._params = None  # set_params: the arrays every engine runs on
        self.cached_tokens = 0  # prompt tokens the last call took from the prefix cache

    def set_params(self, params) -> None:
        """Every engine (built and to be built) runs on `params` from now on (an nnx.State of
        the model's tree: `EngineCore.set_params`)."""
        for core in self._cores.values():
            core.set_params(params)
        self._params = params

    def check_prompts(self, prompts, max_new_tokens: int, max_len: int) -> None:
        """ValueError naming the first problem (`decode.state.check_prompts`)."""
        check_prompts(prompts, max_new_tokens, max_len, self.model.cfg.vocab_size)

    def core_for(self, prompts, max_new_tokens: int, max_len: int | None = None) -> EngineCore:
        """The engine shape a call needs (built once per shape, its programs compiled lazily)."""
        longest = max(len(p) for p in prompts) + max_new_tokens
        max_len = max_len or -(-longest // 64) * 64
        rows = min(len(prompts), self.max_seqs)
        rows = -(-rows // 8) * 8
        pages_each = math.ceil(max_len / self.page_size)
        num_pages = rows * pages_each + 1
        if self.pool_tokens is not None:
            num_pages = max(math.ceil(self.pool_tokens / self.page_size), pages_each) + 1
        key = (rows, max_len, num_pages)
        if key not in self._cores:
            self._cores[key] = EngineCore(
                self.model, max_seqs=rows, max_len=max_len, page_size=self.page_size,
                num_pages=num_pages, token_budget=self.token_budget,
                cache_dtype=self.cache_dtype, vocab_limit=self.vocab_limit, lazy=True,
            )  # fmt: skip
            if self._params is not None:
                self._cores[key].set_params(self._params)
        return self._cores[key]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        seed: int = 0,
        max_len: int | None = None,
        stream: TokenFn | None = None,
        eos_ids: Sequence[int] | None = None,
    ) -> Generation:
        """Generates for every prompt (token id lists of any lengths). max_len: the longest
        sequence (default: longest prompt + max_new_tokens rounded up to 64). stream: called
        on the engine loop for every new token."""
        longest = max((len(p) for p in prompts), default=0)
        if max_len is None and isinstance(max_new_tokens, int) and max_new_tokens > 0:
            max_len = -(-(longest + max_new_tokens) // 64) * 64
        self.check_prompts(prompts, max_new_tokens, max_len or 1)
        core = self.core_for(prompts, max_new_tokens, max_len)
        compiled_before = core.compile_seconds
        eos = self.eos_ids if eos_ids is None else tuple(int(e) for e in eos_ids)
        engine = Engine(core, eos_ids=eos, max_queue=len(prompts), log=lambda m: None)
        s = self.sampling
        tokens: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        reasons: list[str | None] = [None] * len(prompts)
        first_at: list[tuple[float, float]] = []  # (time, compile seconds so far)

        def sink(i):
            def f(ev):
                if ev.kind == "token":
                    if not tokens[i]:
                        first_at.append((time.perf_counter(), core.compile_seconds))
                    tokens[i].append(ev.token)
                    logprobs[i].append(ev.logprob)
                    if stream is not None:
                        stream(i, ev.token, False)
                elif ev.kind == "done":
                    reasons[i] = "eos" if ev.finish_reason == "stop" else ev.finish_reason
                    if stream is not None:
                        stream(i, None, True)

            return f

        t0 = time.perf_counter()
        reqs = []
        for i, p in enumerate(prompts):
            params = GenParams(
                max_tokens=int(max_new_tokens), temperature=s.temperature, top_k=s.top_k,
                top_p=s.top_p, repetition_penalty=s.repetition_penalty,
                seed=request_seed(seed, i),
            )  # fmt: skip
            reqs.append(Request(list(p), params, sink(i)))
            engine.submit(reqs[-1])
        engine.run_until_idle()
        self.cached_tokens = sum(r.cached_tokens for r in reqs)
        t1 = time.perf_counter()
        failed = [i for i, r in enumerate(reasons) if r not in ("eos", "length")]
        if failed:
            raise RuntimeError(f"prompt {failed[0]} did not finish ({reasons[failed[0]]})")
        compile_s = core.compile_seconds - compiled_before
        prefill_end, compiled = max(first_at) if first_at else (t1, core.compile_seconds)
        in_prefill = compiled - compiled_before  # compiles before the last first token
        return Generation(
            tokens,
            [str(r) for r in reasons],
            sum(len(p) for p in prompts),
            prefill_end - t0 - in_prefill,
            t1 - prefill_end - (compile_s - in_prefill),
            compile_s,
            logprobs=logprobs,
        )
