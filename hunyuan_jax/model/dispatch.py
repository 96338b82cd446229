"""The one place where kernels are chosen: how the routed experts run (per phase and sharding
plan) and which attention implementation serves a call (per policy, platform and shape).

    experts_fn = experts_fn_for("train", cfg, policy, plan, num_tokens)

| phase | plan shards the experts | one device / experts not sharded |
|---|---|---|
| train | expert parallel, `policy.train_dispatch` (all-to-all with capacity routing, or gather) | capacity routing with random compensation |
| prefill / decode | expert parallel `gather` (dropless) | per-token experts when tokens x k <= experts; row tiles on CPU; `ragged_dot` elsewhere |

Where a chip's grouped matmul cannot take float8 values (`FLOAT8_RAGGED_DOT_FAILS`: TPU7x),
the serving phases' `ragged_dot` strategies get fp8 expert weights cast to the activations'
dtype first (exact; `moe.float8_as_activations`).

Inference is always dropless and exact; training follows the report's capacity routing.

Attention (`attention_impl_for`): `policy.attention` when it names one (xla | flash | splash);
`auto` picks xla while attention-probability dropout is on (the kernels have none), splash on TPU
for plain causal self-attention whose length (with context parallelism, when the plan shards
`length`: each device's query chunk over all keys) is a multiple of 128, flash when a call's score
matrix would be large (>= FLASH_MIN_SCORES per row and head: long training rows, long prefill
chunks against a long cache), else xla (decode steps, short calls).

Paged attention (the serving engine, `paged_attention_impl_for`): jax's ragged paged attention
Pallas kernel on TPU for a float page pool, on one chip or, on a mesh, per chip under shard_map
with the kv heads split over the tensor axes (`paged.attend(..., plan=)`), when every chip gets
whole K/V pairs and the kernel can tile them (`paged.pallas_unsupported`); the plain-JAX path
otherwise (CPU, an int8 pool whose per-token scales the kernel cannot take, head_dim not a
multiple of 128 in the pool (the engine pads it on TPU: `paged.pool_head_dim`), kv heads that
do not divide the tensor axes).

The model calls both once per forward (`HunyuanForCausalLM.__call__(phase=...)`); nothing else
decides them.
"""

from __future__ import annotations

from hunyuan_jax.model import expert_parallel, moe
from hunyuan_jax.model.config import ModelConfig
from hunyuan_jax.model.kernels import paged
from hunyuan_jax.model.policy import RuntimePolicy

PHASES = ("train", "prefill", "decode")


# Chips whose XLA grouped matmul (`jax.lax.ragged_dot`) cannot take float8 expert values: the
# serving phases cast them to the activations' dtype first (`moe.float8_as_activations`).
# TPU7x (libtpu 0.0.52): the ragged dot of bf16 rows by e4m3 values sizes its tiles to the
# scoped VMEM limit and overshoots it (CompileTimeScopedVmemOom, "it should not be possible to
# run out of scoped vmem"): the A52B's down projection at tensor=8, [M, 2288] @ [16, 2288,
# 6400], needs 32.18 MiB of the 32 at M = 128 and 32.62 at M = 1024 and 4096, while bf16 values
# of the same shape compile. Raising the limit (xla_tpu_scoped_vmem_limit_kib) only moves the
# failure: 40 MiB failed other buckets (32, 512), 48 and 64 MiB failed M = 128 / 4096.
FLOAT8_RAGGED_DOT_FAILS = ("TPU7x",)


def experts_fn_for(
    phase: str, cfg: ModelConfig, policy: RuntimePolicy, plan, num_tokens: int
) -> moe.ExpertsFn:
    """The `moe.ExpertsFn` for a forward of `num_tokens` tokens in `phase`."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    fn = _experts_fn(phase, cfg, policy, plan, num_tokens)
    grouped = fn not in (moe.few_token_experts, moe.tiled_experts)  # these run no ragged dot
    if phase != "train" and grouped and _float8_ragged_dot_fails(plan):
        return moe.float8_as_activations(fn)  # a no-op for weights not stored float8
    return fn


def _experts_fn(phase, cfg, policy, plan, num_tokens) -> moe.ExpertsFn:
    if plan.shards("exp"):
        strategy = policy.train_dispatch if phase == "train" else "gather"
        return expert_parallel.make_expert_parallel_fn(plan, strategy, policy.capacity_factor)
    if phase == "train":
        return moe.make_capacity_experts(policy.capacity_factor)
    if num_tokens * cfg.moe_top_k <= cfg.num_experts:
        return moe.few_token_experts  # reads only the chosen experts' weights
    if plan.platform == "cpu":
        return moe.tiled_experts  # XLA:CPU's ragged_dot lowering is slow
    return moe.dropless_experts


def _float8_ragged_dot_fails(plan) -> bool:
    devices = getattr(plan, "devices", ()) if plan.platform == "tpu" else ()  # none: not known
    return bool(devices) and devices[0].device_kind in FLOAT8_RAGGED_DOT_FAILS


FLASH_MIN_SCORES = 1 << 20  # S * T above which `auto` uses flash instead of materialised scores


def attention_impl_for(
    policy: RuntimePolicy, plan, mask, num_queries: int, num_keys: int, dropout: bool
) -> str:
    """'xla' | 'flash' | 'splash' for one forward's attention calls."""
    if policy.attention != "auto":
        return policy.attention
    if dropout:
        return "xla"
    # context parallelism: a query chunk of num_queries / size("length") rows over all keys
    chunk, rest = divmod(num_queries, plan.size("length"))
    if plan.platform == "tpu" and mask.causal_self and not rest and chunk % 128 == 0:
        return "splash"
    if plan.shards("length") and num_queries > 1:
        return "flash"  # the pure-JAX kernel takes a chunk's positions
    if num_queries > 1 and num_queries * num_keys >= FLASH_MIN_SCORES:
        return "flash"
    return "xla"


def paged_attention_impl_for(policy: RuntimePolicy, plan, pool) -> str:
    """'xla' | 'pallas' for the paged attention of one engine step."""
    if policy.attention == "xla":
        return "xla"
    if plan.platform == "tpu" and paged.pallas_unsupported(pool, plan) is None:
        return "pallas"
    return "xla"
