"""The Hunyuan-Large decoder in Flax NNX, top to bottom as in the paper.

    h = x + Attn(RMSNorm_in(x));  y = h + MoE(RMSNorm_post(h))      (each layer, pre-norm)
    logits = RMSNorm_final(h_L) @ embed^T                             (tied embeddings)

Attention: GQA, RoPE (NeoX, NTK-alpha base), QK-norm *after* RoPE, and cross-layer attention
(CLA): in each group of `cla_share_factor` consecutive layers only the first projects K/V; the
others reuse its roped, un-normed K and V and apply their own key-norm. The KV cache
(`hunyuan_jax.model.kv_cache`) therefore holds one K/V pair per group.

Layers are stored stacked per group (leading logical axis `layers`) and run with `lax.scan`
over groups, so trace and compile time do not grow with depth. One `nnx.State` holds every
parameter; training and decoding use the same tree.

The model is built from three frozen objects: the architecture (`ModelConfig`), the runtime
policy (`RuntimePolicy`: dtypes, remat, attention kernel, dropout) and the sharding plan
(`ShardingPlan`: where every logical axis lives). The model code never names a mesh axis and
never chooses a kernel or a MoE dispatch itself: `plan.constrain`, `kernels.attention.attend`
and `dispatch.experts_fn_for` do.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from hunyuan_jax.model import dispatch, qops
from hunyuan_jax.model.config import ModelConfig
from hunyuan_jax.model.kernels import paged
from hunyuan_jax.model.kernels.attention import RESIDUAL_NAMES, AttentionMask, attend, kernel_layout
from hunyuan_jax.model.kv_cache import KVCache, PagedCache, QuantizedKV, write_rows
from hunyuan_jax.model.layer_weights import weights_for_use
from hunyuan_jax.model.layers import RMSNorm, apply_rope, param, rope_inv_freq
from hunyuan_jax.model.moe import ExpertsFn, MoE
from hunyuan_jax.model.policy import RuntimePolicy
from sharding.plan import ShardingPlan

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # The attention output plus what the flash / splash backward needs (no second forward).
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out", *RESIDUAL_NAMES),
}


def remat_policy(policy: RuntimePolicy):
    """The `jax.checkpoint` policy of a layer group: a named one, or with remat 'save' the
    checkpoint points `policy.remat_save` lists (the attention output with the kernel's
    residuals, so that its backward runs no second forward)."""
    if policy.remat == "auto":  # resolved by the train step's builder; a bare model: full
        return _REMAT_POLICIES["full"]
    if policy.remat != "save":
        return _REMAT_POLICIES[policy.remat]
    names = policy.saved_names()
    if "attn_out" in names:
        names += RESIDUAL_NAMES
    return jax.checkpoint_policies.save_only_these_names(*names)


class Context(NamedTuple):
    """What every layer of one forward shares (built once per call)."""

    positions: jax.Array  # [B, S] RoPE positions
    mask: AttentionMask | None  # which key slots each query may attend (None: paged)
    inv_freq: jax.Array  # [Dh / 2] RoPE inverse frequencies
    cache_index: jax.Array | None  # [B] first cache slot written by this call (or None)
    experts_fn: ExpertsFn
    attention: str = "xla"  # 'xla' | 'flash' | 'splash' | 'pallas' (dispatch)
    paged: paged.PagedBatch | None = None  # the engine's token placement (a paged cache)


# ----------------------------------------------------------------------------- attention
class Attention(nnx.Module):
    """GQA self-attention with QK-norm after RoPE; `produces_kv` marks a group's first layer."""

    def __init__(
        self,
        cfg: ModelConfig,
        policy: RuntimePolicy,
        plan: ShardingPlan,
        produces_kv: bool,
        *,
        rngs: nnx.Rngs,
    ):
        d, h, kvh, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        std, pdt = cfg.initializer_range, jnp.dtype(policy.param_dtype)
        self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, hd
        self.produces_kv = produces_kv
        self.compute_dtype = jnp.dtype(policy.compute_dtype)
        self.plan = plan
        self.q_proj = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), pdt, std)
        if produces_kv:
            self.k_proj = param(rngs, (d, kvh, hd), ("embed", "kv_heads", "head_dim"), pdt, std)
            self.v_proj = param(rngs, (d, kvh, hd), ("embed", "kv_heads", "head_dim"), pdt, std)
        self.o_proj = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), pdt, std)
        self.query_norm = RMSNorm(hd, cfg.rms_norm_eps, pdt) if cfg.use_qk_norm else None
        self.key_norm = RMSNorm(hd, cfg.rms_norm_eps, pdt) if cfg.use_qk_norm else None

    def _w(self, name: str, lora_key=None):
        return qops.weight(self, name, self.compute_dtype, lora_key)

    def project_kv(self, x, ctx: Context, lora_key=None):
        """The K/V this group shares: RoPE-rotated keys (not yet key-normed) and values."""
        k = qops.einsum("bsd,dnh->bsnh", x, self._w("k_proj", lora_key))
        v = qops.einsum("bsd,dnh->bsnh", x, self._w("v_proj", lora_key))
        k, v = checkpoint_name(k, "kv_proj"), checkpoint_name(v, "kv_proj")
        if self.plan.shards("length"):
            # Context parallelism: project each device's own tokens, then attention gathers
            # K/V (without this XLA gathers x, 3x their size, and projects every token on
            # every context shard).
            k = self.plan.constrain(k, ("batch", "length", "act_kv_heads", None))
            v = self.plan.constrain(v, ("batch", "length", "act_kv_heads", None))
        return apply_rope(k, ctx.positions, ctx.inv_freq), v

    def write_pages(self, x, pool: paged.PagedKV, ctx: Context) -> paged.PagedKV:
        """Writes this call's K/V into the group's pages: the weight-free normalised key
        k / rms(k) (each layer of the group folds its own key-norm weight into its query,
        `attend_pages`) and the value."""
        k, v = self.project_kv(x, ctx)
        if self.key_norm is not None:
            k = paged.normalize_key(k, self.key_norm.eps)
        return paged.write(pool, k[0], v[0], ctx.paged.slots)

    def attend_pages(self, x, pool: paged.PagedKV, ctx: Context):
        """x: [1, T, D], the engine's ragged token stream -> [1, T, D], attending over pages:
        q . (w * k / rms(k)) computed as (w * q) . (k / rms(k)), exactly the key-normed score."""
        q = qops.einsum("bsd,dnh->bsnh", x, self._w("q_proj"))
        q = apply_rope(q, ctx.positions, ctx.inv_freq)
        if self.query_norm is not None:
            q = self.query_norm(q) * self.key_norm.weight[...].astype(q.dtype)
        q = self.plan.constrain(q, ("batch", "length", "act_heads", None))
        out = paged.attend(q[0], pool, ctx.paged, impl=ctx.attention, plan=self.plan)[None]
        return qops.einsum("bsnh,nhd->bsd", out, self._w("o_proj"))

    def __call__(self, x, k, v, ctx: Context, dropout=None, lora_key=None):
        """x: [B,S,D]; k, v: [B,T,KVH,Dh] (shared, roped) -> [B,S,D].
        `dropout`: (rate, key) for attention-probability dropout in training, else None;
        `lora_key`: the LoRA adapters' dropout key in training (`qops.weight`)."""
        q = checkpoint_name(qops.einsum("bsd,dnh->bsnh", x, self._w("q_proj", lora_key)), "q_proj")
        q = apply_rope(q, ctx.positions, ctx.inv_freq)
        if self.query_norm is not None:
            q, k = self.query_norm(q), self.key_norm(k)
        q = self.plan.constrain(q, ("batch", "length", "act_heads", None))
        out = attend(
            q,
            k,
            v.astype(self.compute_dtype),
            ctx.mask,
            impl=ctx.attention,
            dropout=dropout,
            **kernel_layout(ctx.attention, self.plan, q.shape, k.shape),
        )
        out = checkpoint_name(out, "attn_out")
        out = qops.einsum("bsnh,nhd->bsd", out, self._w("o_proj", lora_key))
        return checkpoint_name(out, "o_proj")


# ----------------------------------------------------------------------------- decoder
class DecoderLayer(nnx.Module):
    """Pre-norm attention + pre-norm MoE, each with a residual connection."""

    def __init__(
        self,
        cfg: ModelConfig,
        policy: RuntimePolicy,
        plan: ShardingPlan,
        produces_kv: bool,
        *,
        rngs: nnx.Rngs,
    ):
        pdt = jnp.dtype(policy.param_dtype)
        self.attention_dropout = policy.attention_dropout
        self.hidden_dropout = policy.hidden_dropout
        self.plan = plan
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt)
        self.attn = Attention(cfg, policy, plan, produces_kv, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt)
        self.moe = MoE(cfg, policy, rngs=rngs)

    def __call__(self, x, kv, ctx: Context, cache_kv=None, key=None):
        """Returns (x, kv, moe stats). A KV-producing layer computes kv (and writes it into
        `cache_kv`, this group's (k, v) cache). `key` (training only) drives dropout and the
        MoE's training-time routing."""
        keys = [None] * 4 if key is None else list(jax.random.split(key, 4))
        lora_key = None if key is None else jax.random.fold_in(key, 4)  # LoRA dropout
        attn_drop = None
        if key is not None and self.attention_dropout:
            attn_drop = (self.attention_dropout, keys[0])
        h = self.input_norm(x)
        if ctx.paged is not None:  # the engine: `kv` / `cache_kv` are this group's pages
            if self.attn.produces_kv:
                kv = self.attn.write_pages(h, cache_kv, ctx)
            attn_out = self.attn.attend_pages(h, kv, ctx)
            x, stats = self._mlp_half(x, attn_out, ctx, keys, lora_key)
            return x, kv, stats
        if self.attn.produces_kv:
            kv = self.attn.project_kv(h, ctx, lora_key)
            if cache_kv is not None:
                kv = tuple(write_rows(c, new, ctx.cache_index) for c, new in zip(cache_kv, kv))
        # An int8 cache travels quantised between the layers of a group (and out as the new
        # cache); each layer dequantises it for its own attention.
        attn_kv = tuple(
            t.dequantize(self.attn.compute_dtype) if isinstance(t, QuantizedKV) else t for t in kv
        )
        attn_out = self.attn(h, *attn_kv, ctx, attn_drop, lora_key)
        x, stats = self._mlp_half(x, attn_out, ctx, keys, lora_key)
        return x, kv, stats

    def _mlp_half(self, x, attn_out, ctx: Context, keys, lora_key):
        """The attention residual, then the pre-norm MoE and its residual -> (x, stats)."""
        x = x + _dropout(attn_out, self.hidden_dropout, keys[1])
        x = self.plan.constrain(x, ("batch", "length", "act_embed"))
        moe_out, stats = self.moe(self.post_attn_norm(x), ctx.experts_fn, keys[2], lora_key)
        x = x + _dropout(moe_out, self.hidden_dropout, keys[3])
        x = self.plan.constrain(x, ("batch", "length", "act_embed"))
        return x, stats


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class DecoderGroup(nnx.Module):
    """`cla_share_factor` consecutive layers; the first one produces the shared K/V."""

    def __init__(
        self, cfg: ModelConfig, policy: RuntimePolicy, plan: ShardingPlan, *, rngs: nnx.Rngs
    ):
        self.layers = nnx.List(
            [
                DecoderLayer(cfg, policy, plan, produces_kv=(j == 0), rngs=rngs)
                for j in range(cfg.cla_share_factor)
            ]
        )

    def __call__(self, x, ctx: Context, cache_kv=None, key=None):
        kv, stats = None, []
        for j, layer in enumerate(self.layers):
            layer_key = None if key is None else jax.random.fold_in(key, j)
            x, kv, layer_stats = layer(x, kv, ctx, cache_kv, layer_key)
            stats.append(layer_stats)
        stats = jax.tree.map(lambda *s: jnp.stack(s), *stats)
        return x, kv, stats


def _make_groups(cfg: ModelConfig, policy, plan, rngs: nnx.Rngs) -> DecoderGroup:
    @nnx.split_rngs(splits=cfg.num_groups)
    @nnx.vmap(
        in_axes=(0,),
        out_axes=0,
        axis_size=cfg.num_groups,
        transform_metadata={nnx.PARTITION_NAME: "layers", "logical_axes": "layers"},
    )
    def make(rngs):
        return DecoderGroup(cfg, policy, plan, rngs=rngs)

    return make(rngs)


# ----------------------------------------------------------------------------- the LM
class HunyuanForCausalLM(nnx.Module):
    """Token ids -> float32 logits (and MoE statistics, and the updated KV cache if given)."""

    def __init__(
        self,
        cfg: ModelConfig,
        policy: RuntimePolicy | None = None,
        plan: ShardingPlan | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        policy = policy or RuntimePolicy()
        plan = plan or ShardingPlan.single()
        self.cfg, self.policy, self.plan = cfg, policy, plan
        pdt = jnp.dtype(policy.param_dtype)
        self.embed = param(
            rngs,
            (cfg.vocab_size, cfg.hidden_size),
            ("vocab", "embed"),
            pdt,
            cfg.initializer_range,
        )
        self.groups = _make_groups(cfg, policy, plan, rngs)
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

    def init_cache(self, batch: int, max_len: int, dtype: str | None = None) -> KVCache:
        """An empty KV cache for `batch` rows of `max_len` slots; dtype default the compute
        dtype, 'int8' for a quantised cache (`hunyuan_jax.model.kv_cache`)."""
        dtype = self.policy.compute_dtype if dtype in (None, "auto") else dtype
        return KVCache.zeros(self.cfg, batch, max_len, dtype)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        cache: KVCache | PagedCache | None = None,
        phase: str | None = None,
        key: jax.Array | None = None,
        experts_fn: ExpertsFn | None = None,
        return_hidden: bool = False,
        groups=None,
    ):
        """tokens [B, S] -> (logits [B, S, V] float32, stats, new cache or None).

        return_hidden: return the final-normed hidden states [B, S, D] instead of the logits
          (`self.logits(h)` makes them; the chunked loss never holds all [B, S, V] at once).
        phase: 'train' | 'prefill' | 'decode' selects the MoE dispatch
          (`dispatch.experts_fn_for`); default 'train' when `key` is given, else 'prefill'.
        key: turns on training behaviour (dropout, random re-routing); None is inference.
        experts_fn: overrides the dispatch (tests, benchmarks).
        groups: paged cache only: one state per layer group, run by a Python loop instead of
          the scan over the stacked weights (`EngineCore.group_arrays`, docs/performance.md).

        Without a cache: causal attention within each segment (segment_ids, default one per
        row; positions default 0..S-1). With a cache: row b's tokens sit at positions
        cache.index[b] + (0..S-1) and attend to every earlier slot of that row.
        """
        cfg, plan = self.cfg, self.plan
        dtype = jnp.dtype(self.policy.compute_dtype)
        b, s = tokens.shape
        phase = phase or ("train" if key is not None else "prefill")
        if experts_fn is None:
            experts_fn = dispatch.experts_fn_for(phase, cfg, self.policy, plan, b * s)
        paged_batch = None
        if isinstance(cache, PagedCache):  # the engine: one ragged stream of tokens
            if b != 1:
                raise ValueError(f"a paged cache takes one token stream [1, T], got [{b}, {s}]")
            paged_batch = cache.batch
            positions, mask = cache.batch.positions[None, :], None
        elif cache is not None:
            positions = cache.index[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]
            mask = AttentionMask.cached(cache.index, s, cache.max_len)
        else:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            if segment_ids is None:
                segment_ids = jnp.ones((b, s), jnp.int32)
            mask = AttentionMask.causal(segment_ids)
        dropout = key is not None and self.policy.attention_dropout > 0
        if paged_batch is not None:
            attention = dispatch.paged_attention_impl_for(self.policy, plan, cache.pool)
        else:
            attention = dispatch.attention_impl_for(
                self.policy, plan, mask, s, mask.kv_positions.shape[1], dropout
            )
        ctx = Context(
            positions,
            mask,
            rope_inv_freq(cfg),
            None if cache is None or paged_batch is not None else cache.index,
            experts_fn,
            attention,
            paged_batch,
        )

        # The table's hidden dim as the plan says (`table_embed`): all-gathered before the lookup
        # in training, FSDP style (its gradient is reduce-scattered back), never gathered row by
        # row; left sharded in serving, where weights stay put and only activations move.
        table = plan.constrain(self.embed[...].astype(dtype), ("vocab", "table_embed"))
        x = jnp.take(table, tokens, axis=0)
        x = plan.constrain(x, ("batch", "length", "act_embed"))

        graphdef, stacked = nnx.split(self.groups)
        if groups is not None:
            if paged_batch is None:
                raise ValueError("groups= (one state per layer group) needs a paged cache")
            stacked = list(groups)
        if paged_batch is not None:
            x, stats, new_kv = self._paged_groups(x, ctx, cache.pool, graphdef, stacked)
        else:
            x, stats, new_kv = self._groups(x, ctx, cache, key, graphdef, stacked)
        # stats: [groups, layers_per_group, ...] -> [layers, ...] in layer order.
        stats = jax.tree.map(lambda a: a.reshape((cfg.num_layers,) + a.shape[2:]), stats)

        x = self.final_norm(x)
        logits = x if return_hidden else self.logits(x)
        new_cache = None
        if paged_batch is not None:
            new_cache = PagedCache(new_kv, paged_batch)
        elif cache is not None:
            new_cache = KVCache(new_kv[0], new_kv[1], cache.index + s)
        return logits, stats, new_cache

    def _groups(self, x, ctx: Context, cache: KVCache | None, key, graphdef, stacked):
        """The layer-group scan: (x, stats [groups, ...], the groups' new K/V or None)."""
        cfg = self.cfg

        def body(x, xs):
            group_state, group_cache, g = xs
            group_state = weights_for_use(self.plan, group_state, self.policy.compute_dtype)
            group = nnx.merge(graphdef, group_state)
            group_key = None if key is None else jax.random.fold_in(key, g)
            x, kv, stats = group(x, ctx, group_cache, group_key)
            return x, (stats, kv if cache is not None else None)

        if self.policy.remat != "none":
            body = jax.checkpoint(body, policy=remat_policy(self.policy), prevent_cse=False)
        groups = jnp.arange(cfg.num_groups, dtype=jnp.int32)
        xs = (stacked, None if cache is None else (cache.k, cache.v), groups)
        if self.policy.scan_layers:
            x, (stats, new_kv) = jax.lax.scan(body, x, xs)
            return x, stats, new_kv
        outs = []
        for g in range(cfg.num_groups):
            x, out = body(x, jax.tree.map(lambda a: a[g], xs))
            outs.append(out)
        stats, new_kv = jax.tree.map(lambda *a: jnp.stack(a), *outs)
        return x, stats, new_kv

    def _paged_groups(self, x, ctx: Context, pool: paged.PagedKV, graphdef, stacked):
        """The layer-group scan of an engine step. The pool of all groups is one array
        [groups * pages, ...] (`kv_cache.PagedCache`) carried through the scan and updated in
        place (as a scan input and output, or reshaped from a stacked [groups, pages, ...]
        array, it would be copied whole every step); group g's pages are g * pages onwards,
        so its step writes and reads them through offset slots and page indices."""
        groups = self.cfg.num_groups
        pages, page_size = pool.kv.shape[0] // groups, pool.kv.shape[1]
        flat, b = pool, ctx.paged

        def body(carry, xs):
            x, flat = carry
            group_state, g = xs
            own = b._replace(
                slots=b.slots + g * pages * page_size, page_indices=b.page_indices + g * pages
            )
            group = nnx.merge(graphdef, group_state)
            x, flat, stats = group(x, ctx._replace(paged=own), flat)
            return (x, flat), stats

        if isinstance(stacked, list):  # one state per group: no slicing
            outs = []
            for g, group_state in enumerate(stacked):
                (x, flat), out = body((x, flat), (group_state, jnp.int32(g)))
                outs.append(out)
            return x, jax.tree.map(lambda *a: jnp.stack(a), *outs), flat
        xs = (stacked, jnp.arange(groups, dtype=jnp.int32))
        if self.policy.scan_layers:
            (x, flat), stats = jax.lax.scan(body, (x, flat), xs)
        else:
            outs = []
            for g in range(groups):
                (x, flat), out = body((x, flat), jax.tree.map(lambda a: a[g], xs))
                outs.append(out)
            stats = jax.tree.map(lambda *a: jnp.stack(a), *outs)
        return x, stats, flat

    def head(self) -> jax.Array:
        """The LM head [D, V] as the logits use it: compute dtype, laid out by the plan
        (`table_embed`: gathered in training). Made once per call of `logits`; the chunked
        loss makes it once for all its chunks (else every chunk gathers it again)."""
        dtype = jnp.dtype(self.policy.compute_dtype)
        if self.lm_head is None:
            return self.plan.constrain(self.embed[...].astype(dtype), ("vocab", "table_embed")).T
        return self.plan.constrain(self.lm_head[...].astype(dtype), ("table_embed", "vocab"))

    def logits(self, x: jax.Array, head: jax.Array | None = None) -> jax.Array:
        """Final hidden states [B, S, D] (after the final norm) -> float32 logits [B, S, V]."""
        head = self.head() if head is None else head
        logits = jnp.einsum("bsd,dv->bsv", x, head, preferred_element_type=jnp.float32)
        return self.plan.constrain(logits, ("batch", "length", "act_vocab"))
