"""Blockwise (flash) attention in plain JAX: online softmax forward, FlashAttention-2 backward.

Memory is O(block) in both directions: the forward keeps one [bq, bk] score tile per (batch,
head) at a time and saves only the output and the float32 log-sum-exp of each query row for
the backward (`jax.custom_vjp`), which recomputes the tiles. Query heads are grouped per KV head
(GQA without repeating K/V). Blocks whose mask is all False (for every batch row) are skipped
with `lax.cond`, so causal attention does about half the tile work and a short query chunk
against a long cache touches only the filled slots. Lengths that are not multiples of the block
size are padded internally (padded keys are never allowed; padded queries are dropped).

Numerics: scores, softmax statistics and all accumulators are float32; the probabilities (and
in the backward dS) are cast to the input dtype for their matmuls, with float32 accumulation,
as in the reference (which casts the probabilities to v.dtype before `@ v`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from hunyuan_jax.model.kernels.mask import AttentionMask, check_shapes

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_KV = 512
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: no inf - inf in the updates
_F32 = jnp.float32
_I32_MAX = int(jnp.iinfo(jnp.int32).max)
_I32_MIN = int(jnp.iinfo(jnp.int32).min)
# checkpoint_name of the forward's residuals: a remat policy that saves these two (e.g.
# jax.checkpoint_policies.save_only_these_names(*RESIDUAL_NAMES, ...)) keeps the backward from
# re-running the flash forward; any other policy recomputes it (O(S) memory either way).
RESIDUAL_NAMES = ("flash_out", "flash_lse")


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: AttentionMask,
    *,
    block_q: int = DEFAULT_BLOCK_Q,
    block_kv: int = DEFAULT_BLOCK_KV,
) -> jax.Array:
    """q [B,S,H,D], k/v [B,T,KVH,D], mask: AttentionMask -> [B,S,H,D] in q.dtype.

    block_q / block_kv: tile sizes; each is capped at its sequence length rounded up to 8, so
    decode (S=1) uses an 8-row query tile. Differentiable w.r.t. q, k, v (custom VJP)."""
    check_shapes(q, k, v, mask)
    if block_q < 1 or block_kv < 1:
        raise ValueError(f"block sizes must be positive, got {block_q=}, {block_kv=}")
    bq = min(block_q, _round_up(q.shape[1], 8))
    bk = min(block_kv, _round_up(k.shape[1], 8))
    arrays = tuple(jnp.asarray(x, jnp.int32) for x in mask[:4])
    return _flash(q, k, v, arrays, bq, bk)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ----------------------------------------------------------------------------- layouts
def _pad_to(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _q_blocks(x: jax.Array, kvh: int, bq: int) -> jax.Array:
    """[B, S, H, D] -> [nq, B, KVH, G, bq, D] (query heads grouped under their KV head)."""
    b, s, h, d = x.shape
    x = _pad_to(x, 1, _round_up(s, bq))
    x = x.reshape(b, -1, bq, kvh, h // kvh, d)
    return x.transpose(1, 0, 3, 4, 2, 5)


def _q_unblock(x: jax.Array, s: int) -> jax.Array:
    """Inverse of _q_blocks: [nq, B, KVH, G, bq, D] -> [B, S, H, D]."""
    nq, b, kvh, g, bq, d = x.shape
    x = x.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, kvh * g, d)
    return x[:, :s]


def _kv_blocks(x: jax.Array, bk: int) -> jax.Array:
    """[B, T, KVH, D] -> [nk, B, KVH, bk, D]."""
    b, t, kvh, d = x.shape
    x = _pad_to(x, 1, _round_up(t, bk))
    return x.reshape(b, -1, bk, kvh, d).transpose(1, 0, 3, 2, 4)


def _kv_unblock(x: jax.Array, t: int) -> jax.Array:
    nk, b, kvh, bk, d = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(b, nk * bk, kvh, d)[:, :t]


def _seq_blocks(x: jax.Array, block: int, fill: int) -> jax.Array:
    """[B, L] int32 -> [n, B, block], padded with `fill`."""
    b, l = x.shape
    x = _pad_to(x, 1, _round_up(l, block), fill)
    return x.reshape(b, -1, block).transpose(1, 0, 2)


def _mask_blocks(arrays, bq: int, bk: int):
    """Blocked positions/segments. Padded queries get position INT32_MIN and padded keys
    INT32_MAX, so no padded pair is ever allowed whatever the segment ids."""
    q_pos, kv_pos, q_seg, kv_seg = arrays
    return (
        _seq_blocks(q_pos, bq, _I32_MIN),
        _seq_blocks(kv_pos, bk, _I32_MAX),
        _seq_blocks(q_seg, bq, 0),
        _seq_blocks(kv_seg, bk, 0),
    )


def _allowed(q_pos, q_seg, kv_pos, kv_seg) -> jax.Array:
    """[B, bq] x [B, bk] -> [B, 1, 1, bq, bk] bool (broadcasts over KVH and G)."""
    ok = (kv_pos[:, None, :] <= q_pos[:, :, None]) & (q_seg[:, :, None] == kv_seg[:, None, :])
    return ok[:, None, None]


def _scores(qi, kj, scale):
    """[B,KVH,G,bq,D] x [B,KVH,bk,D] -> float32 [B,KVH,G,bq,bk]."""
    return jnp.einsum("bngqd,bnkd->bngqk", qi, kj, preferred_element_type=_F32) * scale


# ----------------------------------------------------------------------------- forward
def _forward(q, k, v, arrays, bq, bk):
    """Returns (out [B,S,H,D] in q.dtype, lse [nq,B,KVH,G,bq] float32)."""
    s, d = q.shape[1], q.shape[3]
    kvh = k.shape[2]
    scale = 1.0 / math.sqrt(d)
    qb = _q_blocks(q, kvh, bq)
    kb, vb = _kv_blocks(k, bk), _kv_blocks(v, bk)
    q_pos, kv_pos, q_seg, kv_seg = _mask_blocks(arrays, bq, bk)
    nk = kb.shape[0]
    stat_shape = qb.shape[1:-1]  # [B, KVH, G, bq]

    def q_block(xs):
        qi, qpi, qsi = xs

        def kv_step(j, carry):
            allowed = _allowed(qpi, qsi, kv_pos[j], kv_seg[j])

            def update(carry):
                m, l, acc = carry
                sc = jnp.where(allowed, _scores(qi, kb[j], scale), _MASK_VALUE)
                m_new = jnp.maximum(m, sc.max(-1))
                p = jnp.where(allowed, jnp.exp(sc - m_new[..., None]), 0.0)
                alpha = jnp.exp(m - m_new)
                pv = jnp.einsum(
                    "bngqk,bnkd->bngqd", p.astype(v.dtype), vb[j], preferred_element_type=_F32
                )
                return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

            return lax.cond(jnp.any(allowed), update, lambda c: c, carry)

        init = (
            jnp.full(stat_shape, _MASK_VALUE, _F32),
            jnp.zeros(stat_shape, _F32),
            jnp.zeros((*stat_shape, d), _F32),
        )
        m, l, acc = lax.fori_loop(0, nk, kv_step, init)
        l_safe = jnp.where(l == 0.0, 1.0, l)  # a row with no allowed key -> output 0
        return (acc / l_safe[..., None]).astype(q.dtype), m + jnp.log(l_safe)

    out, lse = lax.map(q_block, (qb, q_pos, q_seg))
    return _q_unblock(out, s), lse


# ----------------------------------------------------------------------------- backward
def _backward(q, k, v, arrays, out, lse, dout, bq, bk):
    """FlashAttention-2: outer loop over KV blocks (dK, dV of the block in registers), inner
    loop over query blocks; dQ accumulates in a float32 [S]-sized carry."""
    s, d = q.shape[1], q.shape[3]
    t, kvh = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d)
    qb, dob = _q_blocks(q, kvh, bq), _q_blocks(dout, kvh, bq)
    delta = jnp.einsum(  # rowsum(dO * O) [nq, B, KVH, G, bq]
        "nbgkqd,nbgkqd->nbgkq", dob.astype(_F32), _q_blocks(out, kvh, bq).astype(_F32)
    )
    kb, vb = _kv_blocks(k, bk), _kv_blocks(v, bk)
    q_pos, kv_pos, q_seg, kv_seg = _mask_blocks(arrays, bq, bk)
    nq = qb.shape[0]

    def kv_block(dq, xs):
        kj, vj, kpj, ksj = xs

        def q_step(i, carry):
            dq, dk, dv = carry
            allowed = _allowed(q_pos[i], q_seg[i], kpj, ksj)

            def update(dq_i, dk, dv):
                qi, doi = qb[i], dob[i]
                p = jnp.where(allowed, jnp.exp(_scores(qi, kj, scale) - lse[i][..., None]), 0.0)
                dv = dv + jnp.einsum(
                    "bngqk,bngqd->bnkd", p.astype(dout.dtype), doi, preferred_element_type=_F32
                )
                dp = jnp.einsum("bngqd,bnkd->bngqk", doi, vj, preferred_element_type=_F32)
                ds = p * (dp - delta[i][..., None]) * scale
                dk = dk + jnp.einsum(
                    "bngqk,bngqd->bnkd", ds.astype(q.dtype), qi, preferred_element_type=_F32
                )
                dq_i = dq_i + jnp.einsum(
                    "bngqk,bnkd->bngqd", ds.astype(k.dtype), kj, preferred_element_type=_F32
                )
                return dq_i, dk, dv

            dq_i, dk, dv = lax.cond(
                jnp.any(allowed),
                update,
                lambda *c: c,
                lax.dynamic_index_in_dim(dq, i, 0, False),
                dk,
                dv,
            )
            return lax.dynamic_update_index_in_dim(dq, dq_i, i, 0), dk, dv

        zeros = jnp.zeros(kj.shape, _F32)
        dq, dk, dv = lax.fori_loop(0, nq, q_step, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq0 = jnp.zeros(qb.shape, _F32)
    dq, (dk, dv) = lax.scan(kv_block, dq0, (kb, vb, kv_pos, kv_seg))
    return (
        _q_unblock(dq, s).astype(q.dtype),
        _kv_unblock(dk, t).astype(k.dtype),
        _kv_unblock(dv, t).astype(v.dtype),
    )


# ----------------------------------------------------------------------------- custom VJP
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, arrays, bq, bk):
    return _forward(q, k, v, arrays, bq, bk)[0]


def _flash_fwd(q, k, v, arrays, bq, bk):
    out, lse = _forward(q, k, v, arrays, bq, bk)
    out, lse = checkpoint_name(out, RESIDUAL_NAMES[0]), checkpoint_name(lse, RESIDUAL_NAMES[1])
    return out, (q, k, v, arrays, out, lse)


def _flash_bwd(bq, bk, res, dout):
    q, k, v, arrays, out, lse = res
    dq, dk, dv = _backward(q, k, v, arrays, out, lse, dout, bq, bk)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
