"""What every attention kernel shares, in a module of its own so that the kernels (flash, splash)
and the dispatcher (`attention.attend`) import it and not each other: the mask
(`AttentionMask`), the shape check of q / k / v against it, and running a per-device kernel
under `jax.shard_map` (`shard_map_attention`).

Shapes: q [B, S, H, D], k, v [B, T, KVH, D] with H % KVH == 0.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


class AttentionMask(NamedTuple):
    """allowed(b, s, t) = kv_positions[b, t] <= q_positions[b, s]
                          and q_segments[b, s] == kv_segments[b, t].

    q_positions, q_segments: [B, S] int32; kv_positions, kv_segments: [B, T] int32.
    `causal_self` is static (pytree metadata, not a leaf): True promises the plain causal
    self-attention mask, S == T and both position vectors 0..S-1 (only `causal` sets it), which
    is what splash needs. The mask is a pytree: pass it through jit / scan / checkpoint like
    any array tuple; the flag travels in the tree structure and stays a Python bool.

    A query row with no allowed key is undefined across implementations (xla: mean of all v,
    flash: zeros); neither constructor produces one.
    """

    q_positions: jax.Array
    kv_positions: jax.Array
    q_segments: jax.Array
    kv_segments: jax.Array
    causal_self: bool = False

    @classmethod
    def causal(cls, segment_ids: jax.Array) -> AttentionMask:
        """No cache: token s attends to t <= s of its own segment. segment_ids: [B, S] (packed
        rows; 0 = padding, which attends to other padding like any segment)."""
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        b, s = segment_ids.shape
        pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        return cls(pos, pos, segment_ids, segment_ids, causal_self=True)

    @classmethod
    def cached(cls, index: jax.Array, num_queries: int, cache_len: int) -> AttentionMask:
        """KV cache: row b's S queries sit at index[b] + (0..S-1) and attend to every cache
        slot t <= their position (slot t holds the token at position t)."""
        index = jnp.asarray(index, jnp.int32)
        b = index.shape[0]
        q_pos = index[:, None] + jnp.arange(num_queries, dtype=jnp.int32)[None, :]
        kv_pos = jnp.broadcast_to(jnp.arange(cache_len, dtype=jnp.int32), (b, cache_len))
        return cls(
            q_pos,
            kv_pos,
            jnp.ones((b, num_queries), jnp.int32),
            jnp.ones((b, cache_len), jnp.int32),
        )

    def dense(self) -> jax.Array:
        """The [B, S, T] bool mask (materialised: for the reference and tests)."""
        return (self.kv_positions[:, None, :] <= self.q_positions[:, :, None]) & (
            self.q_segments[:, :, None] == self.kv_segments[:, None, :]
        )


jax.tree_util.register_pytree_node(
    AttentionMask,
    lambda m: (tuple(m[:4]), m.causal_self),
    lambda causal_self, leaves: AttentionMask(*leaves, causal_self=causal_self),
)


def check_shapes(q, k, v, mask: AttentionMask) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B,S,H,D], k = v [B,T,KVH,D]; got {q.shape}, {k.shape}")
    b, s, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or h % k.shape[2]:
        raise ValueError(f"q {q.shape} and k {k.shape}: batch/head_dim differ or H % KVH != 0")
    t = k.shape[1]
    want = ((b, s), (b, t), (b, s), (b, t))
    got = tuple(x.shape for x in mask[:4])
    if got != want:
        raise ValueError(f"mask shapes {got} do not match q/k (want {want})")


def _axes(entry) -> tuple:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple | list) else (entry,)


def shard_map_attention(fn, q, k, v, mask: AttentionMask, *, mesh, q_spec, kv_spec=None):
    """Run the per-device attention `fn(q, k, v, mask)` under `jax.shard_map` on `mesh`.

    q_spec: PartitionSpec of q [B,S,H,D], e.g. P(("data", "fsdp"), None, "tensor", None);
    kv_spec: of k and v [B,T,KVH,D] (default q_spec). The mask's [B,S] / [B,T] arrays are
    sharded like q's / K/V's batch and length; the output has q_spec. q's length may be
    sharded (context parallelism: every device holds all keys of its rows); each device must
    hold whole K/V rows and the KV heads of its own query heads, so (else ValueError): K/V
    length and head_dim unsharded,
    q and kv sharded alike over batch and heads, H and KVH divisible by the head-axis size."""
    kv_spec = q_spec if kv_spec is None else kv_spec
    qs = tuple(q_spec) + (None,) * (4 - len(q_spec))
    ks = tuple(kv_spec) + (None,) * (4 - len(kv_spec))
    if _axes(qs[3]) or _axes(ks[1]) or _axes(ks[3]):
        raise ValueError(f"attention cannot shard K/V length or head_dim: q {q_spec}, kv {kv_spec}")
    if _axes(qs[0]) != _axes(ks[0]) or _axes(qs[2]) != _axes(ks[2]):
        raise ValueError(f"q {q_spec} and kv {kv_spec} must shard batch and heads alike")
    head_shards = math.prod(mesh.shape[a] for a in _axes(qs[2]))
    if k.shape[2] % head_shards or q.shape[2] % head_shards:
        raise ValueError(
            f"{q.shape[2]} query / {k.shape[2]} KV heads do not split over {head_shards} devices"
        )
    rows, q_rows = P(qs[0], None), P(qs[0], qs[1])
    # Context parallelism (q's length sharded, K/V whole): each device attends its own query
    # chunk over every key, masked by positions (no longer the same rows as the keys).
    causal_self = mask.causal_self and not _axes(qs[1])
    mask = mask._replace(causal_self=causal_self) if causal_self != mask.causal_self else mask
    mask_specs = AttentionMask(q_rows, rows, q_rows, rows, causal_self)
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(P(*qs), P(*ks), P(*ks), mask_specs),
        out_specs=P(*qs),
        check_vma=False,
    )(q, k, v, mask)
