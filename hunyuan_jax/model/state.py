"""Creating the model's parameter state: abstract (shapes only), random, or from arrays; on one
device or directly in its sharded layout.

Sharded creation runs the initialiser under `jax.jit` with the plan's output shardings, so each
device only ever materialises its own shards: no host holds the full tree. Reading checkpoints
is `hunyuan_jax.checkpoints.loading`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hunyuan_jax.model import quantize
from hunyuan_jax.model.config import LoraConfig, ModelConfig
from hunyuan_jax.model.lora import add_adapters
from hunyuan_jax.model.policy import RuntimePolicy
from hunyuan_jax.model.transformer import HunyuanForCausalLM
from sharding.plan import ShardingPlan


def abstract_model(
    cfg: ModelConfig,
    policy: RuntimePolicy | None = None,
    plan: ShardingPlan | None = None,
    *,
    weights: str | None = None,
    lora: LoraConfig | None = None,
) -> HunyuanForCausalLM:
    """The model with ShapeDtypeStructs instead of arrays (no memory, no compute): the one
    place it is built. Its matmul weights in form `weights` (default `policy.weights`;
    `hunyuan_jax.model.quantize`), with fresh LoRA adapters beside them when `lora` is given
    (a LoRA run's model: pass its frozen base's form, `lora.base_policy(policy).weights`)."""
    policy = policy or RuntimePolicy()
    form = policy.weights if weights is None else weights

    def build():
        model = HunyuanForCausalLM(cfg, policy, plan, rngs=nnx.Rngs(0))
        model = quantize.convert_model(model, form)
        return model if lora is None else add_adapters(model, lora, jax.random.key(0))

    return nnx.eval_shape(build)


def abstract_state(cfg: ModelConfig, policy=None, plan=None):
    """(graphdef, parameters as ShapeDtypeStructs carrying the plan's shardings)."""
    plan = ShardingPlan.or_single(plan)
    graphdef, state = nnx.split(abstract_model(cfg, policy, plan))
    return graphdef, plan.abstract(state)


def check_fits(plan: ShardingPlan, cfg: ModelConfig, policy=None) -> None:
    """ConfigError unless every parameter of `cfg`'s model (matmul weights in the form
    `policy.weights` names) divides the mesh axes `plan`'s rules put it on
    (`ShardingPlan.check_state`). train.py and the AOT tool call it before they create
    anything; the loaders meet the same check in `state_shardings`, before any array exists."""
    if plan.mesh is not None:
        plan.check_state(nnx.state(abstract_model(cfg, policy, ShardingPlan.single(plan.rules))))


def flat_shapes(model: nnx.Module) -> dict[tuple, tuple[int, ...]]:
    """{parameter path: shape}, e.g. ('groups', 'layers', 0, 'attn', 'q_proj'): (G, D, H, Dh)."""
    return {path: tuple(var.shape) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def param_count(model: nnx.Module) -> int:
    return sum(int(np.prod(s)) for s in flat_shapes(model).values())


def init_model(
    cfg: ModelConfig,
    policy: RuntimePolicy | None = None,
    plan: ShardingPlan | None = None,
    seed: int = 0,
) -> HunyuanForCausalLM:
    """Random parameters, created already sharded by the plan (matmul weights then converted
    to `policy.weights`)."""
    plan = ShardingPlan.or_single(plan)
    policy = policy or RuntimePolicy()
    graphdef, abstract = nnx.split(abstract_model(cfg, policy, plan))

    def create(key):
        model = HunyuanForCausalLM(cfg, policy, plan, rngs=nnx.Rngs(key))
        return nnx.state(quantize.convert_model(model, policy.weights))

    out_shardings = plan.state_shardings(abstract) if plan.is_sharded else None
    state = jax.jit(create, out_shardings=out_shardings)(jax.random.key(seed))
    return nnx.merge(graphdef, state)


def model_from_arrays(
    cfg: ModelConfig,
    arrays: dict[tuple, np.ndarray],
    policy: RuntimePolicy | None = None,
    plan: ShardingPlan | None = None,
) -> HunyuanForCausalLM:
    """A model whose parameters are `arrays` ({path: array}), placed by the plan."""
    plan = ShardingPlan.or_single(plan)
    graphdef, abstract = nnx.split(abstract_model(cfg, policy, plan))
    flat = nnx.to_flat_state(abstract)
    shardings = dict(nnx.to_flat_state(plan.state_shardings(abstract))) if plan.is_sharded else {}
    for path, var in flat:
        name = ".".join(map(str, path))
        if path not in arrays:
            raise KeyError(f"no array for parameter {name}")
        arr = arrays[path]
        if tuple(arr.shape) != tuple(var.shape):
            raise ValueError(
                f"parameter {name}: array shape {tuple(arr.shape)} != model shape "
                f"{tuple(var.shape)}"
            )
        if plan.is_sharded:
            value = jax.device_put(np.asarray(arr).astype(var.dtype), shardings[path].get_value())
        else:
            value = jnp.asarray(arr, var.dtype)
        var.set_value(value)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
