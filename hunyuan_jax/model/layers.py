"""Building blocks shared by the attention and MoE code: parameters with logical axis names,
RMSNorm (float32 statistics), rotary position embedding with the NTK-alpha base, SwiGLU MLP.

Every parameter is an `nnx.Param` carrying `logical_axes` metadata (one name per dimension);
`sharding.rules` is the one place that maps those names onto mesh axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from hunyuan_jax.model import qops
from hunyuan_jax.model.config import ModelConfig
from hunyuan_jax.model.policy import RuntimePolicy


def param(
    rngs: nnx.Rngs | None,
    shape: tuple[int, ...],
    logical_axes: tuple[str | None, ...],
    dtype,
    std: float | None,
) -> nnx.Param:
    """A parameter initialised N(0, std^2) (or ones when std is None) with its logical axes."""
    if len(shape) != len(logical_axes):
        raise ValueError(f"shape {shape} and logical axes {logical_axes} differ in rank")
    if std is None:
        value = jnp.ones(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(logical_axes))


# The matmul weights, known by their logical axes: (input axes, output axes) of every weight a
# matmul reads through `qops` (the input axes are what it contracts), after the leading stacked
# axes in BATCH_AXES (the scanned layer groups, the routed experts). Every other parameter
# (router, norms, embedding, an untied lm_head) is no matmul weight: quantization
# (`quantize.matmul_weights`) and LoRA adapters (`lora`) leave it alone.
BATCH_AXES = ("layers", "exp")
MATMULS = (
    (("embed",), ("heads", "head_dim")),  # q_proj: bsd,dnh->bsnh (transformer.py)
    (("embed",), ("kv_heads", "head_dim")),  # k_proj, v_proj
    (("heads", "head_dim"), ("embed",)),  # o_proj: bsnh,nhd->bsd
    (("embed",), ("mlp",)),  # shared expert gate_proj, up_proj: x @ w (MLP)
    (("mlp",), ("embed",)),  # shared expert down_proj
    (("exp_embed",), ("exp_mlp",)),  # routed gate_proj, up_proj: ragged_dot [E, D, F] (moe.py)
    (("exp_mlp",), ("exp_embed",)),  # routed down_proj [E, F, D]
)


def matmul_of(logical_axes) -> tuple[int, tuple[int, ...]] | None:
    """(index in `MATMULS`, positions of the dims it contracts) of a matmul weight with
    `logical_axes`, or None when the parameter is no matmul weight."""
    axes = tuple(logical_axes)
    batch = 0
    while batch < len(axes) and axes[batch] in BATCH_AXES:
        batch += 1
    for index, (inputs, outputs) in enumerate(MATMULS):
        if axes[batch:] == inputs + outputs:
            return index, tuple(range(batch, batch + len(inputs)))
    return None


def contracted_dims(logical_axes) -> tuple[int, ...] | None:
    """Positions of the dims a matmul weight with `logical_axes` contracts, or None."""
    found = matmul_of(logical_axes)
    return None if found is None else found[1]


class RMSNorm(nnx.Module):
    """y = cast(x32 * rsqrt(mean(x32^2) + eps), x.dtype) * weight."""

    def __init__(self, dim: int, eps: float, param_dtype):
        self.weight = param(None, (dim,), ("norm",), param_dtype, None)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * qops.cast(self.weight[...], x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """inv_freq = 1 / base^(2i/d) with base = theta * alpha^(d/(d-2)), in float32."""
    d = cfg.head_dim
    exponents = jnp.arange(0, d, 2, dtype=jnp.float32) / d
    return 1.0 / (jnp.float32(cfg.rope_base) ** exponents)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """NeoX (rotate-half) rotary embedding. x: [B, S, N, Dh]; positions: [B, S]."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, S, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); the shared expert of the MoE block."""

    def __init__(self, cfg: ModelConfig, policy: RuntimePolicy, *, rngs: nnx.Rngs):
        d, f, std = cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range
        pdt = jnp.dtype(policy.param_dtype)
        self.compute_dtype = jnp.dtype(policy.compute_dtype)
        self.gate_proj = param(rngs, (d, f), ("embed", "mlp"), pdt, std)
        self.up_proj = param(rngs, (d, f), ("embed", "mlp"), pdt, std)
        self.down_proj = param(rngs, (f, d), ("mlp", "embed"), pdt, std)

    def __call__(self, x: jax.Array, lora_key=None) -> jax.Array:
        w = lambda name: qops.weight(self, name, self.compute_dtype, lora_key)
        gate = checkpoint_name(qops.matmul(x, w("gate_proj")), "mlp_gate")
        up = checkpoint_name(qops.matmul(x, w("up_proj")), "mlp_up")
        return checkpoint_name(qops.matmul(jax.nn.silu(gate) * up, w("down_proj")), "mlp_down")
