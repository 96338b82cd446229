"""What the decode loop carries between calls (`DecodeState`, one donated pytree) and what a
generation returns (`Generation`: tokens, finish reasons, timings)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import numpy as np

from hunyuan_jax.model.kv_cache import KVCache


class DecodeState(NamedTuple):
    """Everything the decode loop carries (one pytree, donated between calls)."""

    cache: KVCache
    tokens: jax.Array  # [B, N] int32 new tokens; column t = t-th new token
    last: jax.Array  # [B] int32 the token fed to the next step
    done: jax.Array  # [B] bool
    num_new: jax.Array  # [B] int32 new tokens of each row, its EOS included
    seen: jax.Array | None  # [B, V] bool tokens of the sequence (repetition penalty) or None
    key: jax.Array  # PRNG key
    step: jax.Array  # [] int32 number of columns of `tokens` written
    logits: jax.Array | None  # [B, N, V] float32 model logits of each new token (or None)
    eos: jax.Array  # [E] int32 ids that end a row, padded with -1 to a multiple of 8


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
