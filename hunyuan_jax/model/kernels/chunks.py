"""Load-balanced causal chunks for context parallelism: the query order in which every device
does the same attention work, and the collective permutes into and out of it.

With the sequence split into n contiguous chunks, causal attention gives device i work
proportional to 2i + 1 (its rows see i + 1/2 chunks of keys on average): the last device does
(2n - 1) / n times the mean. Split into 2n half-chunks instead and give device i half-chunks
i and 2n - 1 - i: each device then sees 2n key half-chunks' worth, the same for all.

The model keeps its contiguous layout (positions, RoPE, loss: nothing else sees the order);
attention moves each device's query half-chunks (and their segment ids) into the balanced
order with `to_balanced` inside shard_map, runs its kernel with a mask in that order
(`balanced_order`: row r of the global query axis is token balanced_order[r]) and moves the
output back with `from_balanced`. Four collective permutes each way, each a half-chunk per
device (the query chunk and the output: small next to the gathered K/V).
"""

from __future__ import annotations

import jax
import numpy as np


def balanced_order(length: int, chunks: int) -> np.ndarray:
    """int32 [length]: the token at each row of the balanced query axis (chunk i of `chunks`
    holds half-chunks i and 2 * chunks - 1 - i, in that order). length % (2 * chunks) == 0."""
    if length % (2 * chunks):
        raise ValueError(f"{length} tokens do not split into {2 * chunks} half-chunks")
    half = length // (2 * chunks)
    ids = np.arange(length, dtype=np.int32).reshape(2 * chunks, half)
    return np.concatenate([ids[[i, 2 * chunks - 1 - i]] for i in range(chunks)]).reshape(-1)


def _moves(chunks: int, inverse: bool) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """{(source slot, destination slot): [(source device, destination device)]}: where each
    half-chunk goes. Contiguous: device j holds half-chunks 2j (slot 0), 2j + 1 (slot 1);
    balanced: device i holds i (slot 0), 2 * chunks - 1 - i (slot 1)."""
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for dev in range(chunks):
        for slot, h in enumerate((dev, 2 * chunks - 1 - dev)):
            src, dst = (h // 2, h % 2), (dev, slot)  # contiguous -> balanced
            if inverse:
                src, dst = dst, src
            groups.setdefault((src[1], dst[1]), []).append((src[0], dst[0]))
    return groups


def _permute(x: jax.Array, axes: tuple[str, ...], chunks: int, inverse: bool) -> jax.Array:
    # x: this device's [B, 2 * half, ...] query rows, two half-chunks (slots) along axis 1.
    half = x.shape[1] // 2
    slots = (x[:, :half], x[:, half:])
    out = [None, None]
    for (src, dst), pairs in _moves(chunks, inverse).items():
        # Every device receives each destination slot from exactly one group (the others
        # deliver zeros to it), so the sum is the received half-chunk, bit for bit.
        moved = jax.lax.ppermute(slots[src], axes, pairs)
        out[dst] = moved if out[dst] is None else out[dst] + moved
    return jax.numpy.concatenate(out, axis=1)


def to_balanced(x: jax.Array, axes: tuple[str, ...], chunks: int) -> jax.Array:
    """Inside shard_map over `axes` (the query chunks, `chunks` of them): this device's
    contiguous rows [B, S/chunks, ...] -> its rows of the balanced order."""
    return _permute(x, axes, chunks, inverse=False)


def from_balanced(x: jax.Array, axes: tuple[str, ...], chunks: int) -> jax.Array:
    """The inverse of `to_balanced`."""
    return _permute(x, axes, chunks, inverse=True)
