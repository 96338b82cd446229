"""Next-token selection: greedy, temperature, top-k, top-p (nucleus) and repetition penalty.

The order of operations is that of Hugging Face `generate` (which produced the reference
outputs): repetition penalty on the raw logits, then temperature, then top-k, then top-p, then
a categorical draw. `SamplingConfig` is a request's (or a run's) settings, frozen and hashable;
`sample_rows` is the engine's one sampler, every setting an array over the rows, so one
compiled program serves rows with different settings.

Defaults come from a checkpoint's `generation_config.json`
(`SamplingConfig.from_generation_config`); without one, decoding is greedy.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

_NEG_INF = float(jnp.finfo(jnp.float32).min)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick each token.

    temperature: 0 means greedy (argmax; top-k/top-p are then irrelevant), else > 0.
    top_k: keep the k most likely tokens (0 = off). top_p: keep the smallest set of most likely
    tokens whose probability reaches p (1.0 = off; in (0, 1]). repetition_penalty: divide the
    positive logits (multiply the negative ones) of every token already in the sequence, prompt
    included (1.0 = off; > 0).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"sampling {name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise TypeError(f"sampling top_k must be an integer, got {self.top_k!r}")
        if not (self.temperature >= 0.0 and self.temperature != float("inf")):
            raise ValueError(
                f"temperature must be >= 0 and finite (0 = greedy), got {self.temperature}"
            )
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not (self.repetition_penalty > 0.0 and self.repetition_penalty != float("inf")):
            raise ValueError(
                f"repetition_penalty must be > 0 and finite (1 = off), "
                f"got {self.repetition_penalty}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def replace(self, **changes) -> SamplingConfig:
        """A copy with `changes`; None values are ignored (convenient for CLI flags)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_generation_config(cls, source: str | Path | Mapping[str, Any]) -> SamplingConfig:
        """From a HF `generation_config.json` (path, or its parsed dict). `do_sample: false`
        (or absent, HF's default) means greedy whatever the other fields say."""
        gen = _read_json(source) if not isinstance(source, Mapping) else source
        if not gen.get("do_sample", False):
            return cls(repetition_penalty=float(gen.get("repetition_penalty", 1.0)))
        return cls(
            temperature=float(gen.get("temperature", 1.0)),
            top_k=int(gen.get("top_k", 0) or 0),
            top_p=float(gen.get("top_p", 1.0)),
            repetition_penalty=float(gen.get("repetition_penalty", 1.0)),
        )


def eos_ids_from_generation_config(source: str | Path | Mapping[str, Any]) -> list[int] | None:
    """`eos_token_id` (an int or a list) of a generation_config.json, or None if absent."""
    gen = _read_json(source) if not isinstance(source, Mapping) else source
    eos = gen.get("eos_token_id")
    if eos is None:
        return None
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


# ----------------------------------------------------------------------------- logits processors
def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """HF rule: for every token with seen[b, t], logit / penalty if > 0 else logit * penalty."""
    if penalty == 1.0:
        return logits
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
    """True for the smallest set of most likely tokens whose probability reaches p: a token is
    kept when the probability of the tokens strictly more likely than it is below p (so the
    most likely token always is). Same set as HF's TopPLogitsWarper up to ties."""
    if p >= 1.0:
        return jnp.ones(logits.shape, bool)
    order = jnp.argsort(-logits, axis=-1, stable=True)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumulative probability
    keep_sorted = before < p
    inverse = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(keep_sorted, inverse, axis=-1)


# ----------------------------------------------------------------------------- per-row parameters
def sample_rows(
    logits: jax.Array,
    keys: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    repetition_penalty: jax.Array,
    seen: jax.Array,
) -> jax.Array:
    """`sample` with every parameter an array over the rows, so one compiled program serves
    rows with different settings (the server's decode slots). logits [B, V]; keys [B] PRNG
    keys (row b draws with keys[b]); temperature [B] (0 = greedy: argmax, exact), top_k [B]
    int32 (0 = off), top_p [B] (1 = off), repetition_penalty [B] (1 = off); seen [B, V] bool.
    Same order of operations as `sample` (penalty, temperature, top-k, top-p, draw); top-k and
    top-p work on one full-vocabulary sort (ties at the k-th logit are all kept, as HF does).
    Returns token ids [B] int32."""
    scores = logits.astype(jnp.float32)
    penalty = repetition_penalty[:, None]
    penalised = jnp.where(scores > 0, scores / penalty, scores * penalty)
    scores = jnp.where(seen & (penalty != 1.0), penalised, scores)
    greedy_tok = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    greedy = temperature <= 0.0
    vocab = scores.shape[-1]

    def draw():
        scaled = scores / jnp.where(greedy, 1.0, temperature)[:, None]
        k = jnp.where((top_k <= 0) | (top_k > vocab), vocab, top_k)[:, None]

        def truncated():  # one full sort serves top-k and top-p
            sorted_desc = -jnp.sort(-scaled, axis=-1)
            in_k = jnp.arange(vocab)[None, :] < k
            probs = jax.nn.softmax(jnp.where(in_k, sorted_desc, _NEG_INF), axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumulative probability
            keep = in_k & ((before < top_p[:, None]) | (top_p[:, None] >= 1.0))
            # the smallest kept logit of each row: every token at or above it is kept
            threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
            return jnp.where(scaled >= threshold, scaled, _NEG_INF)

        needs_sort = jnp.any(~greedy & ((k[:, 0] < vocab) | (top_p < 1.0)))
        masked = jax.lax.cond(needs_sort, truncated, lambda: scaled)
        drawn = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
        return jnp.where(greedy, greedy_tok, drawn)

    # all-greedy batches (the common case of evaluation traffic) skip the sort and the draw
    return jax.lax.cond(jnp.all(greedy), lambda: greedy_tok, draw)
