"""LoRA, the model side: low-rank adapters beside the frozen matmul weights, the frozen base's
form, and folding adapters into the base (merge). The config is `config.LoraConfig`; a LoRA
run's base (pointer, digest check, loading adapters beside a base) is
`hunyuan_jax.checkpoints.lora_base`.

    lcfg = LoraConfig(rank=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    add_adapters(model, lcfg, key, plan)   # in place: <name>_lora_a / _lora_b beside each target
    merged = merge_adapters(model)         # in place: W + alpha/rank * A @ B, adapters removed

Layout. An adapted weight `module.<name>` (float, bf16 or a quantized QArray) gets

    <name>_lora_a: nnx.LoRAParam [*batch, *contracted, r]   (float32; N(0, 1/fan_in))
    <name>_lora_b: nnx.LoRAParam [*batch, r, *out]          (float32; zeros: a new adapter is
                                                             exactly the base model)
    <name>_lora_scale = alpha / rank, <name>_lora_dropout    (static attributes; the dropout
                                                             drops the adapter path's input in
                                                             training, `qops.Adapted`)

where batch are the weight's stacked `layers` axis and the routed experts' `exp` axis, and
contracted / out its contracted and output dims (`layers.MATMULS`). Logical axes are the
weight's with None on the rank dim, so the sharding rules place adapters like their weights with
no new rule. `hunyuan_jax.model.qops.weight` reads such a weight as `Adapted` and every matmul adds
scale * (x A) B, for float and quantized (QLoRA) bases alike.

Why not qwix's `LoraProvider` / `apply_lora_to_model`: it creates the adapters lazily inside
the first intercepted `einsum` / `dot_general` call of each module, which in this model runs
inside `lax.scan` over the stacked layer groups (parameters created under the scan's trace do
not come back out into the stacked state), it has no `ragged_dot` (the routed experts), and
its adapters take the base weight's dtype (bf16 adapters for a bf16 base). Explicit adapters
use the same attribute names and the same nnx.LoRAParam type as qwix, and qwix still serves
the int8 / fp8 base (`hunyuan_jax.model.quantize`).

Targets: q_proj, k_proj, v_proj, o_proj (attention; the public recipe, the default), `shared`
(the shared expert's gate/up/down) and `experts` (every routed expert's gate/up/down).

Applying a run's adapters (`lora_base.load_adapted`: infer.py's and the server's --adapter through
`from_checkpoint.load`, `convert merge-lora`) first checks the base (`check_base`): the run's
architecture and the digest `lora_base.json` records, or refuses (CheckpointError) unless
`--allow-base-mismatch`.

The frozen base of a LoRA run (`base_policy`, `run_policy`): its matmul weights in bfloat16, or
as `runtime.weights` says (int8 / fp8: QLoRA), or as the base checkpoint stores them when it
stores them quantized (`hf-to-jax --quantize`); the other parameters as stored.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from hunyuan_jax.model import quantize
from hunyuan_jax.model.config import ATTENTION, TARGETS, LoraConfig

__all__ = ["ATTENTION", "TARGETS", "LoraConfig"]  # re-exported: the targets adapters take

_SUFFIXES = ("_lora_a", "_lora_b", "_lora_scale", "_lora_dropout")


# ----------------------------------------------------------------------------- which weights
def target_of(path: tuple, name: str) -> str:
    """The target a matmul weight belongs to: its own name for attention, else 'shared' or
    'experts'."""
    if name in ATTENTION:
        return name
    return "shared" if "shared" in tuple(map(str, path)) else "experts"


def targeted(model, lcfg: LoraConfig) -> Iterator[tuple[tuple, nnx.Module, str]]:
    """(module path, module, weight name) of every matmul weight the config adapts."""
    for path, module, name in quantize.matmul_weights(model):
        if target_of(path, name) in lcfg.targets:
            yield path, module, name


def adapted(model) -> Iterator[tuple[tuple, nnx.Module, str]]:
    """(module path, module, weight name) of every weight that has an adapter."""
    for path, module, name in quantize.matmul_weights(model):
        if getattr(module, name + "_lora_a", None) is not None:
            yield path, module, name


def adapter_layout(name: str, shape, axes, rank: int):
    """((A shape, A axes), (B shape, B axes)) for weight `name` of `shape` / logical `axes`
    (laid out [*batch, *contracted, *out])."""
    dims = quantize.contracted_dims(name, axes)
    lo, hi = dims[0], dims[-1] + 1
    if tuple(dims) != tuple(range(lo, hi)):
        raise ValueError(f"{name}: contracted dims {dims} of {tuple(axes)} are not contiguous")
    shape, axes = tuple(shape), tuple(axes)
    a = (shape[:hi] + (rank,), axes[:hi] + (None,))
    b = (shape[:lo] + (rank,) + shape[hi:], axes[:lo] + (None,) + axes[hi:])
    return a, b


# ----------------------------------------------------------------------------- adapters
def add_adapters(model, lcfg: LoraConfig, key: jax.Array, plan=None):
    """In place: a fresh adapter beside every targeted weight (A ~ N(0, 1/fan_in) with fan_in
    the contracted size, B = 0, float32), all created by one jitted call (on a sharded plan
    with the plan's output shardings: each device makes its own shards). Returns `model`."""
    sites = []
    for _, module, name in targeted(model, lcfg):
        axes = quantize.weight_axes(getattr(module, name))
        shape = _stored_shape(getattr(module, name))
        a, b = adapter_layout(name, shape, axes, lcfg.rank)
        fan_in = math.prod(shape[d] for d in quantize.contracted_dims(name, axes))
        sites.append((module, name, a, b, fan_in))

    def make(key):
        out = []
        for i, (_, _, (a_shape, _), (b_shape, _), fan_in) in enumerate(sites):
            a = jax.random.normal(jax.random.fold_in(key, i), a_shape, jnp.float32)
            out.append((a / math.sqrt(fan_in), jnp.zeros(b_shape, jnp.float32)))
        return out

    out_shardings = None
    if plan is not None and plan.is_sharded:
        place = lambda ax, sh: jax.sharding.NamedSharding(plan.mesh, plan.spec(ax, sh))
        out_shardings = [(place(a[1], a[0]), place(b[1], b[0])) for _, _, a, b, _ in sites]
    arrays = jax.jit(make, out_shardings=out_shardings)(key)
    for (module, name, (_, a_axes), (_, b_axes), _), (a, b) in zip(sites, arrays):
        setattr(module, name + "_lora_a", nnx.LoRAParam(a, logical_axes=a_axes))
        setattr(module, name + "_lora_b", nnx.LoRAParam(b, logical_axes=b_axes))
        setattr(module, name + "_lora_scale", lcfg.scale)
        setattr(module, name + "_lora_dropout", lcfg.dropout)
    return model


def _stored_shape(var) -> tuple[int, ...]:
    v = var[...]
    v = getattr(v, "array", v)  # WithAux(QArray)
    return tuple(v.shape)


def delta(a: jax.Array, b: jax.Array, num_batch: int) -> jax.Array:
    """A @ B over the rank dim, laid out like the weight: A = [*batch, *contracted, r] and
    B = [*batch, r, *out] (`num_batch` batch dims) -> [*batch, *contracted, *out]."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    nc, no = a.ndim - 1 - num_batch, b.ndim - 1 - num_batch
    batch, con = letters[:num_batch], letters[num_batch : num_batch + nc]
    out = letters[num_batch + nc : num_batch + nc + no]
    eq = f"{batch}{con}R,{batch}R{out}->{batch}{con}{out}"
    return jnp.einsum(eq, a, b, precision=jax.lax.Precision.HIGHEST)


def remove_adapters(model) -> None:
    for _, module, name in list(adapted(model)):
        for suffix in _SUFFIXES:
            if hasattr(module, name + suffix):
                delattr(module, name + suffix)


def merge_adapters(model, dtype=jnp.float32):
    """In place: every adapted weight becomes W + scale * A @ B, computed in float32 (a
    quantized base dequantized first) and stored in `dtype`, one weight at a time (jitted; the
    result keeps the weight's sharding); its adapter is removed. Returns `model`."""
    for _, module, name in list(adapted(model)):
        var = getattr(module, name)
        axes = quantize.weight_axes(var)
        w = _fold(
            var[...],
            getattr(module, name + "_lora_a")[...],
            getattr(module, name + "_lora_b")[...],
            num_batch=quantize.contracted_dims(name, axes)[0],
            scale=getattr(module, name + "_lora_scale"),
            dtype=jnp.dtype(dtype),
        )
        setattr(module, name, nnx.Param(w, logical_axes=axes))
    remove_adapters(model)
    return model


@functools.partial(jax.jit, static_argnames=("num_batch", "scale", "dtype"))
def _fold(w, a, b, *, num_batch: int, scale: float, dtype):
    d = delta(a.astype(jnp.float32), b.astype(jnp.float32), num_batch)
    return (quantize.dequantize(w) + scale * d).astype(dtype)


# ----------------------------------------------------------------------------- the frozen base
def base_policy(policy):
    """The policy of a LoRA run's frozen base: matmul weights as `policy.weights` says, bf16
    for 'auto' (the base is never a float32 master copy: nothing updates it)."""
    return policy if policy.weights != "auto" else policy.replace(weights="bf16")


def split(model):
    """(graphdef, adapters, frozen base) of a LoRA model: nnx.LoRAParam is what trains."""
    return nnx.split(model, nnx.LoRAParam, ...)
