"""Splash attention (jax.experimental.pallas.ops.tpu.splash_attention) for the model's causal,
packed-segment self-attention: a per-device function and a shard_map wrapper.

Uses jax's own kernel (no tokamax). GQA runs without repeating K/V: the MHA kernel accepts
k/v with fewer heads and maps query head h to KV head h // (H // KVH) in its index maps (the
dK/dV kernel accumulates over each KV head's query heads). The static mask is CausalMask;
packed rows come in as SegmentIds. Splash does not scale the scores: q is multiplied by
1/sqrt(D) (in q.dtype) before the kernel.

Constraints (checked up front; violations raise SplashUnsupported, a ValueError, so `attend`
can fall back to flash): `mask.causal_self` (no KV cache), S == T, S a multiple of 128, every
block size a multiple of 128 dividing S. Pallas calls are not auto-partitioned: inside jit on
a mesh use `sharded_splash_attention`, which runs the per-device function under shard_map with
batch over the data axes and heads over the tensor axis.

Context parallelism (`context_parallel_splash`: q's sequence sharded; K/V enter split like q
and are all-gathered inside the shard_map, so their gradient is a reduce-scatter): the
kernel is built for the global (S, S) causal mask with `q_seq_shards` = the number of query
chunks, so its block-sparsity metadata (and the query indices its mask function compares with
the key indices) is split along q; the kernel itself is a shard_map argument sharded by its own
`manual_sharding_spec`, so each device runs its query chunk over all keys with the mask rows of
that chunk (the MaxText way). Each device skips the key blocks above its rows' diagonal, so
with contiguous chunks the last device would do the most work: by default the query rows are
load-balanced (`chunks`: device i attends half-chunks i and 2n - 1 - i; the mask's query
indices in that order).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec as P

from hunyuan_jax.model.kernels import chunks
from hunyuan_jax.model.kernels.mask import AttentionMask, check_shapes, shard_map_attention

DEFAULT_BLOCK = 512
LANES = 128
# checkpoint_name of the kernel's forward residuals (output and log-sum-exp): a remat policy
# saving it (jax.checkpoint_policies.save_only_these_names(RESIDUAL_NAME, ...)) keeps the
# backward from re-running the forward kernel.
RESIDUAL_NAME = "splash_residuals"


class SplashUnsupported(ValueError):
    """Splash cannot serve this mask or shape (use flash or xla)."""


def _pick_block(requested: int | None, length: int) -> int:
    if requested is not None:
        if requested % LANES or length % requested:
            raise SplashUnsupported(
                f"block size {requested} must be a multiple of {LANES} dividing length {length}"
            )
        return requested
    for block in (DEFAULT_BLOCK, 256, LANES):
        if length % block == 0:
            return block
    raise SplashUnsupported(f"sequence length {length} is not a multiple of {LANES}")


def block_sizes_for(
    length: int, block_q: int | None = None, block_kv: int | None = None
) -> sk.BlockSizes:
    """Splash BlockSizes for a self-attention of `length` tokens: block_q for every query
    tile, block_kv for every key tile (forward, dQ and dK/dV kernels), separate dQ kernel.
    Default: the largest of 512 / 256 / 128 dividing `length`."""
    if length % LANES:
        raise SplashUnsupported(f"sequence length {length} is not a multiple of {LANES}")
    bq, bkv = _pick_block(block_q, length), _pick_block(block_kv, length)
    return sk.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )


def check_supported(
    q_shape, kv_shape, mask: AttentionMask, block_q: int | None = None, block_kv: int | None = None
) -> None:
    """Raise SplashUnsupported unless splash can serve q [B,S,H,D] over k/v [B,T,KVH,D] with
    these block sizes. Shapes are per device (sharding never splits S)."""
    if not mask.causal_self:
        raise SplashUnsupported(
            "splash needs the static causal self-attention mask (AttentionMask.causal); "
            "cached / generic position masks need flash or xla"
        )
    s, t = q_shape[1], kv_shape[1]
    if s != t:
        raise SplashUnsupported(f"splash needs S == T, got S={s}, T={t}")
    block_sizes_for(s, block_q, block_kv)


class _BalancedCausalMask(sm.CausalMask):
    """The causal mask with the query axis in `chunks.balanced_order`: row r is the token at
    q_sequence[r] (the kernel compares q_sequence with the key index; its block-sparsity
    metadata is computed from the same rows)."""

    def __init__(self, length: int, num_chunks: int):
        super().__init__((length, length))
        self.q_sequence = chunks.balanced_order(length, num_chunks)


def _kernel(
    heads: int,
    length: int,
    block_sizes: sk.BlockSizes,
    interpret: bool,
    head_shards: int = 1,
    q_seq_shards: int = 1,
    balanced: bool = False,
):
    # Built at every trace: its mask metadata becomes jnp arrays of the current trace (a cached
    # kernel would leak them into later traces). The mask is lazy and splash caches its
    # metadata per mask (lru_cache), so later traces are cheap.
    one = _BalancedCausalMask(length, q_seq_shards) if balanced else sm.CausalMask((length, length))
    mask = sm.MultiHeadMask([one for _ in range(heads)])
    return sk.make_splash_mha(
        mask,
        block_sizes=block_sizes,
        head_shards=head_shards,
        q_seq_shards=q_seq_shards,
        residual_checkpoint_name=RESIDUAL_NAME,
        interpret=interpret,
    )


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: AttentionMask,
    *,
    block_q: int | None = None,
    block_kv: int | None = None,
    interpret: bool = False,
    kernel: sk.SplashAttentionKernel | None = None,
) -> jax.Array:
    """Per-device splash: q [B,S,H,D], k/v [B,S,KVH,D] -> [B,S,H,D] in q.dtype.

    Only the segment ids of `mask` are read (its positions are 0..S-1 by `causal_self`).
    interpret=True runs the kernel in the Pallas interpreter (any backend; slow).
    kernel: a kernel built (and checked) by the caller, this device's part of it
    (`context_parallel_splash`: q is then a query chunk [B,S/n,H,D] of k/v's S rows)."""
    check_shapes(q, k, v, mask)
    b, s, h, d = q.shape
    if kernel is None:
        check_supported(q.shape, k.shape, mask, block_q, block_kv)
        kernel = _kernel(h, s, block_sizes_for(s, block_q, block_kv), bool(interpret))
    q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    qt = q.transpose(0, 2, 1, 3)  # [B, H, S, D]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KVH, S, D]
    seg = sk.SegmentIds(q=mask.q_segments, kv=mask.kv_segments)
    out = jax.vmap(kernel)(qt, kt, vt, seg)
    return out.transpose(0, 2, 1, 3).astype(q.dtype)


def sharded_splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: AttentionMask,
    *,
    mesh: jax.sharding.Mesh,
    q_spec: P,
    kv_spec: P | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """splash_attention under `jax.shard_map` on `mesh` (Pallas calls are not partitioned by
    XLA). q_spec: PartitionSpec of q [B,S,H,D], e.g. P(("data", "fsdp"), None, "tensor",
    None); kv_spec: of k/v [B,S,KVH,D] (default q_spec); segment ids follow the batch axis.
    Spec requirements: see mask.shard_map_attention (ValueError)."""
    check_supported(q.shape, k.shape, mask, block_q, block_kv)

    def local(q, k, v, mask):
        return splash_attention(
            q, k, v, mask, block_q=block_q, block_kv=block_kv, interpret=interpret
        )

    return shard_map_attention(local, q, k, v, mask, mesh=mesh, q_spec=q_spec, kv_spec=kv_spec)


def _size(mesh: jax.sharding.Mesh, entry) -> int:
    axes = () if entry is None else (tuple(entry) if isinstance(entry, tuple | list) else (entry,))
    return math.prod(mesh.shape[a] for a in axes)


def context_parallel_splash(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: AttentionMask,
    *,
    mesh: jax.sharding.Mesh,
    q_spec: P,
    kv_spec: P,
    block_q: int | None = None,
    block_kv: int | None = None,
    interpret: bool = False,
    balanced: bool = True,
) -> jax.Array:
    """Splash with q's sequence sharded (q_spec[1]; kv_spec: K/V's batch and heads as q's,
    length None: gathered inside, after each device's chunk enters like q's): the
    global causal self-attention of q [B,S,H,D] over k/v [B,S,KVH,D] (global shapes), each
    device computing its query chunk. The block sizes must divide the chunk
    (SplashUnsupported otherwise). balanced: each device attends half-chunks i and
    2n - 1 - i instead of its contiguous chunk i (`chunks`: equal work per device; its
    queries and output move by collective permutes); needs S % (2n) == 0, else contiguous."""
    check_shapes(q, k, v, mask)
    check_supported(q.shape, k.shape, mask)
    qs = tuple(q_spec) + (None,) * (4 - len(q_spec))
    b, s, h, d = q.shape
    num_chunks, head_shards = _size(mesh, qs[1]), _size(mesh, qs[2])
    if s % num_chunks:
        raise SplashUnsupported(f"{num_chunks} query chunks do not divide the sequence {s}")
    sizes = block_sizes_for(s // num_chunks, block_q, block_kv)
    balanced = balanced and num_chunks > 1 and s % (2 * num_chunks) == 0
    kernel = _kernel(h, s, sizes, bool(interpret), head_shards, num_chunks, balanced)
    kernel_spec = kernel.manual_sharding_spec(jax.sharding.NamedSharding(mesh, P(qs[2], qs[1])))
    axes = tuple(qs[1]) if isinstance(qs[1], tuple | list) else (qs[1],)
    ks = tuple(kv_spec) + (None,) * (4 - len(kv_spec))
    if ks[0] != qs[0] or ks[2] != qs[2] or ks[1] is not None or qs[3] or ks[3]:
        raise ValueError(f"context-parallel splash: q {q_spec} and kv {kv_spec} do not match")
    # K/V come in split like q (each device projected its own tokens) and are gathered here:
    # the gradient of the gather is then a reduce-scatter, not an all-reduce of whole K/V.
    rows = P(qs[0], qs[1])
    specs = (
        P(*qs),
        P(ks[0], qs[1], ks[2], None),
        P(ks[0], qs[1], ks[2], None),
        AttentionMask(rows, rows, rows, rows, mask.causal_self),
        kernel_spec,
    )

    def local(q, k, v, mask, kernel):
        gather = lambda x: jax.lax.all_gather(x, axes, axis=1, tiled=True)
        k, v = gather(k), gather(v)
        mask = mask._replace(kv_positions=gather(mask.kv_positions))
        mask = mask._replace(kv_segments=gather(mask.kv_segments))
        if not balanced:
            return splash_attention(q, k, v, mask, kernel=kernel)
        q = chunks.to_balanced(q, axes, num_chunks)
        mask = mask._replace(q_segments=chunks.to_balanced(mask.q_segments, axes, num_chunks))
        out = splash_attention(q, k, v, mask, kernel=kernel)
        return chunks.from_balanced(out, axes, num_chunks)

    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(*qs), check_vma=False)(
        q, k, v, mask, kernel
    )
