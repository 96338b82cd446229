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

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

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
            return QuantizedKV(spec(t.values, KVCache.LOGICAL_AXES),
                               spec(t.scale, QuantizedKV.SCALE_LOGICAL_AXES))
        return spec(t, KVCache.LOGICAL_AXES)

    return KVCache(tensor(cache.k), tensor(cache.v),
                   spec(cache.index, (KVCache.LOGICAL_AXES[1],)))


def cache_shardings(cache: KVCache, rules, mesh) -> KVCache:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), cache_specs(cache, rules, mesh),
                        is_leaf=lambda x: isinstance(x, P))


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


@dataclasses.dataclass
class Generation:
    """Result of `Generator.generate` (lists in prompt order)."""

    tokens: list[list[int]]  # new tokens of each prompt, EOS included if it stopped on one
    finish_reasons: list[str]  # 'eos' or 'length'
    prompt_tokens: int  # real prompt tokens (no padding)
    prefill_seconds: float  # prefill and first-token sampling, compile excluded
    decode_seconds: float  # the decode loop, compile excluded
    compile_seconds: float  # ahead-of-time compiles this call needed (0 when all cached)

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


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class Generator:
    """Compiled prefill + decode for one model, sampling configuration and cache dtype.

    model: a `HunyuanForCausalLM` (on one device, or created sharded on `mesh` with `rules`,
      which default to `model.rules`). eos_ids: ids that end a row (any of them).
    vocab_limit: ids >= this are never produced (e.g. the tokenizer's size when the model's
      vocabulary is padded beyond it). prefill_chunk: tokens per prefill call (bounds the
      [B, chunk, V] float32 logits the model returns).
    """

    def __init__(self, model: HunyuanForCausalLM, *, sampling: SamplingConfig | None = None,
                 eos_ids: Sequence[int] = (), cache_dtype: str | None = None,
                 vocab_limit: int | None = None, mesh=None, rules=None,
                 prefill_chunk: int = 512):
        self.cfg: ModelConfig = model.cfg
        self.sampling = sampling or SamplingConfig()
        vocab = self.cfg.vocab_size
        self.eos_ids = tuple(int(e) for e in eos_ids)
        bad = [e for e in self.eos_ids if not 0 <= e < vocab]
        if bad:
            raise ValueError(f"eos ids {bad} are outside the model's vocabulary [0, {vocab})")
        self.vocab_limit = None if vocab_limit is None or vocab_limit >= vocab else int(
            vocab_limit)
        if cache_dtype in (None, "auto"):
            cache_dtype = self.cfg.compute_dtype
        if cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache dtype must be one of {CACHE_DTYPES}, got {cache_dtype!r}")
        self.cache_dtype = cache_dtype
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be positive, got {prefill_chunk}")
        self.prefill_chunk = int(prefill_chunk)
        self.mesh = mesh
        self.rules = rules if rules is not None else model.rules
        if mesh is not None and self.rules is None:
            raise ValueError("decoding on a mesh needs sharding rules (the model's or `rules`)")
        self.graphdef, self.params = nnx.split(model)
        self.compiles: dict[str, int] = {"prefill": 0, "start": 0, "decode": 0}
        self._executables: dict[Any, Any] = {}

    # ------------------------------------------------------------------ compiled pieces
    def _model(self, params):
        return nnx.merge(self.graphdef, params)

    def _pin(self, cache: KVCache) -> KVCache:
        if self.mesh is None:
            return cache
        return jax.lax.with_sharding_constraint(cache, cache_shardings(cache, self.rules,
                                                                       self.mesh))

    def _prefill_fn(self, params, tokens, start, cache, lengths, last_logits):
        """One chunk: tokens [B, C] at positions start..start+C-1 of every row."""
        b, c = tokens.shape
        cache = cache._replace(index=jnp.full((b,), start, jnp.int32))
        logits, _, cache = self._model(params)(tokens, cache=cache)
        offset = lengths - 1 - start  # row's last prompt position within this chunk
        picked = jnp.take_along_axis(logits, jnp.clip(offset, 0, c - 1)[:, None, None],
                                     axis=1)[:, 0]
        in_chunk = (offset >= 0) & (offset < c)
        return self._pin(cache), jnp.where(in_chunk[:, None], picked, last_logits)

    def _pick(self, logits, key, step, seen):
        if self.vocab_limit is not None:
            ids = jnp.arange(logits.shape[-1])
            logits = jnp.where(ids < self.vocab_limit, logits, _NEG_INF)
        return sample(logits, jax.random.fold_in(key, step), self.sampling, seen)

    def _finished(self, tok):
        if not self.eos_ids:
            return jnp.zeros(tok.shape, bool)
        return jnp.isin(tok, jnp.asarray(self.eos_ids, jnp.int32))

    def _start_fn(self, last_logits, lengths, prompts, active, key, cache, max_new_tokens,
                  buffer):
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
        done = ~active | self._finished(tok) | (max_new_tokens <= 1)
        cache = self._pin(cache._replace(index=lengths.astype(jnp.int32)))
        return DecodeState(cache, tokens, tok, done, active.astype(jnp.int32), seen, key,
                           jnp.ones((), jnp.int32))

    def _decode_fn(self, params, state: DecodeState, num_steps, max_new_tokens):
        """Up to `num_steps` tokens per row (fewer when every row is done)."""
        model = self._model(params)
        stop = jnp.minimum(state.step + num_steps, max_new_tokens)
        b = state.last.shape[0]

        def cond(s):
            return (s.step < stop) & ~jnp.all(s.done)

        def body(s):
            logits, _, cache = model(s.last[:, None], cache=s.cache)
            tok = self._pick(logits[:, 0], s.key, s.step, s.seen)
            seen = s.seen
            if seen is not None:
                seen = seen.at[jnp.arange(b), tok].max(~s.done)
            tokens = jax.lax.dynamic_update_slice(s.tokens, tok[:, None], (0, s.step))
            num_new = s.num_new + (~s.done).astype(jnp.int32)
            done = s.done | self._finished(tok) | (s.step + 1 >= max_new_tokens)
            return DecodeState(self._pin(cache), tokens, tok, done, num_new, seen, s.key,
                               s.step + 1)

        return jax.lax.while_loop(cond, body, state)

    def _run(self, name: str, fn, donate: tuple[int, ...], *args):
        """Call `fn` through an ahead-of-time executable, compiled once per argument layout."""
        leaves, tree = jax.tree.flatten(args)
        sig = (name, tree, tuple((np.shape(x), jnp.result_type(x),
                                  getattr(x, "sharding", None)) for x in leaves))
        exe = self._executables.get(sig)
        compile_s = 0.0
        if exe is None:
            t0 = time.perf_counter()
            with self._mesh_ctx():
                exe = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
            compile_s = time.perf_counter() - t0
            self._executables[sig] = exe
            self.compiles[name] += 1
        return exe(*args), compile_s

    def _mesh_ctx(self):
        if self.mesh is None:
            import contextlib
            return contextlib.nullcontext()
        return jax.set_mesh(self.mesh)

    # ------------------------------------------------------------------ public API
    def check_prompts(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                      max_len: int | None) -> int:
        """Validates prompts and sizes; returns the cache length to use."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
                max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not prompts:
            raise ValueError("no prompts to decode")
        vocab = self.cfg.vocab_size
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty (at least one token is needed)")
            lo, hi = min(p), max(p)
            if lo < 0 or hi >= vocab:
                raise ValueError(f"prompt {i} has token id {hi if hi >= vocab else lo} outside "
                                 f"the model's vocabulary [0, {vocab})")
        longest = max(len(p) for p in prompts)
        if max_len is None:
            max_len = min(_round_up(longest + max_new_tokens, 64),
                          max(self.cfg.max_position_embeddings, longest + max_new_tokens))
        if longest > max_len:
            raise ValueError(f"a prompt of {longest} tokens is longer than the KV cache "
                             f"({max_len} slots); shorten it or use a longer cache")
        if longest + max_new_tokens > max_len:
            raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens="
                             f"{max_new_tokens} needs {longest + max_new_tokens} cache slots, "
                             f"more than the KV cache's {max_len}; lower max_new_tokens to at "
                             f"most {max_len - longest} or use a longer cache")
        return max_len

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, seed: int = 0,
                 max_len: int | None = None, stream: StreamFn | None = None,
                 stream_every: int = 1) -> Generation:
        """Decode every prompt (token id lists of any lengths) in one batch.

        max_len: cache slots (default: longest prompt + max_new_tokens rounded up to 64).
        stream(step, tokens [B], active [B]): called after each new token of the batch
          (`stream_every` tokens per decode call), with the rows still generating.
        """
        max_len = self.check_prompts(prompts, max_new_tokens, max_len)
        n = len(prompts)
        b = _round_up(n, batch_multiple(self.rules, self.mesh))
        lengths_np = np.ones((b,), np.int32)
        lengths_np[:n] = [len(p) for p in prompts]
        longest = int(lengths_np.max())
        chunk = min(self.prefill_chunk, _round_up(longest, 16))
        padded = _round_up(longest, chunk)
        slots = max(max_len, padded)  # a chunk never writes past the cache end
        tokens_np = np.zeros((b, padded), np.int32)
        for i, p in enumerate(prompts):
            tokens_np[i, :len(p)] = p
        active_np = np.arange(b) < n

        cache = KVCache.zeros(self.cfg, b, slots, self.cache_dtype)
        put = jnp.asarray
        if self.mesh is not None:
            cache = jax.device_put(cache, cache_shardings(cache, self.rules, self.mesh))
            batch_sharding = NamedSharding(self.mesh, cache_specs(cache, self.rules,
                                                                  self.mesh).index)
            put = lambda x: jax.device_put(x, batch_sharding)
        lengths, active = put(lengths_np), put(active_np)
        prompts_dev = put(tokens_np)
        last_logits = jnp.zeros((b, self.cfg.vocab_size), jnp.float32)
        if self.mesh is not None:
            last_logits = jax.device_put(last_logits, NamedSharding(self.mesh, P()))
        key = jax.random.key(seed)
        i32 = lambda v: jnp.asarray(v, jnp.int32)
        compile_s = 0.0

        # Compile everything first so that the timings below measure running only.
        for name, fn, donate, args in self._signatures(prompts_dev, chunk, cache, lengths,
                                                       last_logits, active, key,
                                                       max_new_tokens, slots):
            compile_s += self._ensure_compiled(name, fn, donate, args)

        t0 = time.perf_counter()
        for start in range(0, padded, chunk):
            (cache, last_logits), _ = self._run(
                "prefill", self._prefill_fn, (3, 5), self.params,
                prompts_dev[:, start:start + chunk], i32(start), cache, lengths, last_logits)
        state, _ = self._run("start", self._start_fn, (5,), last_logits, lengths, prompts_dev,
                             active, key, cache, i32(max_new_tokens), jnp.zeros((slots,), bool))
        first = np.asarray(state.last)
        t1 = time.perf_counter()
        if stream is not None:
            stream(0, first[:n], active_np[:n])
        every = max_new_tokens if stream is None else max(int(stream_every), 1)
        decode_s = 0.0
        done = bool(np.asarray(state.done).all())
        while not done:
            t_call = time.perf_counter()
            step_before = int(state.step)
            done_before = np.asarray(state.done)
            state, _ = self._run("decode", self._decode_fn, (1,), self.params, state, i32(every),
                                 i32(max_new_tokens))
            step = int(state.step)  # waits for the call
            decode_s += time.perf_counter() - t_call
            done = bool(np.asarray(state.done).all()) or step >= max_new_tokens
            if stream is not None:
                cols = np.asarray(state.tokens[:, step_before:step])
                num_new = np.asarray(state.num_new)
                for j in range(cols.shape[1]):
                    live = (num_new > step_before + j) & ~done_before
                    stream(step_before + j, cols[:n, j], live[:n])
        if stream is None:
            decode_s = time.perf_counter() - t1 if max_new_tokens > 1 else 0.0

        tokens = np.asarray(state.tokens)
        num_new = np.asarray(state.num_new)
        out, reasons = [], []
        eos = set(self.eos_ids)
        for i in range(n):
            row = tokens[i, :num_new[i]].tolist()
            out.append(row)
            reasons.append("eos" if row and row[-1] in eos else "length")
        return Generation(out, reasons, int(lengths_np[:n].sum()), t1 - t0, decode_s, compile_s)

    def _signatures(self, prompts, chunk, cache, lengths, last_logits, active, key,
                    max_new_tokens, slots):
        """Abstract arguments of the three functions, for compiling ahead of timing."""
        spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                              sharding=getattr(x, "sharding", None))
        i32 = jax.ShapeDtypeStruct((), jnp.int32)
        chunk_tokens = prompts[:, :chunk]
        params = jax.tree.map(spec, self.params)
        a_cache = jax.tree.map(spec, cache)
        yield ("prefill", self._prefill_fn, (3, 5),
               (params, spec(chunk_tokens), i32, a_cache, spec(lengths), spec(last_logits)))
        start_args = (spec(last_logits), spec(lengths), spec(prompts), spec(active), key,
                      a_cache, i32, jax.ShapeDtypeStruct((slots,), bool))
        yield "start", self._start_fn, (5,), start_args
        with self._mesh_ctx():
            state = jax.eval_shape(self._start_fn, *start_args)
        yield "decode", self._decode_fn, (1,), (params, state, i32, i32)

    def _ensure_compiled(self, name, fn, donate, args) -> float:
        """Compiles `fn` for abstract `args` unless an executable for them exists."""
        # The executable cache is keyed on concrete-looking signatures; abstract values carry
        # the same shape / dtype / sharding, so the later concrete call finds the entry.
        leaves, tree = jax.tree.flatten(args)
        sig = (name, tree, tuple((np.shape(x), jnp.result_type(x),
                                  getattr(x, "sharding", None)) for x in leaves))
        if sig in self._executables:
            return 0.0
        t0 = time.perf_counter()
        with self._mesh_ctx():
            exe = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
        self._executables[sig] = exe
        self.compiles[name] += 1
        return time.perf_counter() - t0


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
    """A checkpoint layout: `detect(dir)` says whether a directory holds one; `load(dir, cfg
    overrides, mesh, rules)` returns (ModelConfig, HunyuanForCausalLM)."""

    name: str
    description: str
    detect: Callable[[Path], bool]
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


_HF_WEIGHTS = ("model.safetensors.index.json", "pytorch_model.bin.index.json",
               "model.safetensors", "pytorch_model.bin")


def _is_hf(d: Path) -> bool:
    return (d / "config.json").is_file() and any((d / w).is_file() for w in _HF_WEIGHTS)


def _load_hf(d: Path, overrides: dict, mesh, rules):
    from hunyuan_jax.state import load_hf_model
    return load_hf_model(d, mesh=mesh, rules=rules, **overrides)


def _is_orbax(d: Path) -> bool:
    markers = ("_CHECKPOINT_METADATA", "_METADATA", "checkpoint", "_sharding")
    if any((d / m).exists() for m in markers):
        return True
    steps = [p for p in d.iterdir() if p.is_dir() and p.name.isdigit()]
    return any(any((s / m).exists() for m in markers) or any(s.iterdir()) for s in steps)


def _load_orbax(d: Path, overrides: dict, mesh, rules):
    raise NotImplementedError(
        f"{d} looks like an orbax checkpoint (train.py / convert); loading those for inference "
        f"is not implemented yet: register a loader with "
        f"hunyuan_jax.decode.register_checkpoint_format(..., replace=True)")


register_checkpoint_format(CheckpointFormat(
    "hf", "Hugging Face layout: config.json + safetensors or PyTorch .bin shards",
    _is_hf, _load_hf))
register_checkpoint_format(CheckpointFormat(
    "orbax", "orbax checkpoint written by train.py / convert", _is_orbax, _load_orbax))


def _torch_dtype(d: Path) -> str | None:
    try:
        return json.loads((d / "config.json").read_text()).get("torch_dtype")
    except (OSError, ValueError):
        return None


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
            f"{cfg.vocab_size}: this tokenizer does not belong to this checkpoint")


def load_for_inference(directory: str | Path, *, dtype: str = "auto", mesh=None, rules=None,
                       tokenizer: str | Path | None = None) -> InferenceModel:
    """Loads a checkpoint directory for decoding, whatever registered format it is in.

    dtype: 'auto' (the checkpoint's torch_dtype; float32 -> float32 everywhere, else bfloat16
      parameters and compute), 'float32' or 'bfloat16'. tokenizer: a tokenizer file or
      directory; by default one is looked for in the checkpoint directory (and `tokenizer/`).
    """
    d = Path(directory)
    if not d.exists():
        raise FileNotFoundError(f"checkpoint directory not found: {d}")
    if not d.is_dir():
        raise NotADirectoryError(f"--checkpoint must be a directory, got the file {d}")
    fmt = next((f for f in _FORMATS if f.detect(d)), None)
    if fmt is None:
        known = "; ".join(f"{f.name}: {f.description}" for f in _FORMATS)
        raise FileNotFoundError(f"{d} is not a checkpoint directory this program knows "
                                f"(formats: {known})")
    if dtype == "auto":
        dtype = "float32" if _torch_dtype(d) == "float32" else "bfloat16"
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {dtype!r}")
    overrides = dict(param_dtype=dtype, compute_dtype=dtype, remat="none")
    cfg, model = fmt.load(d, overrides, mesh, rules)

    tok = None
    if tokenizer is not None:
        from hunyuan_jax.tokenizer import load_tokenizer
        tok = load_tokenizer(tokenizer)
    else:
        tok = find_tokenizer(d)
    if tok is not None:
        check_tokenizer(tok, cfg)

    sampling, eos = SamplingConfig(), None
    gen_dirs = [d] + ([Path(tokenizer) if Path(tokenizer).is_dir() else Path(tokenizer).parent]
                      if tokenizer is not None else [])
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
