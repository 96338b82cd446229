"""Paged attention for the serving engine: the page pool (`PagedKV`), where one step's ragged token
stream sits in it (`PagedBatch`), writing K/V into pages (`write`), attention over pages
(`attend`: plain JAX, or jax's ragged paged attention Pallas kernel on TPU, on one chip or per
chip of a mesh under `jax.shard_map`; `pallas_unsupported` says when it cannot serve) and the
weight-free key normalisation that lets the layers of a CLA group share pages (`normalize_key`).

The ragged batch: one flat stream of T tokens from R sequence rows; row r's tokens are stream
positions cu_q_lens[r]..cu_q_lens[r+1]-1 and are the last tokens of its kv_lens[r] cached ones.
Each row's keys live in fixed-size pages of one shared pool, in the order page_indices[r].
Page 0 is scratch: padding tokens write there and nobody attends to it.

CLA: a group's layers share one K/V but each has its own key-norm weight w. The pages hold
k_hat = k * rsqrt(mean(k^2) + eps) and each layer multiplies its (query-normed) query by w,
since q . (w * k_hat) == (w * q) . k_hat.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import ragged_paged_attention as rpa
from jax.sharding import PartitionSpec as P

__all__ = [
    "IMPLS",
    "PagedBatch",
    "PagedKV",
    "attend",
    "normalize_key",
    "pallas_unsupported",
    "pool_head_dim",
    "write",
]

IMPLS = ("xla", "pallas")
_NEG = float(jnp.finfo(jnp.float32).min)


class PagedKV(NamedTuple):
    """One pool of pages. kv: [num_pages, page_size, 2*kv_heads, head_dim] -- K at even combined
    heads, V at odd (exactly the layout of jax.experimental.pallas.ops.tpu.ragged_paged_attention),
    in the compute dtype, or int8 with `scale` [num_pages, 2*kv_heads, page_size] float32
    (one scale per token per combined head, symmetric round-to-nearest +-127, like
    hunyuan_jax.model.kv_cache.QuantizedKV); scale is None for a float pool. The engine keeps
    the pages of every CLA group in one such pool (group g's are pages g * P .. (g + 1) * P - 1,
    `kv_cache.PagedCache.zeros_pool`): the layer scan carries it and updates it in place, with
    no reshape or slice of it per step or per group."""

    kv: jax.Array
    scale: jax.Array | None

    LOGICAL_AXES = ("cache_pages", None, "cache_kv_heads", None)
    SCALE_LOGICAL_AXES = ("cache_pages", "cache_kv_heads", None)

    @classmethod
    def zeros(cls, num_pages, page_size, kv_heads, head_dim, dtype) -> PagedKV:
        """An empty pool; dtype int8: quantised."""
        dtype = jnp.dtype(dtype)
        kv = jnp.zeros((num_pages, page_size, 2 * kv_heads, head_dim), dtype)
        if dtype != jnp.int8:
            return cls(kv, None)
        return cls(kv, jnp.zeros((num_pages, 2 * kv_heads, page_size), jnp.float32))

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    @property
    def page_size(self) -> int:
        return self.kv.shape[-3]


class PagedBatch(NamedTuple):
    """Where the T tokens of one step sit (int32 arrays, built by the host; fixed shapes per
    program). R rows, P pages per row at most."""

    positions: jax.Array  # [T] position of each token within its sequence (padding: 0)
    slots: jax.Array  # [T] flat slot written: page * page_size + offset (padding: in page 0)
    seq_ids: jax.Array  # [T] the row of each token (padding: any row, masked by `valid`)
    valid: jax.Array  # [T] bool, real token
    kv_lens: jax.Array  # [R] tokens of each row in the cache after this step's writes
    page_indices: jax.Array  # [R, P] the pages of each row in order (unused entries: 0)
    cu_q_lens: jax.Array  # [R + 1] row r's tokens: stream positions cu_q_lens[r]..[r+1]-1
    num_seqs: jax.Array  # [1] rows in use


def normalize_key(k: jax.Array, eps: float) -> jax.Array:
    """k_hat = k * rsqrt(mean(k^2) + eps) over the last axis (float32 math, cast back to k's
    dtype): the model's RMSNorm without its weight, so RMSNorm_w(k) == normalize_key(k) * w."""
    k32 = k.astype(jnp.float32)
    return (k32 * jax.lax.rsqrt(jnp.mean(k32 * k32, axis=-1, keepdims=True) + eps)).astype(k.dtype)


def _quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., D] -> (int8 values, float32 scale [...]): the formula of kv_cache.QuantizedKV
    (not imported: kv_cache imports this module)."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1)
    scale = jnp.where(amax > 0, amax, 1.0) / 127.0
    return jnp.clip(jnp.round(x32 / scale[..., None]), -127, 127).astype(jnp.int8), scale


def write(pool: PagedKV, k: jax.Array, v: jax.Array, slots: jax.Array) -> PagedKV:
    """k, v: [T, kv_heads, head_dim] -> pool with token t's K/V at flat slot slots[t] (quantised
    for int8; zero-padded to a pool's larger head dim, `pool_head_dim`). A scatter into the
    pool (in place inside a jitted program that donates it; no copy of the pool). Several
    tokens writing one slot (padding, page 0): one of them wins."""
    t, kvh, hd = k.shape
    kv = jnp.stack([k, v], axis=2).reshape(t, 2 * kvh, hd)  # K even, V odd
    kv = _pad_last(kv, pool.kv.shape[-1])  # a lane-padded pool (`pool_head_dim`): zeros
    page, off = slots // pool.page_size, slots % pool.page_size
    if pool.scale is None:
        return PagedKV(pool.kv.at[page, off].set(kv.astype(pool.kv.dtype)), None)
    values, scale = _quantize(kv)  # [T, 2kvh, hd], [T, 2kvh]
    return PagedKV(pool.kv.at[page, off].set(values), pool.scale.at[page, :, off].set(scale))


def attend(
    q: jax.Array,
    pool: PagedKV,
    batch: PagedBatch,
    *,
    impl: str = "xla",
    plan=None,
    sm_scale: float | None = None,
    block_q: int = 32,
    block_kv: int = 256,
    num_kv_pages_per_block: int | None = None,
    num_queries_per_block: int | None = None,
) -> jax.Array:
    """q: [T, num_heads, head_dim] (GQA: num_heads a multiple of kv_heads) -> [T, num_heads,
    head_dim] in q's dtype. Token t attends to the key slots 0..positions[t] of its row
    seq_ids[t] (causal within the sequence; keys as in the pages after this step's write).
    Invalid tokens, and any token with no visible key, give zeros (never NaN). sm_scale:
    default 1/sqrt(head_dim) (the xla path divides the float32 scores by sqrt(head_dim), as
    kernels.attention.reference_attention does; given, it multiplies).

    impl:
      'xla'    plain JAX, any platform and pool dtype (int8 pages dequantised to q's dtype, a
               block at a time, as the contiguous cache is). Float32 scores and online softmax
               (flash style); probabilities cast to the value dtype before `@ v`, like the
               contiguous reference; masked keys get weight exactly 0 and their values are
               zeroed (garbage or NaN in unread slots and page 0 cannot leak). Work: the
               stream in blocks of `block_q` tokens (lax.map); each block loops over its rows'
               pages `block_kv` keys at a time (rounded to whole pages), up to the block's
               largest position only (a while loop: decode tokens of short rows stop early).
               A block whose real tokens all belong to one row (inside a prefill chunk) reads
               that row's pages once for the whole block, as the Pallas kernel does per query
               block; a block mixing rows (decode tokens, a chunk's edges) gathers each
               token's own row's pages, never another row's (lax.cond picks per block). Bytes
               read ~ sum over one-row blocks of (largest position) + over mixed blocks of
               block_q * (largest position): a prefill chunk of T tokens ~ T / block_q * L,
               a decode step ~ R * L (the all-rows alternative costs T * R * L). Peak memory
               of a mixed block: block_q * block_kv * (2 * kv_heads * head_dim elements of
               K/V, one more q-dtype copy for int8, + num_heads float32 scores): at the
               defaults (32 x 256) and Hunyuan-Large's heads (80 q, 8 KV x 80), 21 MB of
               bf16 K/V and 2.6 MB of scores (before any head sharding), whatever T, R or L;
               a one-row block holds one row's block_kv keys (0.7 MB) instead.
      'pallas' TPU: jax.experimental.pallas.ops.tpu.ragged_paged_attention (num_kv_pages_per_
               block / num_queries_per_block: its block sizes; default its tuned table on a TPU
               backend, else (min(P, 32), min(T, 32)), its v4-safe default, e.g. for an AOT
               compile from a CPU host). Its k_scale / v_scale are per-tensor scalars, so an
               int8 pool (per-token scales) always goes through 'xla'. Relies on the
               cu_q_lens / kv_lens layout (a row's tokens are its last kv_lens ones), not on
               `positions`. Tokens past cu_q_lens[num_seqs] and invalid ones are zeroed. The
               kernel needs the pool's head_dim a multiple of 128 (ValueError otherwise: its
               softmax scratch is 128 lanes wide; the engine's TPU pool is lane-padded,
               `pool_head_dim`, so Hunyuan-Large's 80 runs as 128) and 2*kv_heads tileable (its own
               check). Not runnable on CPU: jax 0.10.2's Pallas TPU
               interpreter fails on it; tests AOT-compile it for a v5e chip instead.
               On a mesh (`plan`, a ShardingPlan with one) a Pallas call is not partitioned
               by XLA: it runs per device under `jax.shard_map`, q's heads and the pool's
               combined kv-head axis split over the plan's `cache_kv_heads` mesh axes (each
               device holds whole K/V pairs of its kv heads and the query heads that read
               them: with 8 kv heads over tensor=8, one kv head and 10 query heads per
               chip), the PagedBatch's int arrays replicated; the pool is never gathered.
               ValueError when the plan's layout cannot do that (`pallas_unsupported`).
    plan: the model's ShardingPlan (only 'pallas' reads it; None or no mesh: one device).
    """
    if impl not in IMPLS:
        raise ValueError(f"paged attention impl must be one of {IMPLS}, got {impl!r}")
    t, h, d = q.shape
    kvh2, pd = pool.kv.shape[-2], pool.kv.shape[-1]
    if pool.kv.ndim != 4 or pd < d or kvh2 % 2 or h % (kvh2 // 2):
        raise ValueError(f"q {q.shape} and pages {pool.kv.shape}: head_dim or heads mismatch")
    if pd > d:  # a lane-padded pool: zero query lanes meet the zero key lanes (same scores)
        out = attend(_pad_last(q, pd), pool, batch, impl=impl, plan=plan,
                     sm_scale=d**-0.5 if sm_scale is None else sm_scale, block_q=block_q,
                     block_kv=block_kv, num_kv_pages_per_block=num_kv_pages_per_block,
                     num_queries_per_block=num_queries_per_block)  # fmt: skip
        return out[..., :d]
    if impl == "pallas" and pool.scale is None:
        if d % 128:
            raise ValueError(f"the ragged paged attention kernel needs head_dim % 128 == 0: {d}")
        scale = d**-0.5 if sm_scale is None else float(sm_scale)
        blocks = (num_kv_pages_per_block, num_queries_per_block)
        if plan is None or not plan.is_sharded:
            return _pallas(q, pool.kv, batch, scale, *blocks)
        return _sharded_pallas(q, pool.kv, batch, plan, scale, *blocks)
    return _xla(q, pool, batch, sm_scale, block_q, block_kv)


LANES = 128  # TPU vector lanes: the minor dim of an array's tiles


def pool_head_dim(head_dim: int, platform: str) -> int:
    """The head dim a page pool stores on `platform`: head_dim rounded up to 128 lanes on TPU,
    as is elsewhere. On TPU a pool whose minor dim is not a multiple of the lane width is
    tiled with padding anyway (80 -> 128: no more HBM), but an update of such an array is
    not done in place: every step's K/V write copied the whole pool (measured by the AOT
    tool: 5 pool-sized temporaries in a step of the tiny model, head_dim 8; none at 128), and
    the ragged paged attention kernel needs head_dim % 128 == 0. The pad lanes hold zeros;
    `write` and `attend` pad K/V and queries and slice the output back."""
    return -(-head_dim // LANES) * LANES if platform == "tpu" else head_dim


def _pad_last(x: jax.Array, size: int) -> jax.Array:
    if x.shape[-1] == size:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def _head_axes(plan) -> tuple[str, ...]:
    """The mesh axes the pool's combined kv-head axis is split over (empty: replicated)."""
    return plan.mesh_axes("cache_kv_heads") if plan is not None and plan.is_sharded else ()


def pallas_unsupported(pool: PagedKV, plan=None, num_heads: int | None = None) -> str | None:
    """Why impl='pallas' cannot serve attention over `pool` ([..., pages, page_size,
    2 * kv_heads, head_dim], the engine's pool of every group) under `plan`; None when it can.

    The kernel needs a float pool (its k/v scales are per-tensor scalars), head_dim a
    multiple of 128 (its lane width) and a per-device combined kv-head count it can tile
    (`get_min_heads_per_blk`: after packing 1, 2, 4, 8 or a multiple of 8). On a mesh each
    device must hold whole K/V pairs: kv_heads divisible by the `cache_kv_heads` shards
    (K / V sit at even / odd combined heads, so a split of 2 * kv_heads alone could part a
    pair), the query heads split the same way (`act_heads` on the same mesh axes, so
    each device has the query heads of its own kv heads) and the pages unsharded."""
    kv = pool.kv
    if pool.scale is not None:
        return "an int8 pool (per-token scales; the kernel takes per-tensor scalars)"
    if kv.ndim < 4 or kv.shape[-2] % 2:
        return f"pages {kv.shape}: not [pages, page_size, 2 * kv_heads, head_dim]"
    kvh, d = kv.shape[-2] // 2, kv.shape[-1]
    if d % 128:
        return f"head_dim {d} is not a multiple of 128"
    axes = _head_axes(plan)
    shards = math.prod(plan.mesh.shape[a] for a in axes) if axes else 1
    if kvh % shards:
        return f"{kvh} kv heads do not split into whole K/V pairs over {axes} ({shards} shards)"
    if axes:
        if plan.mesh_axes("act_heads") != axes:
            return (
                f"query heads go over {plan.mesh_axes('act_heads')}, kv heads over {axes}: "
                f"a device would lack the kv heads of its query heads"
            )
        if num_heads is not None and num_heads % shards:
            return f"{num_heads} query heads do not split over {shards} shards"
    if plan is not None and plan.is_sharded and plan.mesh_axes("cache_pages"):
        return f"the pages are sharded over {plan.mesh_axes('cache_pages')}"
    local = 2 * kvh // shards
    try:  # the kernel's own tiling check, on the per-device combined kv heads
        rpa.kernel.get_min_heads_per_blk(local // 2, local, kv.dtype, kv.dtype)
    except ValueError as e:
        return f"{local} combined kv heads per device: {e}"
    return None


def _sharded_pallas(q, kv, batch: PagedBatch, plan, sm_scale, kv_pages_per_block, q_per_block):
    """`_pallas` per device under shard_map (see `attend`): q [T, H, D] with H over the head
    axes, kv [pages, page_size, 2 KVH, D] with 2 KVH over the same axes, the batch
    replicated; the output is laid out as q."""
    pool = PagedKV(kv, None)
    why = pallas_unsupported(pool, plan, q.shape[1])
    if why:
        raise ValueError(f"the ragged paged attention kernel cannot run on this mesh: {why}")
    axes = _head_axes(plan)
    heads = None if not axes else axes[0] if len(axes) == 1 else axes
    q_spec, kv_spec = P(None, heads, None), P(None, None, heads, None)

    def local(q, kv, batch):
        return _pallas(q, kv, batch, sm_scale, kv_pages_per_block, q_per_block)

    return jax.shard_map(
        local,
        mesh=plan.mesh,
        in_specs=(q_spec, kv_spec, P()),
        out_specs=q_spec,
        check_vma=False,
    )(q, kv, batch)


def _xla(q, pool: PagedKV, batch: PagedBatch, sm_scale, block_q: int, block_kv: int):
    t, h, d = q.shape
    kvh = pool.kv.shape[-2] // 2
    g, ps = h // kvh, pool.page_size
    r, p = batch.page_indices.shape
    ppb = max(1, min(p, block_kv // ps))  # pages per key block
    nkb = -(-p // ppb)
    nk = ppb * ps
    bq = max(1, min(block_q, t))
    nqb = -(-t // bq)
    pad = nqb * bq - t
    rows = jnp.clip(batch.seq_ids.astype(jnp.int32), 0, r - 1)
    pages = jnp.pad(batch.page_indices.astype(jnp.int32), ((0, 0), (0, nkb * ppb - p)))
    valid = batch.valid.astype(bool)

    def blocks(x, fill):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
        return x.reshape(nqb, bq, *x.shape[1:])

    xs = (
        blocks(q.reshape(t, kvh, g, d), 0),
        blocks(batch.positions.astype(jnp.int32), 0),
        blocks(rows, 0),
        blocks(valid, False),
    )

    def load(pg):
        """Pages pg [..., ppb] -> K, V [..., nk, kvh, d] (int8 pages dequantised)."""
        kv = pool.kv[pg]  # [..., ppb, ps, 2kvh, d]
        if pool.scale is not None:
            s = jnp.swapaxes(pool.scale[pg], -1, -2)  # [..., ppb, ps, 2kvh]
            kv = (kv.astype(jnp.float32) * s[..., None]).astype(q.dtype)
        kv = kv.reshape(*pg.shape[:-1], nk, 2 * kvh, d)
        return kv[..., 0::2, :], kv[..., 1::2, :]

    def one_block(args):
        qb, pos, row, ok = args
        last = jnp.max(jnp.where(ok, pos, -1))
        n_blocks = jnp.clip((last + nk) // nk, 0, nkb)
        first = row[jnp.argmax(ok)]
        one_row = jnp.all(jnp.where(ok, row == first, True))

        def over_keys(row_pages, shared: bool):
            """shared: row_pages [nkb * ppb], every real token of the block in that row (its
            pages read once for the block); else [bq, nkb * ppb], each token's own row."""

            def step(j, carry):
                m, l, acc = carry
                pg = jax.lax.dynamic_slice_in_dim(row_pages, j * ppb, ppb, axis=-1)
                k, v = load(pg)  # [nk, kvh, d] shared, else [bq, nk, kvh, d]
                kpos = j * nk + jnp.arange(nk, dtype=jnp.int32)
                mask = (kpos[None, :] <= pos[:, None]) & ok[:, None]  # [bq, nk]
                zero = jnp.zeros((), v.dtype)
                if shared:  # slots past the block's last position may be unwritten
                    v = jnp.where((kpos <= last)[:, None, None], v, zero)
                    sc = jnp.einsum("bngd,knd->bngk", qb, k, preferred_element_type=jnp.float32)
                else:
                    v = jnp.where(mask[:, :, None, None], v, zero)
                    sc = jnp.einsum("bngd,bknd->bngk", qb, k, preferred_element_type=jnp.float32)
                sc = sc / jnp.sqrt(jnp.float32(d)) if sm_scale is None else sc * sm_scale
                mask = mask[:, None, None, :]
                m_new = jnp.maximum(m, jnp.max(jnp.where(mask, sc, _NEG), axis=-1))
                pr = jnp.where(mask, jnp.exp(sc - m_new[..., None]), 0.0)
                alpha = jnp.exp(m - m_new)
                spec = "bngk,knd->bngd" if shared else "bngk,bknd->bngd"
                pv = jnp.einsum(spec, pr.astype(v.dtype), v, preferred_element_type=jnp.float32)
                return m_new, alpha * l + pr.sum(-1), alpha[..., None] * acc + pv

            init = (
                jnp.full((bq, kvh, g), _NEG, jnp.float32),
                jnp.zeros((bq, kvh, g), jnp.float32),
                jnp.zeros((bq, kvh, g, d), jnp.float32),
            )
            return jax.lax.fori_loop(0, n_blocks, step, init)

        _, l, acc = jax.lax.cond(
            one_row, lambda: over_keys(pages[first], True), lambda: over_keys(pages[row], False)
        )
        return (acc / jnp.where(l > 0, l, 1.0)[..., None]).astype(q.dtype)

    out = jax.lax.map(one_block, xs)  # [nqb, bq, kvh, g, d]
    return out.reshape(nqb * bq, h, d)[:t]


def _pallas(q, kv, batch: PagedBatch, sm_scale: float, kv_pages_per_block, queries_per_block):
    t, h, d = q.shape
    p = batch.page_indices.shape[1]
    if kv_pages_per_block is None or queries_per_block is None:
        try:  # the kernel's own choice, which reads jax.devices() (needs a TPU backend)
            hq, hkv = rpa.kernel.get_min_heads_per_blk(h, kv.shape[2], q.dtype, kv.dtype)
            tuned = rpa.get_tuned_block_sizes(q.dtype, kv.dtype, hq, hkv // 2, d, kv.shape[1], t, p)
        except NotImplementedError:  # not a TPU backend (an AOT compile from a CPU host)
            tuned = (min(p, 32), min(t, 32))
        kv_pages_per_block = kv_pages_per_block or tuned[0]
        queries_per_block = queries_per_block or tuned[1]
    out = rpa.ragged_paged_attention(
        q,
        kv,
        batch.kv_lens.astype(jnp.int32),
        batch.page_indices.astype(jnp.int32),
        batch.cu_q_lens.astype(jnp.int32),
        batch.num_seqs.astype(jnp.int32),
        sm_scale=sm_scale,
        num_kv_pages_per_block=kv_pages_per_block,
        num_queries_per_block=queries_per_block,
    )
    # The kernel leaves tokens past cu_q_lens[num_seqs] unwritten.
    real = batch.valid.astype(bool) & (jnp.arange(t) < batch.cu_q_lens[batch.num_seqs[0]])
    return jnp.where(real[:, None, None], out, jnp.zeros((), out.dtype))
