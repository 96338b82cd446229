"""The one choice of how the routed experts run, per phase and sharding plan.

    experts_fn = experts_fn_for("train", cfg, policy, plan, num_tokens)

| phase | plan shards the experts | one device / experts not sharded |
|---|---|---|
| train | expert parallel, `policy.train_dispatch` (all-to-all with capacity routing, or gather) | capacity routing with random compensation |
| prefill / decode | expert parallel `gather` (dropless) | per-token experts when tokens x k <= experts; row tiles on CPU; `ragged_dot` elsewhere |

Inference is always dropless and exact; training follows the report's capacity routing. The
model calls this once per forward (`HunyuanForCausalLM.__call__(phase=...)`); nothing else
decides it.
"""

from __future__ import annotations

from hunyuan_jax import moe
from hunyuan_jax.config import ModelConfig
from hunyuan_jax.policy import RuntimePolicy

PHASES = ("train", "prefill", "decode")


def experts_fn_for(
    phase: str, cfg: ModelConfig, policy: RuntimePolicy, plan, num_tokens: int
) -> moe.ExpertsFn:
    """The `moe.ExpertsFn` for a forward of `num_tokens` tokens in `phase`."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if plan.shards("exp"):
        from hunyuan_jax.expert_parallel import make_expert_parallel_fn

        strategy = policy.train_dispatch if phase == "train" else "gather"
        return make_expert_parallel_fn(plan, strategy, policy.capacity_factor)
    if phase == "train":
        return moe.make_capacity_experts(policy.capacity_factor)
    if num_tokens * cfg.moe_top_k <= cfg.num_experts:
        return moe.few_token_experts  # reads only the chosen experts' weights
    if plan.platform == "cpu":
        return moe.tiled_experts  # XLA:CPU's ragged_dot lowering is slow
    return moe.dropless_experts
