"""The engine's device side: the page pool, the repetition-penalty state and the compiled step
programs that the scheduler (`engine.scheduler`) drives, in one process or in every process of
a multi-host job.

    core = EngineCore(model, max_seqs=8, max_len=2048, page_size=16, token_budget=256)
    out = core.step(work)            # work: a StepWork (engine.step), any bucket

State on the device (donated from call to call): `pool`, the paged KV cache of every
KV-producing layer (`kv_cache.PagedCache.zeros_pool`; bf16 or int8 with per-token scales; page
0 is the scratch page padding writes into) and `seen` [max_seqs, V] bool (each engine row's
tokens, for the repetition penalty). Everything else comes from the host with each call as one
int32 and one float32 array (`StepWork.pack`).

The programs, all compiled at start-up (`programs` lists them; a call of another shape fails
rather than recompile):
- `step[T]` for each token bucket T (`token_buckets`: 1, 2, 4, 8, ... up to the token budget): one model call over a ragged stream of T token slots mixing prompt chunks
  of several sequences and single decode tokens, then one sampled token per sequence from its
  last token's logits (`sampling.sample_rows`: per-row temperature / top-k / top-p / penalty,
  each row drawing with fold_in(its request's key, its token count), so a seeded request gives
  the same tokens whatever shares the step), with the chosen token's log-probability and the
  top `TOP_LOGPROBS` alternatives.
- `score[B]` (B the token budget): the same, plus the log-probability of the next prompt token
  and its top alternatives at every stream position (echo / prompt logprobs; run only for
  steps that carry such a request, since it computes the LM head for every token).
The model chooses its MoE dispatch (phase 'decode' for a stream no longer than max_seqs, else
'prefill')
and its paged attention kernel (`dispatch.paged_attention_impl_for`).
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hunyuan_jax.decode.sampling import sample_rows
from hunyuan_jax.engine.step import StepShape, StepWork, paged_batch, unpack
from hunyuan_jax.model.kernels.paged import pool_head_dim
from hunyuan_jax.model.kv_cache import (
    CACHE_DTYPES,
    PagedCache,
    pool_bytes_per_token,
    pool_shardings,
)

TOP_LOGPROBS = 20  # alternatives returned per position (OpenAI allows up to 20)
_NEG_INF = float(jnp.finfo(jnp.float32).min)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def token_buckets(max_seqs: int, token_budget: int) -> tuple[int, ...]:
    """Stream lengths with a program each: 1, 2, 4, 8, ... up to the token budget (a step runs
    the smallest that holds its tokens, so a few decode rows never pay for a full stream: a
    padding token still runs the whole model, and in a decode step it gathers the weights of an
    expert of its own, so batch-1 decode in a stream of 8 read ~8x the routed weights)."""
    t, out = 1, []
    while t < token_budget:
        out.append(t)
        t *= 2
    return tuple(out) + (token_budget,)


class EngineCore:
    """The page pool, `seen` and the compiled step programs of one model (see the module doc).

    max_seqs: sequences in flight (rows). max_len: longest sequence (prompt + new tokens).
    page_size: token slots per page. num_pages: pages in the pool, the scratch page included
    (default: as many token slots as max_seqs rows of max_len, plus the scratch page).
    token_budget: stream tokens per step (the largest program; >= max_seqs).
    compile: False builds nothing on the devices (`lower` for the AOT tool only). lazy: compile
    each program on its first call instead of all at start-up (offline runs that meet a few).
    group_arrays: hold each layer group's weights as arrays of their own and run the groups by
    a Python loop over them (default: on one CPU device). XLA:CPU copies a group's slice of the
    stacked weights before each matmul, which halves a decode step's read rate; the price is a
    second copy of the layer weights (the model's stacked arrays stay with the model).
    """

    def __init__(
        self,
        model,
        *,
        max_seqs: int,
        max_len: int,
        page_size: int = 16,
        num_pages: int | None = None,
        token_budget: int = 256,
        cache_dtype: str | None = None,
        vocab_limit: int | None = None,
        compile: bool = True,
        lazy: bool = False,
        group_arrays: bool | None = None,
    ):
        if max_seqs < 1 or max_len < 2 or page_size < 1:
            raise ValueError(
                f"need max_seqs >= 1, max_len >= 2, page_size >= 1 "
                f"(got {max_seqs}, {max_len}, {page_size})"
            )
        self.cfg, self.plan, self.policy = model.cfg, model.plan, model.policy
        self.max_seqs, self.max_len, self.page_size = int(max_seqs), int(max_len), int(page_size)
        self.pages_per_seq = math.ceil(self.max_len / self.page_size)
        if num_pages is None:
            num_pages = self.max_seqs * self.pages_per_seq + 1
        if num_pages < 2:
            raise ValueError(f"the pool needs at least 2 pages (1 is scratch), got {num_pages}")
        self.num_pages = int(num_pages)
        self.token_budget = _round_up(max(int(token_budget), self.max_seqs), 8)
        cache_dtype = self.policy.compute_dtype if cache_dtype in (None, "auto") else cache_dtype
        if cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache dtype must be one of {CACHE_DTYPES}, got {cache_dtype!r}")
        self.cache_dtype = cache_dtype
        vocab = self.cfg.vocab_size
        self.vocab_limit = vocab if vocab_limit is None else min(int(vocab_limit), vocab)
        self.graphdef, self.params = nnx.split(model)
        if group_arrays is None:
            # float weights only: a stored int4 checkpoint's split groups failed its steps
            # (tests/test_quantize_int4.py::test_infer_cli_int4_end_to_end)
            floats = all(
                jnp.issubdtype(a.dtype, jnp.floating) and a.dtype.itemsize >= 2
                for a in jax.tree.leaves(self.params["groups"])
            )
            group_arrays = floats and not self.plan.is_sharded and self.plan.platform == "cpu"
        self.group_arrays = bool(group_arrays)
        self._groups = self._split_groups(self.params) if compile else None
        self.buckets = token_buckets(self.max_seqs, self.token_budget)
        self.programs = [("step", t) for t in self.buckets] + [("score", self.token_budget)]
        self.pool_head_dim = pool_head_dim(self.cfg.head_dim, self.plan.platform)
        self.compile_seconds = 0.0
        self._exe: dict = {}
        if compile:
            self.pool = self._place(self._empty_pool())
            self.seen = self._put(np.zeros((self.max_seqs, vocab), bool))
            for name, t in [] if lazy else self.programs:
                self._compile(name, t)

    def _compile(self, name: str, tokens: int):
        t0 = time.perf_counter()
        args = self._args(StepWork.empty(self.shape(tokens)))
        exe = self._exe[name, tokens] = self._jit(name, tokens).lower(*args).compile()
        self.compile_seconds += time.perf_counter() - t0
        return exe

    # ------------------------------------------------------------------ sizes
    @property
    def slots(self) -> int:  # the server's /health and metrics name for the rows
        return self.max_seqs

    @property
    def executables(self) -> int:
        """Programs compiled so far (all of them after start-up unless lazy)."""
        return len(self._exe)

    @property
    def pool_tokens(self) -> int:
        """Token slots the pool holds (the scratch page excluded)."""
        return (self.num_pages - 1) * self.page_size

    def shape(self, tokens: int) -> StepShape:
        """A stream of `tokens` carries at most that many sequences: the per-sequence work
        (LM head, sampling, logprobs) is sized by min(tokens, max_seqs), not by max_seqs."""
        return StepShape(int(tokens), min(int(tokens), self.max_seqs), self.pages_per_seq)

    def bucket_for(self, n_tokens: int) -> int:
        """The smallest program that takes a stream of n_tokens."""
        for t in self.buckets:
            if n_tokens <= t:
                return t
        raise ValueError(f"{n_tokens} tokens exceed the token budget {self.token_budget}")

    # ------------------------------------------------------------------ placement
    def _empty_pool(self):
        """The page pool of every KV-producing layer, all pages free."""
        return PagedCache.zeros_pool(
            self.cfg, self.num_pages, self.page_size, self.cache_dtype, self.pool_head_dim
        )

    def _place(self, pool):
        if not self.plan.is_sharded:
            return pool
        return jax.device_put(pool, pool_shardings(pool, self.plan))

    def _put(self, x):
        """A host array, replicated over the plan's devices (every process passes the same)."""
        x = np.asarray(x)
        if not self.plan.is_sharded:
            return jnp.asarray(x)
        return jax.make_array_from_callback(x.shape, self.plan.replicated(), lambda i: x[i])

    def _pin(self, pool):
        if not self.plan.is_sharded:
            return pool
        return jax.lax.with_sharding_constraint(pool, pool_shardings(pool, self.plan))

    def _rep(self, tree):
        if not self.plan.is_sharded:
            return tree
        return jax.lax.with_sharding_constraint(tree, self.plan.replicated())

    def _split_groups(self, params):
        """Each layer group's weights as arrays of their own (`group_arrays`), else None."""
        if not self.group_arrays:
            return None
        stacked = params["groups"]
        return tuple(
            jax.tree.map(lambda a, g=g: jnp.array(a[g]), stacked)
            for g in range(self.cfg.num_groups)
        )

    def _args(self, work: StepWork):
        args = (self.params, self.pool, self.seen) + tuple(self._put(x) for x in work.pack())
        return args + ((self._groups,) if self.group_arrays else ())

    def abstract_args(self, tokens: int):
        """ShapeDtypeStructs (with the plan's shardings) of a step program's arguments: what
        the AOT tool lowers for a TPU slice without allocating anything."""
        plan = self.plan
        pool = jax.eval_shape(self._empty_pool)
        rep = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=plan.replicated())
        shape = self.shape(tokens)
        return (
            plan.abstract(self.params),
            plan.abstract(pool, pool_shardings(pool, plan)),
            rep((self.max_seqs, self.cfg.vocab_size), jnp.bool_),
            rep((shape.int_size,), jnp.int32),
            rep((shape.float_size,), jnp.float32),
        )

    def lower(self, name: str, tokens: int):
        """`jax.stages.Lowered` of program (name, tokens) for abstract arguments."""
        return self._jit(name, tokens).lower(*self.abstract_args(tokens))

    def _jit(self, name: str, tokens: int):
        shape, score = self.shape(tokens), name == "score"

        def fn(params, pool, seen, ints, floats, groups=None):
            return self._step_fn(params, pool, seen, ints, floats, shape, score, groups)

        return jax.jit(fn, donate_argnums=(1, 2))

    # ------------------------------------------------------------------ the program
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

    def _step_fn(self, params, pool, seen, ints, floats, shape: StepShape, score: bool, groups):
        f = unpack(shape, ints, floats)
        r = shape.seqs
        model = nnx.merge(self.graphdef, params)
        phase = "decode" if shape.tokens <= self.max_seqs else "prefill"
        hidden, _, cache = model(
            f["tokens"][None],
            cache=PagedCache(pool, paged_batch(f)),
            phase=phase,
            return_hidden=True,
            groups=groups,
        )
        hidden = hidden[0]  # [T, D]
        logits = self._limit(model.logits(hidden[f["last_index"]][None])[0])  # [R, V]

        # each sequence's seen-token set: its row's, emptied for a new sequence, plus the
        # tokens fed now; written back to the rows of the live sequences
        live = jnp.arange(r) < f["num_seqs"][0]
        rows = jnp.clip(f["rows"], 0, self.max_seqs - 1)
        seen_rows = jnp.where(f["reset"][:, None] > 0, False, seen[rows])
        valid = f["valid"] > 0
        fed_seq = jnp.where(valid, f["seq_ids"], r)  # padding: dropped
        seen_rows = seen_rows.at[fed_seq, f["tokens"]].max(valid, mode="drop")

        keys = jax.lax.bitcast_convert_type(f["keys"], jnp.uint32)
        kd = jax.vmap(lambda d, i: jax.random.fold_in(jax.random.wrap_key_data(d), i))(
            keys, f["count"]
        )
        tok = sample_rows(
            logits, kd, f["temperature"], f["top_k"], f["top_p"], f["repetition_penalty"],
            seen_rows,
        )  # fmt: skip
        seen_rows = seen_rows.at[jnp.arange(r), tok].max(f["sample"] > 0)
        seen = seen.at[jnp.where(live, rows, self.max_seqs)].set(seen_rows, mode="drop")
        lp, top_ids, top_lp = self._logprobs(logits, tok)
        out = ((tok, lp), (top_ids, top_lp))
        if score:
            every = self._limit(model.logits(hidden[None])[0])  # [T, V]
            out = out + (self._logprobs(every, f["next_tokens"]),)
        return self._pin(cache.pool), self._rep(seen), self._rep(out)

    # ------------------------------------------------------------------ host-side calls
    def step(self, work: StepWork, score: bool = False):
        """Runs one step. Returns device arrays ((tokens [R], logprobs [R]), (top ids, top
        logprobs [R, N])) and, for `score`, (prompt logprobs [T], top ids, top logprobs
        [T, N]) over the stream."""
        return self.step_packed(work.shape.tokens, *work.pack(), score)

    def step_packed(self, tokens: int, ints, floats, score: bool = False):
        """`step` from `StepWork.pack()`'s arrays (what a multi-host follower receives)."""
        name = "score" if score else "step"
        exe = self._exe.get((name, tokens))
        if exe is None:
            if (name, tokens) not in self.programs:
                raise ValueError(f"no program {name}[{tokens}] (programs: {self.programs})")
            exe = self._compile(name, tokens)
        args = (self.params, self.pool, self.seen, self._put(ints), self._put(floats))
        if self.group_arrays:
            args += (self._groups,)
        self.pool, self.seen, out = exe(*args)
        return out

    def set_params(self, params) -> None:
        """Runs the programs on `params` from now on: an nnx.State of the same tree, shapes,
        dtypes and shardings as the model's (e.g. the arrays a train step just updated, so RL
        rollouts decode the very weights being trained, with no copy). The compiled programs
        stay valid: params are an argument, never a constant. ValueError on a mismatch."""
        old = jax.tree.structure(self.params)
        if jax.tree.structure(params) != old:
            raise ValueError("set_params: the parameter tree differs from the engine's model's")
        for a, b in zip(jax.tree.leaves(self.params), jax.tree.leaves(params), strict=True):
            if (a.shape, a.dtype) != (b.shape, b.dtype):
                raise ValueError(
                    f"set_params: a parameter of shape {b.shape} {b.dtype} replaces one of "
                    f"{a.shape} {a.dtype}"
                )
        self.params = params
        self._groups = self._split_groups(params)

    def state_ok(self) -> bool:
        """Whether the device state is still there: a program that failed after taking its
        donated buffers leaves none, and nothing more can run."""
        return not any(a.is_deleted() for a in jax.tree.leaves((self.pool, self.seen)))

    def describe(self) -> str:
        per_token = pool_bytes_per_token(self.cfg, self.cache_dtype)
        progs = ", ".join(f"{n}[{t}]" for n, t in self.programs)
        return (
            f"{self.executables} executables ({progs}) compiled in {self.compile_seconds:.1f}s; "
            f"page pool {self.num_pages - 1} pages x {self.page_size} tokens = "
            f"{self.pool_tokens} tokens ({self.cache_dtype}, "
            f"{per_token * self.pool_tokens / 2**20:.1f} MiB); {self.max_seqs} sequences of up "
            f"to {self.max_len} tokens; {self.plan.describe()}"
        )
