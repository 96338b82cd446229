"""KV-cached generation: batched prefill of prompts of different lengths, then a decode loop
compiled once, on the same parameter tree (`HunyuanForCausalLM`) that training uses.

    gen = Generator(model, sampling=SamplingConfig(), eos_ids=[2])
    out = gen.generate([[1, 2, 3], [4, 5]], max_new_tokens=32, seed=0)
    out.tokens          # new tokens of each prompt (its EOS included when it stopped on one)

How it works
- The cache (`model.KVCache`) holds the roped, un-normed K/V of the KV-producing layers only
  (`num_layers / cla_share_factor`), preallocated to `max_len` slots, bf16/f32 or int8 with
  per-token per-head scales (`cache_dtype="int8"`). A row's token at position p sits in slot p.
- Prefill: prompts are right-padded into one [B, S] batch and run through the model in chunks
  of `prefill_chunk` tokens (bounding the [B, chunk, vocab] logits); each row's next-token
  logits are taken at its own last prompt position and its `cache.index` set to its length.
  Padded slots hold garbage, but the mask is `slot <= position`, so a row's slot p is rewritten
  by its decode step at position p before any query can see it.
- Decode: one `lax.while_loop` (each iteration = one token for every row) that stops when every
  row has produced an EOS id or `max_new_tokens`; rows that finished keep running but their
  tokens are discarded. Its trip count is a runtime argument, so the same executable serves a
  whole generation in one call or streaming (one call per token); the state, cache included,
  is donated between calls.
- Every function is compiled ahead of time once per shape (`Generator.compiles` counts them).
- On a mesh: parameters as the model was created (rules preset); the cache is placed and kept
  with `KVCache.LOGICAL_AXES` (batch over the data axes, KV heads over `tensor`), the batch
  padded with idle rows up to a multiple of the data-parallel size.

Loading (`load_for_inference`) dispatches on what a checkpoint directory contains; new formats
(e.g. train.py's orbax checkpoints) plug in with `register_checkpoint_format`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hunyuan_jax import moe
from hunyuan_jax.config import ModelConfig
from hunyuan_jax.model import HunyuanForCausalLM, KVCache, QuantizedKV
from hunyuan_jax.sampling import SamplingConfig, eos_ids_from_generation_config, sample

_NEG_INF = float(jnp.finfo(jnp.float32).min)
CACHE_DTYPES = ("auto", "bfloat16", "float32", "int8")


# ============================================================================ cache helpers
def cache_bytes_per_token(cfg: ModelConfig, dtype=None) -> dict[str, int]:
    """Bytes one token occupies in the cache, from the real cache shapes (jax.eval_shape: no
    memory): {'kv': K/V payload, 'scales': int8 scales (0 otherwise), 'total': both}."""
    batch, length = 2, 4
    cache = jax.eval_shape(lambda: KVCache.zeros(cfg, batch, length, dtype))
    kv = scales = 0
    for t in (cache.k, cache.v):
        if isinstance(t, QuantizedKV):
            kv += t.values.size * t.values.dtype.itemsize
            scales += t.scale.size * t.scale.dtype.itemsize
        else:
            kv += t.size * t.dtype.itemsize
    per = batch * length
    return {"kv": kv // per, "scales": scales // per, "total": (kv + scales) // per}


def cache_specs(cache: KVCache, rules, mesh) -> KVCache:
    """PartitionSpecs for every array of `cache` from `KVCache.LOGICAL_AXES` and `rules`."""
    from sharding.rules import logical_to_spec

    def spec(t, axes):
        return logical_to_spec(axes, rules, mesh=mesh, shape=t.shape, name="kv cache")

    def tensor(t):
        if isinstance(t, QuantizedKV):
            return QuantizedKV(
                spec(t.values, KVCache.LOGICAL_AXES), spec(t.scale, QuantizedKV.SCALE_LOGICAL_AXES)
            )
        return spec(t, KVCache.LOGICAL_AXES)

    return KVCache(tensor(cache.k), tensor(cache.v), spec(cache.index, (KVCache.LOGICAL_AXES[1],)))


def cache_shardings(cache: KVCache, rules, mesh) -> KVCache:
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s),
        cache_specs(cache, rules, mesh),
        is_leaf=lambda x: isinstance(x, P),
    )


def batch_multiple(rules, mesh) -> int:
    """The batch must be a multiple of the mesh axes the cache batch is sharded over."""
    if mesh is None or rules is None:
        return 1
    from sharding.rules import logical_to_spec

    (axes,) = logical_to_spec(("cache_batch",), rules, mesh=mesh)
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


# ============================================================================ generation
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


StreamFn = Callable[[int, np.ndarray, np.ndarray], None]


def _sharding_key(x):
    """A hashable sharding identity in which equivalent specs (P('data') and P('data', None))
    are equal."""
    sh = getattr(x, "sharding", None)
    if isinstance(sh, NamedSharding):
        spec = list(sh.spec)
        while spec and spec[-1] is None:
            spec.pop()
        return ("named", sh.mesh, tuple(spec), sh.memory_kind)
    return sh


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


DECODE_LOOPS = ("auto", "device", "host")


class Generator:
    """Compiled prefill + decode for one model, sampling configuration and cache dtype.

    model: a `HunyuanForCausalLM` (on one device, or created sharded on `mesh` with `rules`,
      which default to `model.rules`). eos_ids: ids that end a row (any of them).
    vocab_limit: ids >= this are never produced (e.g. the tokenizer's size when the model's
      vocabulary is padded beyond it). prefill_chunk: tokens per prefill call (bounds the
      [B, chunk, V] float32 logits the model returns). record_logits: keep the model's logits
      of every new token (tests; [B, max_len, V] float32 of memory).
    experts_fn: the MoE hook (`moe.ExpertsFn`) for every call, e.g. an expert-parallel one on
      a mesh; 'auto' (default), on one device: `moe.experts_fn_for` (per-token experts for
      decode steps, tiles on CPU, else the model's ragged_dot); on a mesh: expert parallel
      (`expert_parallel`, dropless 'gather').
    decode_loop: 'device' runs the decode steps in one `lax.while_loop` per call; 'host' calls a
      one-token executable per step. On TPU the while loop carries the weights and XLA keeps
      a second, re-laid-out copy of the stacked experts (+22 GiB per chip for the A52B on
      v6e-32, measured with hunyuan_jax.aot), so 'auto' picks 'host' on TPU, else 'device'.
    """

    def __init__(
        self,
        model: HunyuanForCausalLM,
        *,
        sampling: SamplingConfig | None = None,
        eos_ids: Sequence[int] = (),
        cache_dtype: str | None = None,
        vocab_limit: int | None = None,
        mesh=None,
        rules=None,
        prefill_chunk: int = 512,
        record_logits: bool = False,
        experts_fn: Any = "auto",
        decode_loop: str = "auto",
    ):
        self.cfg: ModelConfig = model.cfg
        self.sampling = sampling or SamplingConfig()
        vocab = self.cfg.vocab_size
        self.eos_ids = self._check_eos(eos_ids)
        self.vocab_limit = None if vocab_limit is None or vocab_limit >= vocab else int(vocab_limit)
        if cache_dtype in (None, "auto"):
            cache_dtype = self.cfg.compute_dtype
        if cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache dtype must be one of {CACHE_DTYPES}, got {cache_dtype!r}")
        self.cache_dtype = cache_dtype
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be positive, got {prefill_chunk}")
        self.prefill_chunk = int(prefill_chunk)
        self.record_logits = bool(record_logits)
        self.experts_fn = experts_fn
        self.mesh = mesh
        if decode_loop not in DECODE_LOOPS:
            raise ValueError(f"decode_loop must be one of {DECODE_LOOPS}, got {decode_loop!r}")
        if decode_loop == "auto":  # the platform of the devices the model lives on
            devices = mesh.devices.flat if mesh is not None else jax.devices()
            decode_loop = "host" if next(iter(devices)).platform == "tpu" else "device"
        self.decode_loop = decode_loop
        self.rules = rules if rules is not None else model.rules
        if mesh is not None and self.rules is None:
            raise ValueError("decoding on a mesh needs sharding rules (the model's or `rules`)")
        self.graphdef, self.params = nnx.split(model)
        self.compiles: dict[str, int] = {"prefill": 0, "start": 0, "decode": 0}
        self._executables: dict[Any, Any] = {}
        self._ep_fn = None

    # ------------------------------------------------------------------ compiled pieces
    def _model(self, params):
        return nnx.merge(self.graphdef, params)

    def _pin(self, cache: KVCache) -> KVCache:
        if self.mesh is None:
            return cache
        return jax.lax.with_sharding_constraint(
            cache, cache_shardings(cache, self.rules, self.mesh)
        )

    def _prefill_fn(self, params, tokens, start, cache, lengths, last_logits):
        """One chunk: tokens [B, C] at positions start..start+C-1 of every row."""
        b, c = tokens.shape
        cache = cache._replace(index=jnp.full((b,), start, jnp.int32))
        logits, _, cache = self._model(params)(
            tokens, cache=cache, experts_fn=self._experts_fn(b * c)
        )
        offset = lengths - 1 - start  # row's last prompt position within this chunk
        picked = jnp.take_along_axis(logits, jnp.clip(offset, 0, c - 1)[:, None, None], axis=1)[
            :, 0
        ]
        in_chunk = (offset >= 0) & (offset < c)
        return self._pin(cache), self._pin_batch(jnp.where(in_chunk[:, None], picked, last_logits))

    def _experts_fn(self, num_tokens: int):
        if self.experts_fn != "auto":
            return self.experts_fn
        if self.mesh is not None:  # routed experts stay where the rules put them
            if self._ep_fn is None:
                from hunyuan_jax.expert_parallel import make_expert_parallel_fn

                self._ep_fn = make_expert_parallel_fn(self.mesh, self.rules, "gather")
            return self._ep_fn
        return moe.experts_fn_for(num_tokens, self.cfg.moe_top_k, self.cfg.num_experts)

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
        return self._pin_state(
            DecodeState(
                cache,
                tokens,
                tok,
                done,
                active.astype(jnp.int32),
                seen,
                key,
                jnp.ones((), jnp.int32),
                logits,
                eos,
            )
        )

    def _decode_fn(self, params, state: DecodeState, num_steps, max_new_tokens):
        """Up to `num_steps` tokens per row (fewer when every row is done)."""
        model = self._model(params)
        stop = jnp.minimum(state.step + num_steps, max_new_tokens)
        b = state.last.shape[0]

        def cond(s):
            return (s.step < stop) & ~jnp.all(s.done)

        def body(s):
            logits, _, cache = model(s.last[:, None], cache=s.cache, experts_fn=self._experts_fn(b))
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

    def _executable(self, name: str, fn, donate: tuple[int, ...], args) -> tuple[Any, float]:
        """An ahead-of-time executable of `fn` for concrete `args`, compiled once per argument
        layout (tree, shapes, dtypes, shardings); also returns the seconds compiling took."""
        leaves, tree = jax.tree.flatten(args)
        sig = (name, tree, tuple((np.shape(x), str(x.dtype), _sharding_key(x)) for x in leaves))
        exe = self._executables.get(sig)
        if exe is not None:
            return exe, 0.0
        t0 = time.perf_counter()
        with self._mesh_ctx():
            exe = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
        self._executables[sig] = exe
        self.compiles[name] += 1
        return exe, time.perf_counter() - t0

    def _mesh_ctx(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        return jax.set_mesh(self.mesh)

    def _batch_sharded(self, x: np.ndarray):
        """Host array with a leading batch dim -> device array sharded like the cache batch."""
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, NamedSharding(self.mesh, self._batch_spec(x.ndim)))

    def _batch_spec(self, ndim: int) -> P:
        from sharding.rules import logical_to_spec

        return logical_to_spec(("cache_batch",) + (None,) * (ndim - 1), self.rules, mesh=self.mesh)

    def _pin_state(self, s: DecodeState) -> DecodeState:
        """Fixes the layout of the decode state (cache as its rules say, per-row arrays over the
        batch axes), so that every call's output matches the executable's input layout."""
        if self.mesh is None:
            return s
        pin = self._pin_batch
        rep = lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P()))
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

    def _pin_batch(self, x):
        if self.mesh is None or x is None:
            return x
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(self.mesh, self._batch_spec(x.ndim))
        )

    # ------------------------------------------------------------------ public API
    def check_prompts(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, max_len: int | None
    ) -> int:
        """Validates prompts and sizes; returns the cache length to use."""
        if (
            isinstance(max_new_tokens, bool)
            or not isinstance(max_new_tokens, (int, np.integer))
            or max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not prompts:
            raise ValueError("no prompts to decode")
        vocab = self.cfg.vocab_size
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
        if max_len is None:
            max_len = _round_up(longest + max_new_tokens, 64)
        if longest > max_len:
            raise ValueError(
                f"a prompt of {longest} tokens is longer than the KV cache "
                f"({max_len} slots); shorten it or use a longer cache"
            )
        if longest + max_new_tokens > max_len:
            raise ValueError(
                f"a prompt of {longest} tokens plus max_new_tokens="
                f"{max_new_tokens} needs {longest + max_new_tokens} cache slots, "
                f"more than the KV cache's {max_len}; lower max_new_tokens to at "
                f"most {max_len - longest} or use a longer cache"
            )
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
        b = _round_up(n, batch_multiple(self.rules, self.mesh))
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
        key = jax.random.key(seed)
        if self.mesh is not None:
            cache = jax.device_put(cache, cache_shardings(cache, self.rules, self.mesh))
            key = jax.device_put(key, NamedSharding(self.mesh, P()))
        lengths = self._batch_sharded(lengths_np)
        active = self._batch_sharded(active_np)
        prompts_dev = self._batch_sharded(tokens_np)
        chunks = [self._batch_sharded(tokens_np[:, s : s + chunk]) for s in range(0, padded, chunk)]
        last_logits = self._batch_sharded(np.zeros((b, self.cfg.vocab_size), np.float32))
        max_new = np.int32(max_new_tokens)
        buffer = np.zeros((slots,), bool)  # only its shape matters: the token buffer's width

        # Compile before timing (prefill and start from the first chunk's arguments).
        prefill, c0 = self._executable(
            "prefill",
            self._prefill_fn,
            (3, 5),
            (self.params, chunks[0], np.int32(0), cache, lengths, last_logits),
        )
        eos = jax.device_put(eos_np, NamedSharding(self.mesh, P())) if self.mesh else eos_np
        start_args = (last_logits, lengths, prompts_dev, active, key, cache, max_new, buffer, eos)
        start, c1 = self._executable("start", self._start_fn, (5,), start_args)
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
            decode, c = self._executable(
                "decode", self._decode_fn, (1,), (self.params, state, every, max_new)
            )
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
        eos = set(eos_ids)
        for i in range(n):
            row = tokens[i, : num_new[i]].tolist()
            out.append(row)
            reasons.append("eos" if row and row[-1] in eos else "length")
        logits = None
        if state.logits is not None:
            recorded = np.asarray(state.logits)
            logits = [recorded[i, : num_new[i]] for i in range(n)]
        return Generation(
            out, reasons, int(lengths_np[:n].sum()), t1 - t0, decode_s, compile_s, logits
        )


# ============================================================================ loading
@dataclasses.dataclass
class InferenceModel:
    """What `load_for_inference` returns: the model and what decoding it needs."""

    cfg: ModelConfig
    model: HunyuanForCausalLM
    format: str  # which registered checkpoint format loaded it
    directory: Path
    tokenizer: Any | None  # hunyuan_jax.tokenizer.Tokenizer, if one was found
    sampling: SamplingConfig  # defaults (generation_config.json, else greedy)
    eos_ids: list[int]  # generation_config.json, else the tokenizer's, else config.json's


@dataclasses.dataclass(frozen=True)
class CheckpointFormat:
    """A checkpoint layout: `detect(dir)` says whether a directory holds one; `config(dir)`
    reads its ModelConfig cheaply (checks run before the weights load); `load(dir, dtype,
    mesh, rules)` returns (ModelConfig, HunyuanForCausalLM) with dtype 'auto' (the
    checkpoint's own), 'float32' or 'bfloat16', placed by `rules` on `mesh` (or one device)."""

    name: str
    description: str
    detect: Callable[[Path], bool]
    config: Callable[[Path], ModelConfig]
    load: Callable[..., tuple[ModelConfig, HunyuanForCausalLM]]


_FORMATS: list[CheckpointFormat] = []


def register_checkpoint_format(fmt: CheckpointFormat, *, replace: bool = False) -> None:
    """Adds a format (checked in registration order); `replace` swaps one of the same name."""
    for i, f in enumerate(_FORMATS):
        if f.name == fmt.name:
            if not replace:
                raise ValueError(f"checkpoint format {fmt.name!r} is already registered")
            _FORMATS[i] = fmt
            return
    _FORMATS.append(fmt)


def _torch_dtype(d: Path) -> str | None:
    try:
        return json.loads((d / "config.json").read_text()).get("torch_dtype")
    except (OSError, ValueError):
        return None


def _dtype_overrides(d: Path, dtype: str) -> dict:
    """Parameters and compute in one dtype: 'auto' = config.json's torch_dtype (float32 stays
    float32, anything else bfloat16)."""
    if dtype == "auto":
        dtype = "float32" if _torch_dtype(d) == "float32" else "bfloat16"
    return dict(param_dtype=dtype, compute_dtype=dtype, remat="none")


# Hugging Face layout ----------------------------------------------------------------------
_HF_WEIGHTS = (
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "model.safetensors",
    "pytorch_model.bin",
)


def _is_hf(d: Path) -> bool:
    return (d / "config.json").is_file() and any((d / w).is_file() for w in _HF_WEIGHTS)


def _load_hf(d: Path, dtype: str, mesh, rules):
    from hunyuan_jax.state import load_hf_model

    return load_hf_model(d, mesh=mesh, rules=rules, **_dtype_overrides(d, dtype))


# `python -m hunyuan_jax.convert hf-to-jax` output (hunyuan_jax.checkpoint_format) ---------
def _is_converted(d: Path) -> bool:
    from hunyuan_jax import checkpoint_format

    return checkpoint_format.is_converted(d)


def _converted_config(d: Path) -> ModelConfig:
    from hunyuan_jax import checkpoint_format

    return checkpoint_format.load_config(d)


def _load_converted(d: Path, dtype: str, mesh, rules):
    from hunyuan_jax import checkpoint_format

    return checkpoint_format.restore_model(d, mesh, rules, **_dtype_overrides(d, dtype))


# train.py run directory: config.yaml + checkpoints/<step>/params (hunyuan_jax.checkpointing)
def _is_run(d: Path) -> bool:
    return (d / "config.yaml").is_file() and (d / "checkpoints").is_dir()


def _run_config(d: Path) -> ModelConfig:
    from hunyuan_jax.checkpointing import read_run_config

    return read_run_config(d)[0]


def _load_run(d: Path, dtype: str, mesh, rules):
    """The latest complete step. 'auto' keeps the run's dtypes (e.g. float32 master weights,
    bfloat16 compute); otherwise the compute dtype is set (the weights are cast as used)."""
    from hunyuan_jax.checkpointing import restore_params

    overrides = dict(remat="none")
    if dtype != "auto":
        overrides["compute_dtype"] = dtype
    return restore_params(d, mesh, rules, **overrides)


# Anything else orbax wrote: say where to point instead -------------------------------------
def _is_orbax(d: Path) -> bool:
    """orbax writes `_CHECKPOINT_METADATA` into each step directory (`DIR` or `DIR/<step>`)."""
    if (d / "_CHECKPOINT_METADATA").is_file():
        return True
    return any(
        (s / "_CHECKPOINT_METADATA").is_file()
        for s in d.iterdir()
        if s.is_dir() and s.name.isdigit()
    )


def _load_orbax(d: Path, *args):
    raise FileNotFoundError(
        f"{d} is an orbax checkpoint directory without its model config: pass the train.py "
        f"run directory (the one holding config.yaml and checkpoints/) or a directory "
        f"written by `python -m hunyuan_jax.convert hf-to-jax`"
    )


register_checkpoint_format(
    CheckpointFormat(
        "hf",
        "Hugging Face layout: config.json + safetensors or PyTorch .bin shards",
        _is_hf,
        ModelConfig.from_hf,
        _load_hf,
    )
)
register_checkpoint_format(
    CheckpointFormat(
        "converted",
        "hunyuan_jax.convert hf-to-jax output: manifest.json + params/",
        _is_converted,
        _converted_config,
        _load_converted,
    )
)
register_checkpoint_format(
    CheckpointFormat(
        "run",
        "train.py run directory: config.yaml + checkpoints/<step>/",
        _is_run,
        _run_config,
        _load_run,
    )
)
register_checkpoint_format(
    CheckpointFormat(
        "orbax",
        "a bare orbax step directory (point at its run directory instead)",
        _is_orbax,
        _load_orbax,
        _load_orbax,
    )
)


def find_tokenizer(*dirs: Path):
    """The first tokenizer found in `dirs` (each dir itself, then its `tokenizer/`), or None."""
    from hunyuan_jax.tokenizer import load_tokenizer

    for d in dirs:
        for cand in (d, d / "tokenizer"):
            if cand.is_dir() and ((cand / "hy.tiktoken").is_file() or any(cand.glob("*.model"))):
                return load_tokenizer(cand)
    return None


def check_tokenizer(tokenizer, cfg: ModelConfig) -> None:
    """A tokenizer whose ids do not all fit the model's embedding is the wrong one."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary is only "
            f"{cfg.vocab_size}: this tokenizer does not belong to this checkpoint"
        )


def load_for_inference(
    directory: str | Path,
    *,
    dtype: str = "auto",
    mesh=None,
    rules=None,
    tokenizer: str | Path | None = None,
) -> InferenceModel:
    """Loads a checkpoint directory for decoding, whatever registered format it is in.

    Formats (`register_checkpoint_format` adds more): Hugging Face (config.json + shards), a
    `hunyuan_jax.convert hf-to-jax` output directory, a train.py run directory (latest step).
    dtype: 'auto' (HF / converted: config.json's torch_dtype, float32 stays float32, else
    bfloat16 parameters and compute; run: its own config), 'float32' or 'bfloat16'.
    tokenizer: a tokenizer file or directory; by default one is looked for in the checkpoint
    directory and its `tokenizer/`; generation_config.json there sets the sampling defaults.
    """
    d = Path(directory)
    if not d.exists():
        raise FileNotFoundError(f"checkpoint directory not found: {d}")
    if not d.is_dir():
        raise NotADirectoryError(f"--checkpoint must be a directory, got the file {d}")
    fmt = next((f for f in _FORMATS if f.detect(d)), None)
    if fmt is None:
        known = "; ".join(f"{f.name}: {f.description}" for f in _FORMATS)
        raise FileNotFoundError(
            f"{d} is not a checkpoint directory this program knows (formats: {known})"
        )
    if dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {dtype!r}")
    cfg = fmt.config(d)
    if tokenizer is not None:
        from hunyuan_jax.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
    else:
        tok = find_tokenizer(d)
    if tok is not None:
        check_tokenizer(tok, cfg)  # before the (possibly long) weight loading
    cfg, model = fmt.load(d, dtype, mesh, rules)

    sampling, eos = SamplingConfig(), None
    gen_dirs = [d] + (
        [Path(tokenizer) if Path(tokenizer).is_dir() else Path(tokenizer).parent]
        if tokenizer is not None
        else []
    )
    for g in gen_dirs:
        if (g / "generation_config.json").is_file():
            sampling = SamplingConfig.from_generation_config(g / "generation_config.json")
            eos = eos_ids_from_generation_config(g / "generation_config.json")
            break
    if eos is None and tok is not None:
        eos = tok.eos_ids
    if eos is None:
        try:
            e = json.loads((d / "config.json").read_text()).get("eos_token_id")
            eos = [] if e is None else [int(x) for x in (e if isinstance(e, list) else [e])]
        except (OSError, ValueError):
            eos = []
    eos = [e for e in eos if 0 <= e < cfg.vocab_size]
    return InferenceModel(cfg, model, fmt.name, d, tok, sampling, eos)
