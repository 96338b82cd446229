"""The KV cache: keys and values of the KV-producing layers only (one per CLA group), in the
compute dtype or int8 with per-token, per-head scales, and its layout on a mesh.

    cache = model.init_cache(batch=4, max_len=2048, dtype="int8")
    logits, _, cache = model(tokens, cache=cache, phase="prefill")

k, v: [groups, batch, max_len, kv_heads, head_dim]; index: [batch] the next slot to write. A
row's token at position p lives in slot p, so a query at position p attends to slots <= p. The
keys are RoPE-rotated but not key-normed: each layer of a group applies its own key-norm.

The serving engine's cache is `PagedCache`: a pool of fixed-size pages (`kernels.paged.PagedKV`,
one pool per CLA group stacked on a leading axis) and where one step's tokens sit in it
(`kernels.paged.PagedBatch`). Its pages hold the weight-free normalised key k / rms(k), so one
page serves every layer of a group; each layer folds its key-norm weight into its query.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from hunyuan_jax.model.config import ModelConfig
from hunyuan_jax.model.kernels.paged import PagedBatch, PagedKV

CACHE_DTYPES = ("auto", "bfloat16", "float32", "int8")


class QuantizedKV(NamedTuple):
    """An int8 cache tensor with one float32 scale per (token, kv head): x ~= values * scale.

    values: [..., max_len, kv_heads, head_dim] int8 (symmetric, round-to-nearest, +-127);
    scale:  [..., kv_heads, max_len] float32 = max|x| over head_dim / 127. The slot axis is the
    minor one so the scales tile densely on TPU (a minor axis of kv_heads=8 would pad to 128).
    A pytree like any NamedTuple, so it slices and stacks through the layer scan as an array does.
    """

    values: jax.Array
    scale: jax.Array

    SCALE_LOGICAL_AXES = ("cache_layers", "cache_batch", "cache_kv_heads", "cache_length")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def dtype(self):
        return self.values.dtype

    @classmethod
    def quantize(cls, x: jax.Array) -> QuantizedKV:
        """x: [..., S, KVH, Dh] -> int8 values and scales [..., KVH, S]."""
        x32 = x.astype(jnp.float32)
        amax = jnp.max(jnp.abs(x32), axis=-1)  # [..., S, KVH]
        scale = jnp.where(amax > 0, amax, 1.0) / 127.0
        q = jnp.clip(jnp.round(x32 / scale[..., None]), -127, 127).astype(jnp.int8)
        return cls(q, jnp.swapaxes(scale, -1, -2))

    def dequantize(self, dtype) -> jax.Array:
        scale = jnp.swapaxes(self.scale, -1, -2)[..., None]  # [..., T, KVH, 1]
        return (self.values.astype(jnp.float32) * scale).astype(dtype)


class KVCache(NamedTuple):
    """Keys (roped, un-normed) and values of the KV-producing layers, plus the write index."""

    k: jax.Array | QuantizedKV
    v: jax.Array | QuantizedKV
    index: jax.Array

    LOGICAL_AXES = ("cache_layers", "cache_batch", "cache_length", "cache_kv_heads", None)

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, dtype) -> KVCache:
        """dtype: a float dtype, or `int8` for a quantised cache (QuantizedKV)."""
        dtype = jnp.dtype(dtype)
        shape = (cfg.num_groups, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        index = jnp.zeros((batch,), jnp.int32)
        if dtype == jnp.int8:
            scale_shape = (cfg.num_groups, batch, cfg.num_kv_heads, max_len)

            def make():
                return QuantizedKV(jnp.zeros(shape, jnp.int8), jnp.zeros(scale_shape, jnp.float32))

            return cls(make(), make(), index)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), index)

    @property
    def quantized(self) -> bool:
        return isinstance(self.k, QuantizedKV)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.index.shape[0]


def write_rows(cache, new: jax.Array, index: jax.Array):
    """cache[b, index[b] : index[b] + S] = new[b] for every row b (quantising for int8)."""

    def write(c, n, i):
        return jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (i, 0, 0))

    if isinstance(cache, QuantizedKV):
        q = QuantizedKV.quantize(new)

        def write_scale(c, n, i):
            return jax.lax.dynamic_update_slice(c, n, (0, i))

        return QuantizedKV(
            jax.vmap(write)(cache.values, q.values, index),
            jax.vmap(write_scale)(cache.scale, q.scale, index),
        )
    return jax.vmap(write)(cache, new, index)


def cache_specs(cache: KVCache, plan):
    """PartitionSpecs of every array of `cache` from its logical axes and the plan."""

    def spec(t, axes):
        return plan.spec(axes, t.shape, "kv cache")

    def tensor(t):
        if isinstance(t, QuantizedKV):
            return QuantizedKV(
                spec(t.values, KVCache.LOGICAL_AXES), spec(t.scale, QuantizedKV.SCALE_LOGICAL_AXES)
            )
        return spec(t, KVCache.LOGICAL_AXES)

    return KVCache(tensor(cache.k), tensor(cache.v), spec(cache.index, ("cache_batch",)))


def cache_shardings(cache: KVCache, plan):
    """Shardings of every array of `cache` (one device without a mesh)."""
    if plan.mesh is None:
        return jax.tree.map(lambda _: plan.replicated(), cache)
    return jax.tree.map(
        lambda s: jax.sharding.NamedSharding(plan.mesh, s),
        cache_specs(cache, plan),
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )


def bytes_per_token(cfg: ModelConfig, dtype) -> dict[str, int]:
    """Bytes one token occupies in the cache, from the real cache shapes (jax.eval_shape: no
    memory): {'kv': K/V payload, 'scales': int8 scales (0 otherwise), 'total': both}."""
    batch, length = 2, 4
    cache = jax.eval_shape(lambda: KVCache.zeros(cfg, batch, length, dtype))
    kv = scales = 0
    for t in (cache.k, cache.v):
        if isinstance(t, QuantizedKV):
            kv += t.values.size * t.values.dtype.itemsize
            scales += t.scale.size * t.scale.dtype.itemsize
        else:
            kv += t.size * t.dtype.itemsize
    per = batch * length
    return {"kv": kv // per, "scales": scales // per, "total": (kv + scales) // per}


class PagedCache(NamedTuple):
    """The engine's cache for one model call: the page pool of every CLA group, one array
    (`pool.kv` [groups * pages, page_size, 2 * kv_heads, head_dim]: group g's pages are
    g * pages onwards) and this call's token placement (its slots and page indices count
    within one group's pages)."""

    pool: PagedKV
    batch: PagedBatch

    @staticmethod
    def zeros_pool(
        cfg: ModelConfig, num_pages: int, page_size: int, dtype, head_dim: int | None = None
    ) -> PagedKV:
        """An empty pool of `num_pages` pages for each KV-producing layer (CLA group), one
        array; dtype a float dtype or int8; head_dim: the stored head dim (default the
        model's; `paged.pool_head_dim` pads it to the TPU's lanes)."""
        pages = cfg.num_groups * num_pages
        hd = head_dim or cfg.head_dim
        return PagedKV.zeros(pages, page_size, cfg.num_kv_heads, hd, dtype)


def pool_shardings(pool: PagedKV, plan):
    """Shardings of a page pool (replicated without a mesh)."""
    if plan.mesh is None:
        return jax.tree.map(lambda _: plan.replicated(), pool)

    def named(t, axes):
        return jax.sharding.NamedSharding(plan.mesh, plan.spec(axes, t.shape, "page pool"))

    scale = None if pool.scale is None else named(pool.scale, PagedKV.SCALE_LOGICAL_AXES)
    return PagedKV(named(pool.kv, PagedKV.LOGICAL_AXES), scale)


def pool_bytes_per_token(cfg: ModelConfig, dtype) -> int:
    """Bytes one token takes in a page pool (K and V of every group, int8 scales included)."""
    pool = jax.eval_shape(lambda: PagedCache.zeros_pool(cfg, 2, 8, dtype))
    return sum(t.size * t.dtype.itemsize for t in jax.tree.leaves(pool)) // 16
