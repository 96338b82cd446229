"""The contiguous-cache reference decoder the serving engine (`hunyuan_jax.engine`) is checked
and benchmarked against; no entry point runs it (infer.py, the server, the AOT tool and RL
rollouts run the engine). KV-cached generation: batched prefill of prompts of different
lengths, then a decode loop compiled once, on the same parameter tree (`HunyuanForCausalLM`)
that training uses. Its sampler (`sample`, one SamplingConfig for the batch, top-k over exactly
k candidates) is the reference for the engine's `sampling.sample_rows`.

    gen = Generator(model, sampling=SamplingConfig(), eos_ids=[2])
    out = gen.generate([[1, 2, 3], [4, 5]], max_new_tokens=32, seed=0)
    out.tokens          # new tokens of each prompt (its EOS included when it stopped on one)

How it works
- The cache (`hunyuan_jax.model.kv_cache`) holds the roped, un-normed K/V of the KV-producing layers
  only, preallocated to `max_len` slots, in the compute dtype or int8 with per-token per-head
  scales (`cache_dtype="int8"`). A row's token at position p sits in slot p.
- Prefill: prompts are right-padded into one [B, S] batch and run through the model in chunks
  of `prefill_chunk` tokens (bounding the [B, chunk, vocab] logits); each row's next-token
  logits are taken at its own last prompt position and its `cache.index` set to its length.
  Padded slots hold garbage, but the mask is `slot <= position`, so a row's slot p is rewritten
  by its decode step at position p before any query can see it.
- Decode: one `lax.while_loop` (each iteration = one token for every row) that stops when every
  row has produced an EOS id or `max_new_tokens`; rows that finished keep running but their
  tokens are discarded. Its trip count is a runtime argument, so the same executable serves a
  whole generation in one call or streaming (one call per token); the state, cache included,
  is donated between calls. On TPU (`decode_loop='auto'`) a one-token executable is called per
  step instead: the while loop carries the weights and XLA keeps a second, re-laid-out copy
  of the stacked experts (the AOT tool's figure for the A52B: docs/performance.md).
- Every program is compiled ahead of time once per argument layout (`Generator.compiles`
  counts them).
- On a mesh: the model's sharding plan places the cache (`KVCache.LOGICAL_AXES`) and the
  per-row arrays (`cache_batch`); the batch is padded with idle rows up to a multiple of the
  cache batch's shards.

Loading a checkpoint for decoding is `hunyuan_jax.decode.from_checkpoint.load`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hunyuan_jax.decode.sampling import SamplingConfig, apply_repetition_penalty, top_p_mask
from hunyuan_jax.decode.state import Generation, check_prompts
from hunyuan_jax.model.config import ModelConfig
from hunyuan_jax.model.kv_cache import CACHE_DTYPES, KVCache, cache_shardings
from hunyuan_jax.model.transformer import HunyuanForCausalLM

_NEG_INF = float(jnp.finfo(jnp.float32).min)
DECODE_LOOPS = ("auto", "device", "host")
PROGRAMS = ("prefill", "start", "decode")


StreamFn = Callable[[int, np.ndarray, np.ndarray], None]


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


def sample(
    logits: jax.Array, key: jax.Array, cfg: SamplingConfig, seen: jax.Array | None = None
) -> jax.Array:
    """logits [B, V] -> token ids [B] int32. `key` is one PRNG key; row b draws with
    fold_in(key, b), so a row's draw does not depend on the other rows' logits.
    `seen` [B, V] bool marks the tokens the repetition penalty applies to (None: off).

    With top_k > 0 the draw (and top-p) works on the k candidates from `lax.top_k` only, with
    no full-vocabulary sort: the same distribution as masking the full vocabulary except that
    ties at the k-th logit keep exactly k tokens (HF keeps every tied token)."""
    scores = logits.astype(jnp.float32)
    if seen is not None:
        scores = apply_repetition_penalty(scores, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return jnp.argmax(scores, axis=-1).astype(jnp.int32)
    scores = scores / cfg.temperature
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(scores.shape[0]))
    if cfg.top_k and cfg.top_k < scores.shape[-1]:
        vals, idx = jax.lax.top_k(scores, cfg.top_k)  # sorted, most likely first
        if cfg.top_p < 1.0:
            probs = jax.nn.softmax(vals, axis=-1)
            vals = jnp.where(jnp.cumsum(probs, axis=-1) - probs < cfg.top_p, vals, _NEG_INF)
        choice = jax.vmap(jax.random.categorical)(keys, vals)
        return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    if cfg.top_p < 1.0:
        scores = jnp.where(top_p_mask(scores, cfg.top_p), scores, _NEG_INF)
    return jax.vmap(jax.random.categorical)(keys, scores).astype(jnp.int32)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class Generator:
    """Compiled prefill + decode for one model, sampling configuration and cache dtype.

    model: a `HunyuanForCausalLM`, placed by its own sharding plan (or abstract, from
      `state.abstract_model`, to `lower` programs only). eos_ids: ids that end a row.
    vocab_limit: ids >= this are never produced (e.g. the tokenizer's size when the model's
      vocabulary is padded beyond it). prefill_chunk: tokens per prefill call (bounds the
      [B, chunk, V] float32 logits the model returns). record_logits: keep the model's logits
      of every new token (tests; [B, max_len, V] float32 of memory).
    decode_loop: 'device' runs the decode steps in one `lax.while_loop` per call; 'host' calls a
      one-token executable per step; 'auto' picks 'host' on TPU, else 'device'.
    experts_fn: overrides the MoE dispatch (`dispatch.experts_fn_for`) for every call (tests).
    """

    def __init__(
        self,
        model: HunyuanForCausalLM,
        *,
        sampling: SamplingConfig | None = None,
        eos_ids: Sequence[int] = (),
        cache_dtype: str | None = None,
        vocab_limit: int | None = None,
        prefill_chunk: int = 512,
        record_logits: bool = False,
        decode_loop: str = "auto",
        experts_fn: Any = None,
    ):
        self.cfg: ModelConfig = model.cfg
        self.plan = model.plan
        self.sampling = sampling or SamplingConfig()
        self.eos_ids = self._check_eos(eos_ids)
        vocab = self.cfg.vocab_size
        self.vocab_limit = None if vocab_limit is None or vocab_limit >= vocab else int(vocab_limit)
        if cache_dtype in (None, "auto"):
            cache_dtype = model.policy.compute_dtype
        if cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache dtype must be one of {CACHE_DTYPES}, got {cache_dtype!r}")
        self.cache_dtype = cache_dtype
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be positive, got {prefill_chunk}")
        self.prefill_chunk = int(prefill_chunk)
        self.record_logits = bool(record_logits)
        self.experts_fn = experts_fn
        if decode_loop not in DECODE_LOOPS:
            raise ValueError(f"decode_loop must be one of {DECODE_LOOPS}, got {decode_loop!r}")
        if decode_loop == "auto":  # the platform of the devices the model lives on
            decode_loop = "host" if self.plan.platform == "tpu" else "device"
        self.decode_loop = decode_loop
        self.graphdef, self.params = nnx.split(model)
        self.compiles: dict[str, int] = dict.fromkeys(PROGRAMS, 0)
        self._executables: dict[Any, Any] = {}

    # ------------------------------------------------------------------ compiled pieces
    def _model(self, params):
        return nnx.merge(self.graphdef, params)

    def _pin(self, cache: KVCache) -> KVCache:
        if not self.plan.is_sharded:
            return cache
        return jax.lax.with_sharding_constraint(cache, cache_shardings(cache, self.plan))

    def _pin_batch(self, x):
        if not self.plan.is_sharded or x is None:
            return x
        return jax.lax.with_sharding_constraint(x, self._batch_sharding(x.ndim))

    def _batch_sharding(self, ndim: int):
        spec = self.plan.spec(("cache_batch",) + (None,) * (ndim - 1))
        return jax.sharding.NamedSharding(self.plan.mesh, spec)

    def _pin_state(self, s: DecodeState) -> DecodeState:
        """Fixes the layout of the decode state (cache as the plan says, per-row arrays over the
        batch axes), so that every call's output matches the executable's input layout."""
        if not self.plan.is_sharded:
            return s
        pin = self._pin_batch
        rep = lambda x: jax.lax.with_sharding_constraint(x, self.plan.replicated())
        return DecodeState(
            self._pin(s.cache),
            pin(s.tokens),
            pin(s.last),
            pin(s.done),
            pin(s.num_new),
            pin(s.seen),
            rep(s.key),
            rep(s.step),
            pin(s.logits),
            rep(s.eos),
        )

    def _forward(self, params, tokens, cache, phase):
        return self._model(params)(tokens, cache=cache, phase=phase, experts_fn=self.experts_fn)

    def _prefill_fn(self, params, tokens, start, cache, lengths, last_logits):
        """One chunk: tokens [B, C] at positions start..start+C-1 of every row."""
        b, c = tokens.shape
        cache = cache._replace(index=jnp.full((b,), start, jnp.int32))
        logits, _, cache = self._forward(params, tokens, cache, "prefill")
        offset = lengths - 1 - start  # row's last prompt position within this chunk
        idx = jnp.clip(offset, 0, c - 1)[:, None, None]
        picked = jnp.take_along_axis(logits, idx, axis=1)[:, 0]
        in_chunk = (offset >= 0) & (offset < c)
        return self._pin(cache), self._pin_batch(jnp.where(in_chunk[:, None], picked, last_logits))

    def _pick(self, logits, key, step, seen):
        if self.vocab_limit is not None:
            ids = jnp.arange(logits.shape[-1])
            logits = jnp.where(ids < self.vocab_limit, logits, _NEG_INF)
        return sample(logits, jax.random.fold_in(key, step), self.sampling, seen)

    def _check_eos(self, eos_ids) -> tuple[int, ...]:
        eos_ids = tuple(int(e) for e in eos_ids)
        vocab = self.cfg.vocab_size
        bad = [e for e in eos_ids if not 0 <= e < vocab]
        if bad:
            raise ValueError(f"eos ids {bad} are outside the model's vocabulary [0, {vocab})")
        return eos_ids

    @staticmethod
    def _finished(tok, eos):
        return jnp.any(tok[:, None] == eos[None, :], axis=-1)

    def _start_fn(
        self, last_logits, lengths, prompts, active, key, cache, max_new_tokens, buffer, eos
    ):
        """First new token from the prefill logits; the decode loop's initial state."""
        b = lengths.shape[0]
        seen = None
        if self.sampling.repetition_penalty != 1.0:
            valid = jnp.arange(prompts.shape[1])[None, :] < lengths[:, None]
            rows = jnp.broadcast_to(jnp.arange(b)[:, None], prompts.shape)
            counts = jnp.zeros((b, self.cfg.vocab_size), jnp.int32)
            seen = counts.at[rows, prompts].add(valid.astype(jnp.int32)) > 0
        tok = self._pick(last_logits, key, 0, seen)
        if seen is not None:
            seen = seen.at[jnp.arange(b), tok].set(True)
        tokens = jnp.zeros((b, buffer.shape[0]), jnp.int32).at[:, 0].set(tok)
        done = ~active | self._finished(tok, eos) | (max_new_tokens <= 1)
        cache = self._pin(cache._replace(index=lengths.astype(jnp.int32)))
        logits = None
        if self.record_logits:
            logits = jnp.zeros((b, buffer.shape[0], last_logits.shape[-1]), jnp.float32)
            logits = logits.at[:, 0].set(last_logits)
        one = jnp.ones((), jnp.int32)
        return self._pin_state(
            DecodeState(
                cache, tokens, tok, done, active.astype(jnp.int32), seen, key, one, logits, eos
            )
        )

    def _decode_fn(self, params, state: DecodeState, num_steps, max_new_tokens):
        """Up to `num_steps` tokens per row (fewer when every row is done)."""
        stop = jnp.minimum(state.step + num_steps, max_new_tokens)
        b = state.last.shape[0]

        def cond(s):
            return (s.step < stop) & ~jnp.all(s.done)

        def body(s):
            logits, _, cache = self._forward(params, s.last[:, None], s.cache, "decode")
            tok = self._pick(logits[:, 0], s.key, s.step, s.seen)
            seen = s.seen
            if seen is not None:
                seen = seen.at[jnp.arange(b), tok].max(~s.done)
            tokens = jax.lax.dynamic_update_slice(s.tokens, tok[:, None], (0, s.step))
            num_new = s.num_new + (~s.done).astype(jnp.int32)
            done = s.done | self._finished(tok, s.eos) | (s.step + 1 >= max_new_tokens)
            recorded = s.logits
            if recorded is not None:
                recorded = jax.lax.dynamic_update_slice(recorded, logits, (0, s.step, 0))
            return self._pin_state(
                DecodeState(
                    cache, tokens, tok, done, num_new, seen, s.key, s.step + 1, recorded, s.eos
                )
            )

        if self.decode_loop == "host":  # one token per call: no weights carried by a loop
            return body(state)
        return self._pin_state(jax.lax.while_loop(cond, body, state))

    _FNS = {
        "prefill": ("_prefill_fn", (3, 5)),
        "start": ("_start_fn", (5,)),
        "decode": ("_decode_fn", (1,)),
    }

    def _executable(self, name: str, args) -> tuple[Any, float]:
        """An ahead-of-time executable of program `name` for concrete `args`, compiled once per
        argument layout (tree, shapes, dtypes, shardings); also the seconds compiling took."""
        leaves, tree = jax.tree.flatten(args)
        sig = (name, tree, tuple((np.shape(x), str(x.dtype), _sharding_key(x)) for x in leaves))
        exe = self._executables.get(sig)
        if exe is not None:
            return exe, 0.0
        t0 = time.perf_counter()
        exe = self._jit(name).lower(*args).compile()
        self._executables[sig] = exe
        self.compiles[name] += 1
        return exe, time.perf_counter() - t0

    def _jit(self, name: str):
        fn, donate = self._FNS[name]
        return jax.jit(getattr(self, fn), donate_argnums=donate)

    # ------------------------------------------------------------------ arguments
    def _put_batch(self, x: np.ndarray):
        """Host array with a leading batch dim -> device array sharded like the cache batch."""
        if not self.plan.is_sharded:
            return jnp.asarray(x)
        return jax.device_put(x, self._batch_sharding(x.ndim))

    def _put_replicated(self, x):
        return jax.device_put(x, self.plan.replicated()) if self.plan.is_sharded else x

    def batch_multiple(self) -> int:
        """Batches are padded to a multiple of the cache batch's shards."""
        return self.plan.size("cache_batch")

    # ------------------------------------------------------------------ public API
    def check_prompts(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, max_len: int | None
    ) -> int:
        """Validates prompts and sizes (`state.check_prompts`); returns the cache length."""
        if max_len is None and prompts and isinstance(max_new_tokens, (int, np.integer)):
            max_len = _round_up(max(len(p) for p in prompts) + max(int(max_new_tokens), 1), 64)
        check_prompts(prompts, max_new_tokens, max_len or 1, self.cfg.vocab_size)
        return max_len

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        seed: int = 0,
        max_len: int | None = None,
        stream: StreamFn | None = None,
        stream_every: int = 1,
        eos_ids: Sequence[int] | None = None,
    ) -> Generation:
        """Decode every prompt (token id lists of any lengths) in one batch.

        max_len: cache slots (default: longest prompt + max_new_tokens rounded up to 64).
        stream(step, tokens [n], live [n]): called for each new token of the batch, in order,
          `live` marking the rows for which tokens[i] is a real new token (the decode runs
          `stream_every` tokens per call); without it the whole decode is one call.
        eos_ids: this call's stop ids (default: the Generator's); no recompile for up to 8.
        """
        eos_ids = self.eos_ids if eos_ids is None else self._check_eos(eos_ids)
        eos_np = np.full((_round_up(max(len(eos_ids), 1), 8),), -1, np.int32)
        eos_np[: len(eos_ids)] = eos_ids
        max_len = self.check_prompts(prompts, max_new_tokens, max_len)
        n = len(prompts)
        b = _round_up(n, self.batch_multiple())
        lengths_np = np.ones((b,), np.int32)  # idle padding rows: one token, done at once
        lengths_np[:n] = [len(p) for p in prompts]
        longest = int(lengths_np.max())
        chunk = min(self.prefill_chunk, _round_up(longest, 16))
        padded = _round_up(longest, chunk)
        slots = max(max_len, padded)  # a chunk never writes past the cache end
        tokens_np = np.zeros((b, padded), np.int32)
        for i, p in enumerate(prompts):
            tokens_np[i, : len(p)] = p
        active_np = np.arange(b) < n

        cache = KVCache.zeros(self.cfg, b, slots, self.cache_dtype)
        if self.plan.is_sharded:
            cache = jax.device_put(cache, cache_shardings(cache, self.plan))
        key = self._put_replicated(jax.random.key(seed))
        lengths = self._put_batch(lengths_np)
        active = self._put_batch(active_np)
        prompts_dev = self._put_batch(tokens_np)
        chunks = [self._put_batch(tokens_np[:, s : s + chunk]) for s in range(0, padded, chunk)]
        last_logits = self._put_batch(np.zeros((b, self.cfg.vocab_size), np.float32))
        max_new = np.int32(max_new_tokens)
        buffer = np.zeros((slots,), bool)  # only its shape matters: the token buffer's width
        eos = self._put_replicated(eos_np)

        # Compile before timing (prefill and start from the first chunk's arguments).
        prefill, c0 = self._executable(
            "prefill", (self.params, chunks[0], np.int32(0), cache, lengths, last_logits)
        )
        start_args = (last_logits, lengths, prompts_dev, active, key, cache, max_new, buffer, eos)
        start, c1 = self._executable("start", start_args)
        compile_s = c0 + c1

        t0 = time.perf_counter()
        for i, toks in enumerate(chunks):
            cache, last_logits = prefill(
                self.params, toks, np.int32(i * chunk), cache, lengths, last_logits
            )
        state = start(last_logits, lengths, prompts_dev, active, key, cache, max_new, buffer, eos)
        first = np.asarray(state.last)
        t1 = time.perf_counter()
        if stream is not None:
            stream(0, first[:n], active_np[:n])

        every = np.int32(max_new_tokens if stream is None else max(int(stream_every), 1))
        if self.decode_loop == "host":
            every = np.int32(1)
        decode_s = 0.0
        done = bool(np.asarray(state.done).all())
        while not done:
            decode, c = self._executable("decode", (self.params, state, every, max_new))
            compile_s += c
            step_before = int(state.step)
            t_call = time.perf_counter()
            state = decode(self.params, state, every, max_new)
            step = int(state.step)  # waits for the call
            decode_s += time.perf_counter() - t_call
            done = bool(np.asarray(state.done).all()) or step >= max_new_tokens
            if stream is not None:
                cols = np.asarray(state.tokens[:, step_before:step])
                num_new = np.asarray(state.num_new)
                for j in range(cols.shape[1]):  # column c is a real token of rows c < num_new
                    stream(step_before + j, cols[:n, j], (num_new > step_before + j)[:n])

        tokens = np.asarray(state.tokens)
        num_new = np.asarray(state.num_new)
        out, reasons = [], []
        eos_set = set(eos_ids)
        for i in range(n):
            row = tokens[i, : num_new[i]].tolist()
            out.append(row)
            reasons.append("eos" if row and row[-1] in eos_set else "length")
        logits = None
        if state.logits is not None:
            recorded = np.asarray(state.logits)
            logits = [recorded[i, : num_new[i]] for i in range(n)]
        return Generation(
            out, reasons, int(lengths_np[:n].sum()), t1 - t0, decode_s, compile_s, logits
        )


def _sharding_key(x):
    """A hashable sharding identity in which equivalent specs (P('data') and P('data', None))
    are equal."""
    sh = getattr(x, "sharding", None)
    if isinstance(sh, jax.sharding.NamedSharding):
        spec = list(sh.spec)
        while spec and spec[-1] is None:
            spec.pop()
        return ("named", sh.mesh, tuple(spec), sh.memory_kind)
    return sh
