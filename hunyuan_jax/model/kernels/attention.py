"""The attention interface: the mask (`AttentionMask`), the reference math (`reference_attention`,
the `xla` implementation) and the one dispatcher (`attend`) over xla / flash / splash.

Shapes everywhere: q [B, S, H, D] (RoPE'd, QK-normed), k, v [B, T, KVH, D] with H % KVH == 0;
query head h reads KV head h // (H // KVH). Output [B, S, H, D] in q.dtype. Scores are float32,
scaled by 1/sqrt(D); the softmax is float32; probabilities are cast to v.dtype before `@ v`.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from hunyuan_jax.model.kernels import flash, splash
from hunyuan_jax.model.kernels.mask import AttentionMask, check_shapes, shard_map_attention

__all__ = [
    "IMPLS",
    "RESIDUAL_NAMES",
    "AttentionMask",
    "attend",
    "kernel_layout",
    "reference_attention",
    "shard_map_attention",
]

_NEG_INF = float(jnp.finfo(jnp.float32).min)
IMPLS = ("xla", "flash", "splash")
# What the kernels' backward passes need, by checkpoint name (a remat policy that saves these
# runs no second forward of the attention).
RESIDUAL_NAMES = (*flash.RESIDUAL_NAMES, splash.RESIDUAL_NAME)


def kernel_layout(impl: str, plan, q_shape, k_shape) -> dict:
    """`attend`'s mesh arguments for a call on `plan`: flash / splash on a mesh run per device
    in shard_map, with q and K/V laid out by the plan (whole rows; heads over the tensor axes
    when both q and KV heads divide them); otherwise XLA partitions the call itself (splash
    cannot be partitioned that way, so it then runs head-less per batch shard). Splash off TPU
    (a CPU test mesh) runs in the Pallas interpreter."""
    if impl == "xla" or plan is None:
        return {}
    interpret = {"interpret": True} if impl == "splash" and plan.platform != "tpu" else {}
    if not plan.is_sharded:
        return interpret
    # q keeps the plan's `length` layout (context parallelism: each device its own query
    # chunk); K/V are whole rows (gathered over the length axes). Splash then runs its kernel
    # for the global causal mask with the mask's metadata split along q
    # (`splash.context_parallel_splash`).
    length = "length" if q_shape[1] == k_shape[1] else None
    q_spec = plan.activation_spec(("batch", length, "act_heads", None), q_shape)
    kv_spec = plan.activation_spec(("batch", None, "act_kv_heads", None), k_shape)
    if q_spec[0] != kv_spec[0] or q_spec[2] != kv_spec[2]:
        if impl != "splash":
            return {}
        q_spec = jax.sharding.PartitionSpec(q_spec[0], q_spec[1], None, None)
        kv_spec = jax.sharding.PartitionSpec(q_spec[0], None, None, None)
    return {"mesh": plan.mesh, "q_spec": q_spec, "kv_spec": kv_spec, **interpret}


def reference_attention(q, k, v, mask: AttentionMask, *, dropout=None) -> jax.Array:
    """The model's attention, materialising the [B, KVH, G, S, T] float32 scores.

    dropout: None or (rate, key): attention-probability dropout (training), applied to the
    float32 probabilities before the cast, exactly as the model does."""
    check_shapes(q, k, v, mask)
    b, s, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, s, kvh, h // kvh, d)
    scores = jnp.einsum("bsngh,btnh->bngst", qg, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(d))
    scores = jnp.where(mask.dense()[:, None, None, :, :], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout is not None:
        rate, key = dropout
        if key is not None and rate:
            keep = jax.random.bernoulli(key, 1.0 - rate, probs.shape)
            probs = jnp.where(keep, probs / (1.0 - rate), 0).astype(probs.dtype)
    probs = probs.astype(v.dtype)
    out = jnp.einsum("bngst,btnh->bsngh", probs, v)
    return out.reshape(b, s, h, d).astype(q.dtype)


def attend(
    q,
    k,
    v,
    mask: AttentionMask,
    *,
    impl: str = "xla",
    dropout=None,
    block_q: int | None = None,
    block_kv: int | None = None,
    mesh=None,
    q_spec=None,
    kv_spec=None,
    interpret: bool = False,
    fallback: bool = True,
) -> jax.Array:
    """Attention of q over k, v under `mask` by one implementation.

    impl:
      'xla'    reference_attention: any mask, dropout; O(S*T) memory for scores (and for their
               gradient). Use for decode (S=1) and small shapes. Auto-partitioned by XLA.
      'flash'  flash.flash_attention: blockwise, O(block) memory forward and backward, any
               mask; skips fully masked blocks. For CPU/GPU and long prefill against a long
               cache. block_q / block_kv: its block sizes (default 512).
      'splash' splash.splash_attention (Pallas TPU). Only `mask.causal_self` masks (training /
               prefill without cache; segments honoured) with S = T a multiple of 128;
               block_q / block_kv multiples of 128 dividing S (default 512/256/128).
               interpret=True runs the kernel in the Pallas interpreter (CPU tests).
               With q's length sharded (q_spec[1]: context parallelism) each device runs
               its query chunk over the whole K/V (`splash.context_parallel_splash`).
               When splash cannot serve the call (mask or shape) it raises
               splash.SplashUnsupported; with fallback=True (default) attend warns and uses
               flash with its default blocks.
    mesh, q_spec, kv_spec: run flash / splash per device under shard_map (see
    `shard_map_attention`). Without a mesh, splash needs per-device arrays (e.g. the caller is
    already inside shard_map); flash is then auto-partitioned, but its per-block skip test
    reduces over the batch, so a batch-sharded flash should get the mesh.
    dropout (rate, key) is supported by 'xla' only; other impls raise ValueError.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if dropout is not None and impl != "xla" and dropout[0] and dropout[1] is not None:
        raise ValueError(f"attention dropout is only implemented by impl='xla', not {impl!r}")
    if impl == "xla":
        return reference_attention(q, k, v, mask, dropout=dropout)

    def run(fn, **kwargs):
        local = lambda q, k, v, m: fn(q, k, v, m, **kwargs)
        if mesh is None:
            return local(q, k, v, mask)
        return shard_map_attention(local, q, k, v, mask, mesh=mesh, q_spec=q_spec, kv_spec=kv_spec)

    blocks = {n: x for n, x in (("block_q", block_q), ("block_kv", block_kv)) if x is not None}
    if impl == "splash" and q_spec is not None and len(q_spec) > 1 and q_spec[1] is not None:
        try:  # context parallelism: each device's query chunk over the gathered K/V
            return splash.context_parallel_splash(
                q,
                k,
                v,
                mask,
                mesh=mesh,
                q_spec=q_spec,
                kv_spec=kv_spec,
                interpret=interpret,
                **blocks,
            )
        except splash.SplashUnsupported as e:
            if not fallback:
                raise
            warnings.warn(f"splash cannot serve this call ({e}); using flash", stacklevel=2)
            return run(flash.flash_attention)
    if impl == "splash":
        try:
            splash.check_supported(q.shape, k.shape, mask, **blocks)
        except splash.SplashUnsupported as e:
            if not fallback:
                raise
            warnings.warn(f"splash cannot serve this call ({e}); using flash", stacklevel=2)
            return run(flash.flash_attention)
        return run(splash.splash_attention, interpret=interpret, **blocks)
    return run(flash.flash_attention, **blocks)
