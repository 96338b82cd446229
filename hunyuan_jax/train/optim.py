"""The optimizer: AdamW (fp32 state on fp32 master weights) with linear warmup and cosine decay
to a floor, global-norm clipping, a weight-decay mask (no decay on norm weights or other 1-D
parameters) and the report's expert-specific learning rates.

Expert-specific learning rates (SPEC 3). With the AdamW optimal-LR relation

    lr_opt(B) = 2 * lr_max / (sqrt(B_noise / B) + sqrt(B / B_noise)),

the shared expert trains at lr_opt(B) and each routed expert at lr_opt(B / n), n = experts /
top_k, since a routed expert sees about B / n of the batch's B tokens. `lr` in the config is the
rate of the dense parameters and the shared expert; the routed experts' updates are multiplied by
lr_opt(B / n) / lr_opt(B) (which tends to 1 / sqrt(n) = 1/4 for 16 experts when B << B_noise).

The factors are applied by a stateless transformation that multiplies each parameter's final
update (Adam step plus decoupled weight decay, already times the schedule) by a per-path
constant, which is exactly AdamW with per-group learning rates. One Adam state covers the whole
tree (the same tree decoding uses), instead of `optax.multi_transform`'s one state per group.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hunyuan_jax.model.config import ModelConfig
from hunyuan_jax.train.config import TrainConfig

ROUTED, SHARED, DENSE = "routed_expert", "shared_expert", "dense"
_ROUTED_LEAVES = ("gate_proj", "up_proj", "down_proj")


def lr_opt(batch: float, b_noise: float, lr_max: float = 1.0) -> float:
    """The AdamW optimal learning rate for batch size `batch` (SPEC 3)."""
    return 2.0 * lr_max / (math.sqrt(b_noise / batch) + math.sqrt(batch / b_noise))


def expert_lr_scales(tcfg: TrainConfig, mcfg: ModelConfig) -> dict[str, float]:
    """{group: factor on lr}: the configured factors, or the ones SPEC 3's rule derives."""
    n = mcfg.num_experts / mcfg.moe_top_k
    b = float(tcfg.tokens_per_step)
    if tcfg.lr_noise_batch_tokens is None:
        derived = 1.0 / math.sqrt(n)  # limit of lr_opt(B/n) / lr_opt(B) for B << B_noise
    else:
        derived = lr_opt(b / n, tcfg.lr_noise_batch_tokens) / lr_opt(b, tcfg.lr_noise_batch_tokens)
    shared = 1.0 if tcfg.shared_expert_lr_scale is None else tcfg.shared_expert_lr_scale
    routed = derived if tcfg.routed_expert_lr_scale is None else tcfg.routed_expert_lr_scale
    return {DENSE: 1.0, SHARED: shared, ROUTED: routed}


def _names(path) -> tuple[str, ...]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    if out and out[-1] == "value":  # nnx.Variable's pytree child
        out = out[:-1]
    return tuple(out)


def param_group(path) -> str:
    """'routed_expert' for moe.{gate,up,down}_proj, 'shared_expert' for moe.shared.*, else
    'dense'. `path`: a jax key path or a tuple of names."""
    names = _names(path) if path and not isinstance(path[0], str) else tuple(map(str, path))
    if "moe" in names:
        i = names.index("moe")
        rest = names[i + 1 :]
        if rest[:1] == ("shared",):
            return SHARED
        if len(rest) == 1 and rest[0] in _ROUTED_LEAVES:
            return ROUTED
    return DENSE


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def decays(path, leaf) -> bool:
    """Weight decay applies to matrices only: not to norm weights or other 1-D parameters
    (the stacked-layer axis does not count as a dimension)."""
    axes = leaf.get_metadata("logical_axes", None) if _is_var(leaf) else None
    names = _names(path)
    if axes is not None:
        dims = [a for a in axes if a != "layers"]
        return "norm" not in axes and len(dims) >= 2
    shape = getattr(leaf, "shape", ())
    ndim = len(shape) - (1 if names[:1] == ("groups",) else 0)
    return not any("norm" in n for n in names) and ndim >= 2


def decay_mask(params):
    """Same structure as `params` (nnx.State or plain tree), True where weight decay applies."""

    def f(path, leaf):
        m = decays(path, leaf)
        return leaf.replace(m) if _is_var(leaf) else m

    return jax.tree_util.tree_map_with_path(f, params, is_leaf=_is_var)


def scale_by_param_group(scales: dict[str, float]) -> optax.GradientTransformation:
    """Multiplies each update by its parameter group's factor (stateless; static per path)."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        updates = jax.tree_util.tree_map_with_path(
            lambda path, u: u * jnp.asarray(scales[param_group(_names(path))], u.dtype), updates
        )
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def make_schedule(tcfg: TrainConfig) -> optax.Schedule:
    """Learning rate of update `count` (0-based): linear warmup reaching `lr` at update
    warmup_steps (the first update already uses lr / warmup_steps, not 0), cosine decay to
    lr * min_lr_ratio at update decay_steps, constant after."""
    inner = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=tcfg.lr,
        warmup_steps=tcfg.warmup_steps,
        decay_steps=tcfg.total_decay_steps,
        end_value=tcfg.lr * tcfg.min_lr_ratio,
    )
    return lambda count: inner(count + 1)


class AdamState(NamedTuple):
    count: jax.Array
    mu: Any
    nu: Any


def scale_by_adam(
    b1: float, b2: float, eps: float, dtype: str | None = None
) -> optax.GradientTransformation:
    """Adam's update direction with both moments stored in `dtype` (None: the parameters'
    dtype). The arithmetic is float32 whatever the storage: each step reads the moments,
    updates them in float32 and rounds them back (round-to-nearest). With float32 storage this
    is optax.scale_by_adam exactly."""
    store = None if dtype is None else jnp.dtype(dtype)

    def init_fn(params):
        zeros = lambda p: jnp.zeros(p.shape, store or p.dtype)
        return AdamState(
            jnp.zeros((), jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params)
        )

    def update_fn(updates, state, params=None):
        del params
        f32 = lambda x: x.astype(jnp.float32)
        mu = jax.tree.map(lambda g, m: b1 * f32(m) + (1 - b1) * f32(g), updates, state.mu)
        nu = jax.tree.map(
            lambda g, v: b2 * f32(v) + (1 - b2) * jnp.square(f32(g)), updates, state.nu
        )
        count = state.count + 1
        c1 = 1 - b1 ** count.astype(jnp.float32)
        c2 = 1 - b2 ** count.astype(jnp.float32)
        out = jax.tree.map(
            lambda g, m, v: ((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype), updates, mu, nu
        )
        cast = lambda new, old: new.astype(old.dtype)
        return out, AdamState(
            count, jax.tree.map(cast, mu, state.mu), jax.tree.map(cast, nu, state.nu)
        )

    return optax.GradientTransformation(init_fn, update_fn)


class Optimizer(NamedTuple):
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    scales: dict[str, float]


def make_optimizer(tcfg: TrainConfig, mcfg: ModelConfig) -> Optimizer:
    """clip -> Adam moments -> decoupled weight decay (masked) -> -lr(step) -> group factor."""
    schedule = make_schedule(tcfg)
    scales = expert_lr_scales(tcfg, mcfg)
    parts = []
    if tcfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(tcfg.grad_clip))
    parts += [
        scale_by_adam(tcfg.b1, tcfg.b2, tcfg.eps, tcfg.opt_state_dtype),
        optax.add_decayed_weights(tcfg.weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(schedule),
        scale_by_param_group(scales),
    ]
    return Optimizer(optax.chain(*parts), schedule, scales)


def group_sizes(params) -> dict[str, int]:
    """Parameter counts per group (for logs)."""
    out = {DENSE: 0, SHARED: 0, ROUTED: 0}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        out[param_group(_names(path))] += int(math.prod(leaf.shape))
    return out


def active_params(mcfg: ModelConfig, params) -> int:
    """Parameters used per token: everything but the routed experts, plus top_k / E of them."""
    g = group_sizes(params)
    return int(g[DENSE] + g[SHARED] + g[ROUTED] * mcfg.moe_top_k / mcfg.num_experts)
