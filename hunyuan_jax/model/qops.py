"""Weight reads and weight matmuls: the one place that knows how a matmul weight is stored.

What the parameter tree holds decides what runs (no flags in the model code):
- a float array: cast to the compute dtype, `jnp.einsum` / `@` / `jax.lax.ragged_dot` as usual;
- a qwix `QArray` (int8 / float8 values + per-channel scales, or int4 values + one scale per
  group along the contraction, `hunyuan_jax.model.quantize`): qwix's ops (`qwix.einsum`,
  `qwix.dot`), which dequantize next to the matmul (a float operand makes qwix take its
  dequantize-first path, for grouped scales too), and `ragged_dot` below for the grouped
  matmul;
- LoRA adapters stored beside a weight (`<name>_lora_a`, `<name>_lora_b` as `nnx.LoRAParam`,
  scale `<name>_lora_scale` = alpha / rank): the base product plus scale * (x A) B, for float
  and quantized (QLoRA) bases alike.

- a `sharding.gathered.Gathered` (a training weight whose FSDP gather is left to its matmul):
  the gather and the matmul in one `shard_map`, so the weight gradient is reduce-scattered;
  a `sharding.gathered.LocalShard` (a routed expert's shard inside the expert-parallel
  `shard_map`): the same for `einsum`, in the `shard_map` already running.

Model code reads a weight with `weight(module, "q_proj", dtype)` and multiplies with `einsum`,
`matmul`, `ragged_dot` or `take` from here.

A float32 weight read in bfloat16 is rounded by `cast` (bit-exact `astype`, written with
integer ops): XLA:TPU's bfloat16-propagation pass turns a plain convert of a scanned weight's
slice into a bf16 copy of the whole stacked weight made before the layer loop and kept through
the step (docs/tpu.md, "hoisted casts"); an integer read of the float32 slice cannot be
narrowed, so each layer group casts only its own slice, inside the loop.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import qwix

from sharding.gathered import Gathered, LocalShard

QArray = qwix.QArray


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["base", "a", "b", "key"],
    meta_fields=["scale", "rate"],
)
@dataclasses.dataclass(frozen=True)
class Adapted:
    """A weight with a LoRA adapter: base + scale * A @ B over the contracted dims (a pytree
    whose scale is static, so it enters `shard_map` / `jit` like the arrays it holds)."""

    base: jax.Array | QArray
    a: jax.Array  # [*batch, *contracted, r]
    b: jax.Array  # [*batch, r, *out]
    scale: float  # alpha / rank (static)
    key: jax.Array | None = None  # training: dropout on the adapter path's input
    rate: float = 0.0

    def lora_input(self, x):
        """x as the adapter path reads it: dropout (rate, key) in training, else x."""
        if self.key is None or self.rate == 0.0:
            return x
        keep = jax.random.bernoulli(self.key, 1.0 - self.rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)

    @property
    def shape(self):
        return self.base.shape


@jax.custom_vjp
def _round_to_bf16(x: jax.Array) -> jax.Array:
    """float32 -> bfloat16, round to nearest even (what `astype` does), from the bits."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    bits = bits + (jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1)))
    y = jax.lax.bitcast_convert_type((bits >> 16).astype(jnp.uint16), jnp.bfloat16)
    return jnp.where(jnp.isnan(x), jnp.bfloat16(jnp.nan), y)


def _round_fwd(x):
    return _round_to_bf16(x), None


def _round_bwd(_, g):
    return (g.astype(jnp.float32),)


_round_to_bf16.defvjp(_round_fwd, _round_bwd)


def cast(x: jax.Array, dtype) -> jax.Array:
    """`x.astype(dtype)`; float32 -> bfloat16 by `_round_to_bf16` (the same values and
    gradient), which XLA cannot hoist out of a layer loop as a stacked copy (module doc).
    A `Gathered` weight (already cast on its shard) stays one where the dtype agrees."""
    dtype = jnp.dtype(dtype)
    if isinstance(x, Gathered):
        return x.astype(dtype)
    if x.dtype == jnp.float32 and dtype == jnp.bfloat16:
        return _round_to_bf16(x)
    return x.astype(dtype)


def _stored(module, name: str):
    v = getattr(module, name)[...]
    array = getattr(v, "array", None)  # qwix's PTQ wrapper (WithAux) around a QArray
    if not isinstance(array, QArray):
        return v
    # a quantized weight's parts left to their matmul (`Gathered`) are gathered here: qwix
    # multiplies plain arrays (an int4 weight's grouped scales carry the embed axis)
    return jax.tree.map(
        lambda a: a.materialize() if isinstance(a, Gathered) else a,
        array,
        is_leaf=lambda a: isinstance(a, Gathered),
    )


def weight(module, name: str, dtype, lora_key=None):
    """`module.<name>` as a matmul uses it: a float array cast to `dtype`, a QArray whose
    scales are cast to `dtype` (so the dequantized operand is `dtype`), or `Adapted`
    (`lora_key`, in training: the adapter's dropout key, folded with the weight's name)."""
    v = _stored(module, name)
    v = v.astype(dtype) if isinstance(v, QArray) else cast(v, dtype)  # a QArray: its scales
    a = getattr(module, name + "_lora_a", None)
    if a is None:
        return v
    b = getattr(module, name + "_lora_b")
    rate = getattr(module, name + "_lora_dropout", 0.0)
    key = None
    if lora_key is not None and rate > 0:
        key = jax.random.fold_in(lora_key, zlib.crc32(name.encode()))
    scale = getattr(module, name + "_lora_scale")
    return Adapted(v, cast(a[...], dtype), cast(b[...], dtype), scale, key, rate)


def _base_einsum(eq, x, w, **kw):
    if isinstance(w, (Gathered, LocalShard)):
        return w.einsum(eq, x, **kw)
    if isinstance(w, QArray):
        return qwix.einsum(eq, x, w, **kw)
    return jnp.einsum(eq, x, w, **kw)


def einsum(eq: str, x, w, **kw):
    """`jnp.einsum(eq, x, w)` for any stored weight (activations first, weight second)."""
    if not isinstance(w, Adapted):
        return _base_einsum(eq, x, w, **kw)
    ins, out = eq.split("->")
    lhs, rhs = ins.split(",")
    batch = "".join(c for c in rhs if c in lhs and c in out)
    contracted = "".join(c for c in rhs if c in lhs and c not in out)
    rest = "".join(c for c in rhs if c not in lhs)
    lora_eq = f"{lhs},{batch}{contracted}r,{batch}r{rest}->{out}"
    delta = jnp.einsum(lora_eq, w.lora_input(x), w.a, w.b)
    return _base_einsum(eq, x, w.base, **kw) + w.scale * delta


def matmul(x, w):
    """`x @ w` for any stored weight."""
    if isinstance(w, Adapted):
        return matmul(x, w.base) + w.scale * ((w.lora_input(x) @ w.a) @ w.b)
    if isinstance(w, Gathered):
        return w.matmul(x)
    return qwix.dot(x, w) if isinstance(w, QArray) else x @ w


def ragged_dot(x, w, group_sizes):
    """`jax.lax.ragged_dot(x, w, group_sizes)` for any stored (stacked expert) weight."""
    if isinstance(w, Adapted):
        xa = jax.lax.ragged_dot(w.lora_input(x), w.a, group_sizes)
        delta = jax.lax.ragged_dot(xa, w.b, group_sizes)
        return ragged_dot(x, w.base, group_sizes) + w.scale * delta
    if isinstance(w, QArray):
        return _quantized_ragged_dot(x, w, group_sizes)
    return jax.lax.ragged_dot(x, w, group_sizes)


def _quantized_ragged_dot(x, w: QArray, group_sizes):
    """x [M, K] times each row's group of `w` (values [G, K, N]).

    Per-channel scales [G, 1, N] (int8, fp8): (x @ values) * scales[group of the row]. The
    stored values enter the grouped matmul as they are and the scales multiply its float32
    output rows, so no dequantized copy of every group's weights is written and read back
    (qwix.ragged_dot dequantizes first, and XLA:TPU does not fuse that into the ragged dot:
    docs/performance.md has the AOT tool's figure).

    Grouped scales [G, K / group, N] (int4): a row's output sums over K groups with different
    scales, so no output-row factor exists; the (local) experts' weights are dequantized in
    x's dtype (values x scales, the dtype `weight` cast the scales to) and the grouped matmul
    runs on them. XLA may fuse the dequantize into the matmul's operand or write one layer's
    local experts in x's dtype as a temporary (docs/quantization.md)."""
    g, _, n = w.shape
    if tuple(w.scale.shape) == (g, 1, n):
        y = jax.lax.ragged_dot(x, w.qvalue, group_sizes, preferred_element_type=jnp.float32)
        row_group = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(x.shape[0]), side="right")
        scale = w.scale[:, 0, :].astype(jnp.float32)[jnp.minimum(row_group, g - 1)]
        return (y * scale).astype(x.dtype)
    return jax.lax.ragged_dot(x, qwix.dequantize(w.astype(x.dtype)), group_sizes)


def float8_as(w, dtype):
    """`w` with float8 stored values cast to `dtype` (exact in bfloat16 / float32: every e4m3
    value is one of theirs), the scales unchanged; any other weight as it is. For a grouped
    matmul the compiler cannot take float8 values into (`dispatch.experts_fn_for`)."""
    if isinstance(w, QArray) and jnp.dtype(w.qvalue.dtype).name.startswith("float8"):
        return dataclasses.replace(w, qvalue=w.qvalue.astype(dtype))
    return w


def take(w, e):
    """w[e] along the leading (expert) axis, `e` one expert id or a vector of them (one gather),
    for arrays, QArrays and adapters alike: a decode step reads only the chosen experts'
    weights (and dequantizes only those)."""
    if isinstance(w, Adapted):
        return Adapted(take(w.base, e), take(w.a, e), take(w.b, e), w.scale, w.key, w.rate)
    if isinstance(w, QArray):
        return w[e]
    if jnp.ndim(e):
        return jnp.take(w, e, axis=0, mode="clip")  # one gather for a vector of experts
    return jax.lax.dynamic_index_in_dim(w, e, keepdims=False)
