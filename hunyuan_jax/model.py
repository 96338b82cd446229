"""The Hunyuan-Large decoder in Flax NNX, top to bottom as in the paper.

    h = x + Attn(RMSNorm_in(x));  y = h + MoE(RMSNorm_post(h))      (each layer, pre-norm)
    logits = RMSNorm_final(h_L) @ embed^T                             (tied embeddings)

Attention: GQA, RoPE (NeoX, NTK-alpha base), QK-norm *after* RoPE, and cross-layer attention
(CLA): in each group of `cla_share_factor` consecutive layers only the first projects K/V; the
others reuse its roped, un-normed K and V and apply their own key-norm. The KV cache therefore
holds one K/V pair per group.

Layers are stored stacked per group (leading logical axis `layers`) and run with `lax.scan`
over groups, so trace and compile time do not grow with depth. One `nnx.State` holds every
parameter; training and decoding use the same tree.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from hunyuan_jax.config import ModelConfig
from hunyuan_jax.layers import RMSNorm, apply_rope, param, rope_inv_freq
from hunyuan_jax.moe import ExpertsFn, MoE
from sharding.rules import constrain

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}
_NEG_INF = float(jnp.finfo(jnp.float32).min)


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
    """Keys (roped, un-normed) and values of the KV-producing layers only.

    k, v: [groups, batch, max_len, kv_heads, head_dim] arrays (compute dtype), or `QuantizedKV`
    (int8 values of that shape plus per-token, per-head scales); index: [batch] next slot to
    write. A row's token at position p lives in slot p, so the causal mask is `slot <= position`.
    """

    k: jax.Array | QuantizedKV
    v: jax.Array | QuantizedKV
    index: jax.Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
        """dtype: default the compute dtype; `int8` gives a quantised cache (QuantizedKV)."""
        dtype = jnp.dtype(dtype or cfg.compute_dtype)
        shape = (cfg.num_groups, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        index = jnp.zeros((batch,), jnp.int32)
        if dtype == jnp.int8:
            scale_shape = (cfg.num_groups, batch, cfg.num_kv_heads, max_len)
            make = lambda: QuantizedKV(
                jnp.zeros(shape, jnp.int8), jnp.zeros(scale_shape, jnp.float32)
            )
            return cls(make(), make(), index)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), index)

    @property
    def quantized(self) -> bool:
        return isinstance(self.k, QuantizedKV)

    LOGICAL_AXES = ("cache_layers", "cache_batch", "cache_length", "cache_kv_heads", None)


# ----------------------------------------------------------------------------- attention
class Attention(nnx.Module):
    """GQA self-attention with QK-norm after RoPE; `produces_kv` marks a group's first layer."""

    def __init__(self, cfg: ModelConfig, produces_kv: bool, *, rngs: nnx.Rngs):
        d, h, kvh, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        std, pdt = cfg.initializer_range, jnp.dtype(cfg.param_dtype)
        self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, hd
        self.produces_kv = produces_kv
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        self.q_proj = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), pdt, std)
        if produces_kv:
            self.k_proj = param(rngs, (d, kvh, hd), ("embed", "kv_heads", "head_dim"), pdt, std)
            self.v_proj = param(rngs, (d, kvh, hd), ("embed", "kv_heads", "head_dim"), pdt, std)
        self.o_proj = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), pdt, std)
        self.query_norm = RMSNorm(hd, cfg.rms_norm_eps, pdt) if cfg.use_qk_norm else None
        self.key_norm = RMSNorm(hd, cfg.rms_norm_eps, pdt) if cfg.use_qk_norm else None

    def _w(self, p: nnx.Param) -> jax.Array:
        return p[...].astype(self.compute_dtype)

    def project_kv(self, x, positions, inv_freq):
        """The K/V this group shares: RoPE-rotated keys (not yet key-normed) and values."""
        k = jnp.einsum("bsd,dnh->bsnh", x, self._w(self.k_proj))
        v = jnp.einsum("bsd,dnh->bsnh", x, self._w(self.v_proj))
        return apply_rope(k, positions, inv_freq), v

    def __call__(self, x, k, v, positions, mask, inv_freq, rules=None, dropout=None):
        """x: [B,S,D]; k, v: [B,T,KVH,Dh] (shared, roped); mask: [B,S,T] bool -> [B,S,D].
        `dropout`: (rate, key) for attention-probability dropout in training, else None."""
        b, s, _ = x.shape
        q = jnp.einsum("bsd,dnh->bsnh", x, self._w(self.q_proj))
        q = apply_rope(q, positions, inv_freq)
        if self.query_norm is not None:
            q, k = self.query_norm(q), self.key_norm(k)
        q = constrain(q, ("batch", "length", "act_heads", None), rules)
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(b, s, self.num_kv_heads, groups, self.head_dim)
        scores = jnp.einsum("bsngh,btnh->bngst", q, k, preferred_element_type=jnp.float32)
        scores = scores / jnp.sqrt(jnp.float32(self.head_dim))
        scores = jnp.where(mask[:, None, None, :, :], scores, _NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1)
        if dropout is not None:
            probs = _dropout(probs, *dropout)
        probs = probs.astype(self.compute_dtype)
        out = jnp.einsum("bngst,btnh->bsngh", probs, v).reshape(b, s, self.num_heads, self.head_dim)
        out = checkpoint_name(out, "attn_out")
        return jnp.einsum("bsnh,nhd->bsd", out, self._w(self.o_proj))


# ----------------------------------------------------------------------------- decoder
class DecoderLayer(nnx.Module):
    """Pre-norm attention + pre-norm MoE, each with a residual connection."""

    def __init__(self, cfg: ModelConfig, produces_kv: bool, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.attention_dropout, self.hidden_dropout = cfg.attention_dropout, cfg.hidden_dropout
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt)
        self.attn = Attention(cfg, produces_kv, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt)
        self.moe = MoE(cfg, rngs=rngs)

    def __call__(
        self, x, kv, positions, mask, inv_freq, cache=None, rules=None, experts_fn=None, key=None
    ):
        """Returns (x, kv, moe stats). A KV-producing layer computes kv (and writes the cache).
        `key` (training only) drives dropout and the MoE's training-time routing."""
        keys = [None] * 4 if key is None else list(jax.random.split(key, 4))
        attn_drop = (
            None if key is None or not self.attention_dropout else (self.attention_dropout, keys[0])
        )
        h = self.input_norm(x)
        if self.attn.produces_kv:
            kv = self.attn.project_kv(h, positions, inv_freq)
            if cache is not None:
                kv = tuple(_write_rows(c, new, cache.index) for c, new in zip(cache[:2], kv))
        # An int8 cache travels quantised between the layers of a group (and out as the new
        # cache); each layer dequantises it for its own attention.
        attn_kv = tuple(
            t.dequantize(self.attn.compute_dtype) if isinstance(t, QuantizedKV) else t for t in kv
        )
        attn_out = self.attn(h, *attn_kv, positions, mask, inv_freq, rules, attn_drop)
        x = x + _dropout(attn_out, self.hidden_dropout, keys[1])
        x = constrain(x, ("batch", "length", "act_embed"), rules)
        moe_out, stats = self.moe(self.post_attn_norm(x), experts_fn, keys[2])
        x = x + _dropout(moe_out, self.hidden_dropout, keys[3])
        x = constrain(x, ("batch", "length", "act_embed"), rules)
        return x, kv, stats


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _write_rows(cache, new: jax.Array, index: jax.Array):
    """cache[b, index[b] : index[b] + S] = new[b] for every row b (quantising for int8)."""
    write = lambda c, n, i: jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (i, 0, 0))
    if isinstance(cache, QuantizedKV):
        q = QuantizedKV.quantize(new)
        write_scale = lambda c, n, i: jax.lax.dynamic_update_slice(c, n, (0, i))
        return QuantizedKV(
            jax.vmap(write)(cache.values, q.values, index),
            jax.vmap(write_scale)(cache.scale, q.scale, index),
        )
    return jax.vmap(write)(cache, new, index)


class DecoderGroup(nnx.Module):
    """`cla_share_factor` consecutive layers; the first one produces the shared K/V."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [
                DecoderLayer(cfg, produces_kv=(j == 0), rngs=rngs)
                for j in range(cfg.cla_share_factor)
            ]
        )

    def __call__(
        self, x, positions, mask, inv_freq, cache=None, rules=None, experts_fn=None, key=None
    ):
        kv, stats = None, []
        for j, layer in enumerate(self.layers):
            layer_key = None if key is None else jax.random.fold_in(key, j)
            x, kv, layer_stats = layer(
                x, kv, positions, mask, inv_freq, cache, rules, experts_fn, layer_key
            )
            stats.append(layer_stats)
        stats = jax.tree.map(lambda *s: jnp.stack(s), *stats)
        return x, kv, stats


def _make_groups(cfg: ModelConfig, rngs: nnx.Rngs) -> DecoderGroup:
    @nnx.split_rngs(splits=cfg.num_groups)
    @nnx.vmap(
        in_axes=(0,),
        out_axes=0,
        axis_size=cfg.num_groups,
        transform_metadata={nnx.PARTITION_NAME: "layers", "logical_axes": "layers"},
    )
    def make(rngs):
        return DecoderGroup(cfg, rngs=rngs)

    return make(rngs)


# ----------------------------------------------------------------------------- the LM
class HunyuanForCausalLM(nnx.Module):
    """Token ids -> float32 logits (and MoE statistics, and the updated KV cache if given)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, rules=None):
        self.cfg = cfg
        self.rules = rules  # logical -> mesh axis rules for activation constraints (or None)
        pdt = jnp.dtype(cfg.param_dtype)
        self.embed = param(
            rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdt, cfg.initializer_range
        )
        self.groups = _make_groups(cfg, rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else param(
                rngs,
                (cfg.hidden_size, cfg.vocab_size),
                ("embed", "vocab"),
                pdt,
                cfg.initializer_range,
            )
        )

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        cache: KVCache | None = None,
        experts_fn: ExpertsFn | None = None,
        key: jax.Array | None = None,
    ):
        """tokens [B, S] -> (logits [B, S, V] float32, stats, new cache or None).

        `key` turns on training behaviour (dropout; `experts_fn` gets per-layer keys); None is
        inference.

        Without a cache: causal attention within each segment (segment_ids, default one per
        row; positions default 0..S-1). With a cache: row b's tokens sit at positions
        cache.index[b] + (0..S-1) and attend to every earlier slot of that row.
        """
        cfg, rules = self.cfg, self.rules
        dtype = jnp.dtype(cfg.compute_dtype)
        b, s = tokens.shape
        if cache is not None:
            positions = cache.index[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]
            slots = jnp.arange(cache.k.shape[2], dtype=jnp.int32)
            mask = slots[None, None, :] <= positions[:, :, None]
        else:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            if segment_ids is None:
                segment_ids = jnp.ones((b, s), jnp.int32)
            idx = jnp.arange(s)
            mask = (idx[None, :, None] >= idx[None, None, :]) & (
                segment_ids[:, :, None] == segment_ids[:, None, :]
            )
        inv_freq = rope_inv_freq(cfg)

        x = jnp.take(self.embed[...].astype(dtype), tokens, axis=0)
        x = constrain(x, ("batch", "length", "act_embed"), rules)

        graphdef, stacked = nnx.split(self.groups)

        def body(x, xs):
            group_state, group_cache, g = xs
            group = nnx.merge(graphdef, group_state)
            layer_cache = None if group_cache is None else KVCache(*group_cache, cache.index)
            group_key = None if key is None else jax.random.fold_in(key, g)
            x, kv, stats = group(
                x, positions, mask, inv_freq, layer_cache, rules, experts_fn, group_key
            )
            return x, (stats, kv if cache is not None else None)

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
        xs = (
            stacked,
            None if cache is None else (cache.k, cache.v),
            jnp.arange(cfg.num_groups, dtype=jnp.int32),
        )
        if cfg.scan_layers:
            x, (stats, new_kv) = jax.lax.scan(body, x, xs)
        else:
            outs = []
            for g in range(cfg.num_groups):
                x, out = body(x, jax.tree.map(lambda a: a[g], xs))
                outs.append(out)
            stats, new_kv = jax.tree.map(lambda *a: jnp.stack(a), *outs)
        # stats: [groups, layers_per_group, ...] -> [layers, ...] in layer order.
        stats = jax.tree.map(lambda a: a.reshape((cfg.num_layers,) + a.shape[2:]), stats)

        x = self.final_norm(x)
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        logits = jnp.einsum(
            "bsd,dv->bsv", x, head.astype(dtype), preferred_element_type=jnp.float32
        )
        logits = constrain(logits, ("batch", "length", "act_vocab"), rules)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(new_kv[0], new_kv[1], cache.index + s)
        return logits, stats, new_cache
