"""The server's device side: a slot-indexed KV cache and the two compiled programs that every
process of a serving job runs, step by step, as the scheduler (`scheduler.py`) tells it.

    ex = Executor(model, slots=4, max_len=512, prefill_chunk=64, eos_ids=[2])
    out = ex.prefill(PrefillWork(slot=1, start=0, tokens=..., ...))  # one chunk, one slot
    out = ex.decode(DecodeWork(last=..., index=..., active=..., ...))  # one token, all slots

State on the device (donated from call to call): the cache `model.init_cache(slots, L)` (one
row per slot; L = max_len rounded up to a multiple of the chunk, so a chunk never writes past
the end) and `seen` [slots, V] bool (the tokens of each slot's sequence, for the repetition
penalty). Everything else (tokens, positions, per-slot sampling parameters, PRNG keys) comes
from the host with each call, packed into one int32 and one float32 array (`PrefillWork.pack`,
`DecodeWork.pack`; the same arrays are the multi-host plan): no request ever changes a shape.

The two programs, compiled ahead of time at start-up (`Executor.executables` == 2, whatever
the traffic; a call with other shapes would fail rather than recompile):
- prefill: `prefill_chunk` prompt tokens of one slot at positions start..start+C-1. The slot's
  cache row is sliced out (`dynamic_slice` on the batch axis, the slot a traced scalar), run
  through the model as a batch of one (`phase="prefill"`) and written back; its `seen` row is
  rebuilt. It also returns the log-probabilities of the next prompt token at each position
  (echo / prompt logprobs) and samples a first token from the last prompt position's logits
  with the slot's parameters (the scheduler keeps it only after the final chunk).
- decode: one token for every slot (`phase="decode"`) at the positions the host gives;
  idle slots and slots still being prefilled write into their row's last cache slot, which no
  real query ever reads (a request needs prompt + max_tokens <= max_len <= L slots and its
  last token is never written). Sampling is `sampling.sample_rows` with per-slot arrays
  (temperature 0 = argmax, exact), each slot drawing with fold_in(its request's key, its
  token count): a seeded request gives the same tokens whatever shares the batch.
Log-probabilities are the model's own (log-softmax of the raw logits), with the top
`TOP_LOGPROBS` alternatives. The model chooses its MoE dispatch and sharding (its plan); on a
mesh the cache is placed by `kv_cache.cache_shardings` and every output the host reads is
replicated, so process 0 of a multi-host job can read it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hunyuan_jax.decode.sampling import sample_rows
from hunyuan_jax.model.kv_cache import CACHE_DTYPES, KVCache, cache_shardings

TOP_LOGPROBS = 20  # alternatives returned per position (OpenAI allows up to 20)
_NEG_INF = float(jnp.finfo(jnp.float32).min)


@dataclasses.dataclass
class PrefillWork:
    """One chunk of one slot's prompt (host arrays)."""

    slot: int
    start: int  # position of tokens[0]
    tokens: np.ndarray  # [C] int32, zero-padded past the prompt
    next_tokens: np.ndarray  # [C] int32: the prompt token after each position (for logprobs)
    length: int  # the whole prompt's length
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    key: np.ndarray  # [2] uint32 key data of the request

    def pack(self) -> tuple[np.ndarray, np.ndarray]:
        """(int32 [6 + 2C], float32 [3]): one transfer each (and the multi-host plan)."""
        key = np.asarray(self.key, np.uint32).view(np.int32)
        head = np.array([self.slot, self.start, self.length, self.top_k], np.int32)
        ints = np.concatenate([head, key, self.tokens, self.next_tokens]).astype(np.int32)
        floats = np.array([self.temperature, self.top_p, self.repetition_penalty], np.float32)
        return ints, floats

    @classmethod
    def unpack(cls, ints, floats) -> PrefillWork:
        c = (len(ints) - 6) // 2
        i, f = [int(x) for x in ints[:4]], [float(x) for x in floats]
        key = np.asarray(ints[4:6], np.int32).view(np.uint32)
        return cls(i[0], i[1], ints[6 : 6 + c], ints[6 + c :], i[2], f[0], i[3], f[1], f[2], key)


@dataclasses.dataclass
class DecodeWork:
    """One decode step of every slot (host arrays, [slots] each)."""

    last: np.ndarray  # int32 token fed to the step
    index: np.ndarray  # int32 its position (cache slot written)
    active: np.ndarray  # bool
    temperature: np.ndarray  # float32
    top_k: np.ndarray  # int32
    top_p: np.ndarray  # float32
    repetition_penalty: np.ndarray  # float32
    keys: np.ndarray  # [slots, 2] uint32 key data
    count: np.ndarray  # int32 tokens already produced by the request (PRNG stream position)

    def pack(self) -> tuple[np.ndarray, np.ndarray]:
        """(int32 [7, S], float32 [3, S]): one transfer each (and the multi-host plan)."""
        keys = np.asarray(self.keys, np.uint32).view(np.int32).T
        rows = [self.last, self.index, self.active, self.top_k, self.count]
        ints = np.concatenate([np.stack(rows).astype(np.int32), keys])
        floats = np.stack([self.temperature, self.top_p, self.repetition_penalty])
        return ints, floats.astype(np.float32)

    @classmethod
    def unpack(cls, ints, floats) -> DecodeWork:
        keys = np.ascontiguousarray(np.asarray(ints[5:7], np.int32).T).view(np.uint32)
        return cls(ints[0], ints[1], ints[2].astype(bool), floats[0], ints[3], floats[1],
                   floats[2], keys, ints[4])  # fmt: skip


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def key_data(seed: int) -> np.ndarray:
    """[2] uint32 data of `jax.random.key(seed)` (threefry), computed on the host."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


class Executor:
    """The compiled prefill-chunk and decode-step programs and the device state they update."""

    def __init__(
        self,
        model,
        *,
        slots: int,
        max_len: int,
        prefill_chunk: int = 64,
        cache_dtype: str | None = None,
        vocab_limit: int | None = None,
    ):
        if slots < 1 or max_len < 2 or prefill_chunk < 1:
            raise ValueError(f"need slots >= 1, max_len >= 2, chunk >= 1 ({slots}, {max_len})")
        self.cfg, self.plan, self.policy = model.cfg, model.plan, model.policy
        self.slots, self.max_len = int(slots), int(max_len)
        self.chunk = min(int(prefill_chunk), _round_up(self.max_len, 8))
        self.cache_len = _round_up(self.max_len, self.chunk)
        cache_dtype = self.policy.compute_dtype if cache_dtype in (None, "auto") else cache_dtype
        if cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache dtype must be one of {CACHE_DTYPES}, got {cache_dtype!r}")
        self.cache_dtype = cache_dtype
        vocab = self.cfg.vocab_size
        self.vocab_limit = vocab if vocab_limit is None else min(int(vocab_limit), vocab)
        self.graphdef, self.params = nnx.split(model)
        self.cache = self._place(model.init_cache(self.slots, self.cache_len, cache_dtype))
        self.seen = self._put(np.zeros((self.slots, vocab), bool))
        self.compile_seconds = 0.0
        t0 = time.perf_counter()
        self._prefill = self._compile(self._prefill_fn, self._prefill_args(self._idle_prefill()))
        self._decode = self._compile(self._decode_fn, self._decode_args(self._idle_decode()))
        self.compile_seconds = time.perf_counter() - t0
        self.executables = 2

    # ------------------------------------------------------------------ placement
    def _place(self, cache: KVCache) -> KVCache:
        if not self.plan.is_sharded:
            return cache
        return jax.device_put(cache, cache_shardings(cache, self.plan))

    def _put(self, x):
        """A host array, replicated over the plan's devices (every process passes the same)."""
        x = np.asarray(x)
        if not self.plan.is_sharded:
            return jnp.asarray(x)
        sharding = self.plan.replicated()
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    def _pin_cache(self, cache: KVCache) -> KVCache:
        if not self.plan.is_sharded:
            return cache
        return jax.lax.with_sharding_constraint(cache, cache_shardings(cache, self.plan))

    def _rep(self, tree):
        if not self.plan.is_sharded:
            return tree
        return jax.lax.with_sharding_constraint(tree, self.plan.replicated())

    def _compile(self, fn, args):
        return jax.jit(fn, donate_argnums=(1, 2)).lower(*args).compile()

    # ------------------------------------------------------------------ programs
    def _forward(self, params, tokens, cache, phase):
        return nnx.merge(self.graphdef, params)(tokens, cache=cache, phase=phase)

    def _limit(self, logits):
        if self.vocab_limit >= logits.shape[-1]:
            return logits
        ids = jnp.arange(logits.shape[-1])
        return jnp.where(ids < self.vocab_limit, logits, _NEG_INF)

    @staticmethod
    def _logprobs(logits, chosen):
        """logits [..., V] -> (logprob of `chosen` [...], top ids, top logprobs [..., N])."""
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(lp, chosen[..., None], axis=-1)[..., 0]
        top_lp, top_ids = jax.lax.top_k(lp, TOP_LOGPROBS)
        return picked, top_ids.astype(jnp.int32), top_lp

    def _prefill_fn(self, params, cache, seen, ints, floats):
        """ints, floats: `PrefillWork.pack()`."""
        slot, start, length, top_k = ints[0], ints[1], ints[2], ints[3:4]
        key = jax.lax.bitcast_convert_type(ints[4:6], jnp.uint32)
        tokens, next_tokens = jnp.split(ints[6:], 2)
        c = tokens.shape[0]
        row = lambda a, axis: jax.lax.dynamic_slice_in_dim(a, slot, 1, axis)
        put = lambda a, r, axis: jax.lax.dynamic_update_slice_in_dim(a, r, slot, axis)
        one = jax.tree.map(lambda a: row(a, 1), (cache.k, cache.v))
        one = KVCache(one[0], one[1], jnp.full((1,), start, jnp.int32))
        logits, _, one = self._forward(params, tokens[None], one, "prefill")
        logits = self._limit(logits[0])  # [C, V]
        k, v = jax.tree.map(lambda a, r: put(a, r, 1), (cache.k, cache.v), (one.k, one.v))
        cache = self._pin_cache(KVCache(k, v, cache.index))
        # seen row: the prompt tokens so far (a new request's first chunk starts from zeros)
        pos = start + jnp.arange(c)
        valid = pos < length
        seen_row = jnp.where(start == 0, False, row(seen, 0)[0])
        seen_row = seen_row.at[jnp.where(valid, tokens, 0)].max(valid)
        # the first new token, from the last prompt position (used after the final chunk)
        last = jnp.clip(length - 1 - start, 0, c - 1)
        last_logits = logits[last][None]
        kd = jax.random.wrap_key_data(key)
        tok = sample_rows(
            last_logits,
            jax.random.fold_in(kd, 0)[None],
            floats[0:1],
            top_k,
            floats[1:2],
            floats[2:3],
            seen_row[None],
        )
        final = length - start <= c
        seen_row = seen_row.at[tok[0]].max(final)
        seen = self._rep(put(seen, seen_row[None], 0))
        first = self._logprobs(last_logits[0], tok[0])
        prompt = self._logprobs(logits, next_tokens)
        return cache, seen, self._rep(((tok[0], first[0]), first[1:], prompt))

    def _decode_fn(self, params, cache, seen, ints, floats):
        """ints, floats: `DecodeWork.pack()`."""
        last, index, active, top_k, n = ints[0], ints[1], ints[2] > 0, ints[3], ints[4]
        temp, top_p, rep = floats[0], floats[1], floats[2]
        keys = jax.lax.bitcast_convert_type(ints[5:7].T, jnp.uint32)
        parked = jnp.where(active, index, self.cache_len - 1)
        logits, _, new = self._forward(
            params, last[:, None], cache._replace(index=parked), "decode"
        )
        logits = self._limit(logits[:, 0])
        kd = jax.vmap(lambda d, i: jax.random.fold_in(jax.random.wrap_key_data(d), i))(keys, n)
        tok = sample_rows(logits, kd, temp, top_k, top_p, rep, seen)
        seen = self._rep(seen.at[jnp.arange(self.slots), tok].max(active))
        cache = self._pin_cache(new._replace(index=cache.index))
        lp, top_ids, top_lp = self._logprobs(logits, tok)
        return cache, seen, self._rep(((tok, lp), (top_ids, top_lp)))

    # ------------------------------------------------------------------ host-side calls
    def _idle_prefill(self) -> PrefillWork:
        z = np.zeros((self.chunk,), np.int32)
        return PrefillWork(0, 0, z, z, 1, 0.0, 0, 1.0, 1.0, key_data(0))

    def _idle_decode(self) -> DecodeWork:
        s = self.slots
        zi, zf = np.zeros((s,), np.int32), np.zeros((s,), np.float32)
        ones = np.ones((s,), np.float32)
        keys = np.zeros((s, 2), np.uint32)
        return DecodeWork(zi, zi, np.zeros((s,), bool), zf, zi, ones, ones, keys, zi)

    def _prefill_args(self, w: PrefillWork):
        return (self.params, self.cache, self.seen) + tuple(self._put(x) for x in w.pack())

    def _decode_args(self, w: DecodeWork):
        return (self.params, self.cache, self.seen) + tuple(self._put(x) for x in w.pack())

    def prefill(self, w: PrefillWork):
        """Runs one chunk. Returns device arrays ((first token, its logprob), (its top ids, top
        logprobs [N]), (prompt logprobs [C], prompt top ids [C, N], top logprobs [C, N]))."""
        self.cache, self.seen, out = self._prefill(*self._prefill_args(w))
        return out

    def decode(self, w: DecodeWork):
        """One token for every slot: device arrays ((tokens [S], logprobs [S]), (top ids,
        top logprobs [S, N]))."""
        self.cache, self.seen, out = self._decode(*self._decode_args(w))
        return out

    def state_ok(self) -> bool:
        """Whether the device state (cache, `seen`) is still there: a program that failed
        after taking its donated buffers leaves none, and nothing more can run."""
        return not any(a.is_deleted() for a in jax.tree.leaves((self.cache, self.seen)))

    def describe(self) -> str:
        return (
            f"{self.executables} executables (prefill chunk [1, {self.chunk}], decode step "
            f"[{self.slots}, 1]) compiled in {self.compile_seconds:.1f}s; cache {self.slots} "
            f"slots x {self.cache_len} tokens ({self.cache_dtype}); {self.plan.describe()}"
        )


def check_request(prompt: Sequence[int], max_tokens: int, max_len: int, vocab: int) -> str | None:
    """Why a request cannot be served (a message naming the numbers), or None."""
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
    bad = [t for t in prompt if not 0 <= int(t) < vocab]
    if bad:
        return f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})"
    return None
