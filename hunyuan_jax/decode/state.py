"""What a generation returns (`Generation`: tokens, finish reasons, timings) and the checks a
batch of prompts passes before it is decoded (`check_prompts`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass
class Generation:
    """Result of `Generator.generate` (lists in prompt order)."""

    tokens: list[list[int]]  # new tokens of each prompt, EOS included if it stopped on one
    finish_reasons: list[str]  # 'eos' or 'length'
    prompt_tokens: int  # real prompt tokens (no padding)
    prefill_seconds: float  # prefill and first-token sampling, compile excluded
    decode_seconds: float  # the decode loop, compile excluded
    compile_seconds: float  # ahead-of-time compiles this call needed (0 when all cached)
    logits: list[np.ndarray] | None = None  # with record_logits: [new tokens, V] per prompt
    # the engine's log-probability of each new token under the model (temperature 1, before
    # top-k / top-p; `engine.offline.OfflineGenerator` fills it): RL rollouts' old log-probs
    logprobs: list[list[float]] | None = None

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / max(self.prefill_seconds, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced by the decode loop (the first new token of each row comes from the
        prefill) per second of the loop."""
        n = sum(max(len(t) - 1, 0) for t in self.tokens)
        return n / max(self.decode_seconds, 1e-9)


def check_prompts(
    prompts: Sequence[Sequence[int]], max_new_tokens: int, max_len: int, vocab: int
) -> None:
    """ValueError naming what is wrong: no prompts, an empty one, an id outside [0, vocab),
    max_new_tokens not a positive integer, a prompt (plus max_new_tokens) past max_len."""
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, (int, np.integer))
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not prompts:
        raise ValueError("no prompts to decode")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty (at least one token is needed)")
        lo, hi = min(p), max(p)
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"prompt {i} has token id {hi if hi >= vocab else lo} outside "
                f"the model's vocabulary [0, {vocab})"
            )
    longest = max(len(p) for p in prompts)
    if longest > max_len:
        raise ValueError(
            f"a prompt of {longest} tokens is longer than the KV cache "
            f"({max_len} slots); shorten it or use a longer cache"
        )
    if longest + max_new_tokens > max_len:
        raise ValueError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} needs "
            f"{longest + max_new_tokens} cache slots, more than the KV cache's {max_len}; "
            f"lower max_new_tokens to at most {max_len - longest} or use a longer cache"
        )
