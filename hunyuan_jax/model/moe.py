"""Mixture of experts: the router (float32 softmax, top-k), the dropless grouped-matmul expert
computation, and the MoE block (shared expert + routed experts) of Hunyuan-Large.

Routing follows the original code: `p = softmax(x.float() @ wg^T)` over all experts, top-k by
value; the routed weight is the raw probability for top-1 and is renormalised over the chosen
experts only when k > 1.

Dropless dispatch sorts the (token, choice) pairs by expert and runs one `jax.lax.ragged_dot`
per projection: memory is O(tokens x k x hidden), never tokens x experts x capacity. Two exact
alternatives serve decoding (`few_token_experts`, `tiled_experts`), and training uses capacity
routing with random compensation (`make_capacity_experts`). Expert-parallel dispatch across
devices lives in `hunyuan_jax.model.expert_parallel`. Which one runs is decided in one place,
`hunyuan_jax.model.dispatch.experts_fn_for(phase, ...)`; the MoE block receives it as `experts_fn`.

Every `ExpertsFn` takes tokens with any leading shape ([B, S, D] from the model) and routing
arrays with the same leading shape; the single-device strategies flatten them (`on_tokens`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from hunyuan_jax.model import qops
from hunyuan_jax.model.config import ModelConfig
from hunyuan_jax.model.layers import MLP, param
from hunyuan_jax.model.policy import RuntimePolicy


class Routing(NamedTuple):
    """Per-token routing decisions (T tokens, k choices, E experts)."""

    expert_ids: jax.Array  # [T, k] int32
    weights: jax.Array  # [T, k] float32 (raw top-1 probability, renormalised for k > 1)
    probs: jax.Array  # [T, E] float32 full softmax
    log_z: jax.Array  # [T] float32 logsumexp of the router logits (for the z-loss)


class ExpertWeights(NamedTuple):
    """Stacked routed-expert weights, already cast to the compute dtype."""

    gate: jax.Array  # [E, D, F]
    up: jax.Array  # [E, D, F]
    down: jax.Array  # [E, F, D]


# experts_fn(x [T, D], routing, weights, key) -> ([T, D] routed part of the MoE output, extra
# stats): the hook through which training-time capacity routing and expert parallelism plug in.
# `key` is a per-layer PRNG key in training and None at inference.
ExpertsFn = Callable[[jax.Array, Routing, ExpertWeights, jax.Array | None], tuple[jax.Array, dict]]


def on_tokens(fn):
    """A strategy written for tokens [T, D] and routing [T, ...] as an `ExpertsFn` for any
    leading shape (e.g. [B, S, D]): flattens the leading dims, unflattens the output."""

    @functools.wraps(fn)
    def experts_fn(x, routing, w, key=None):
        lead = x.shape[:-1]
        flat = Routing(*(a.reshape((-1,) + a.shape[len(lead) :]) for a in routing))
        out, stats = fn(x.reshape(-1, x.shape[-1]), flat, w, key)
        return out.reshape(x.shape), stats

    return experts_fn


def route(x: jax.Array, router_kernel: jax.Array, top_k: int) -> Routing:
    """Router in float32: softmax over all experts, then top-k."""
    logits = jnp.dot(
        x.astype(jnp.float32),
        router_kernel.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    probs = jax.nn.softmax(logits, axis=-1)
    weights, expert_ids = jax.lax.top_k(probs, top_k)
    if top_k > 1:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(expert_ids.astype(jnp.int32), weights, probs, jax.nn.logsumexp(logits, axis=-1))


def swiglu_grouped(xs: jax.Array, group_sizes: jax.Array, w: ExpertWeights) -> jax.Array:
    """SwiGLU of rows already sorted by expert: rows [offset_e, offset_e + size_e) use expert e."""
    gate = checkpoint_name(qops.ragged_dot(xs, w.gate, group_sizes), "moe_gate")
    up = checkpoint_name(qops.ragged_dot(xs, w.up, group_sizes), "moe_up")
    down = qops.ragged_dot(jax.nn.silu(gate) * up, w.down, group_sizes)
    return checkpoint_name(down, "moe_down")


@on_tokens
def dropless_experts(
    x: jax.Array, routing: Routing, w: ExpertWeights, key: jax.Array | None = None
) -> tuple[jax.Array, dict]:
    """Every (token, choice) pair is computed: sort by expert, grouped matmul, unsort, combine."""
    num_tokens, k = routing.expert_ids.shape
    num_experts = w.gate.shape[0]
    flat_expert = routing.expert_ids.reshape(-1)
    order = jnp.argsort(flat_expert, stable=True)
    token_of_row = order // k
    group_sizes = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)
    y = swiglu_grouped(x[token_of_row], group_sizes, w)  # [T*k, D], sorted by expert
    y = y[jnp.argsort(order)].reshape(num_tokens, k, -1)  # back to (token, choice) order
    combined = jnp.einsum("tkd,tk->td", y.astype(jnp.float32), routing.weights)
    return combined.astype(x.dtype), {}


class SlotAssignment(NamedTuple):
    """Capacity routing result: each (token, choice) pair gets an expert and a buffer slot."""

    expert_ids: jax.Array  # [T, k] int32, after re-assignment
    slots: jax.Array  # [T, k] int32 position in the expert's buffer, == capacity if dropped
    weights: jax.Array  # [T, k] float32 (0 for dropped pairs)
    rerouted: jax.Array  # [T, k] bool
    dropped: jax.Array  # [T, k] bool


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(capacity_factor * tokens * k / experts)."""
    return max(1, -(-int(capacity_factor * num_tokens * top_k) // num_experts))


def assign_slots(routing: Routing, capacity: int, key: jax.Array | None) -> SlotAssignment:
    """Training-time routing with "random compensation" (Hunyuan-Large report).

    Pairs are queued per expert in (choice, token) order; a pair past its expert's capacity is
    not dropped but re-assigned to a uniformly random free slot among all experts with room
    left, weighted by its probability for the new expert (renormalised like the original
    choices when k > 1). A pair is dropped only when every slot is taken. key=None re-assigns
    deterministically (free slots in order).
    """
    num_tokens, k = routing.expert_ids.shape
    num_experts = routing.probs.shape[-1]
    flat_e = routing.expert_ids.T.reshape(-1)  # choice-major: first choices queue first
    one_hot = jax.nn.one_hot(flat_e, num_experts, dtype=jnp.int32)
    position = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)  # [k*T]
    overflow = position >= capacity
    taken = jnp.minimum(jnp.sum(one_hot, axis=0), capacity)  # [E]
    # Free slots of all experts, in random order (or in order without a key).
    slot_ids = jnp.arange(num_experts * capacity, dtype=jnp.int32)
    free = (slot_ids % capacity) >= taken[slot_ids // capacity]
    noise = jnp.zeros(slot_ids.shape) if key is None else jax.random.uniform(key, slot_ids.shape)
    free_in_order = slot_ids[jnp.argsort(jnp.where(free, noise, 2.0), stable=True)]
    rank = jnp.cumsum(overflow) - 1  # the i-th overflowing pair takes the i-th free slot
    num_free = jnp.sum(free)
    new_slot = free_in_order[jnp.clip(rank, 0, slot_ids.shape[0] - 1)]
    dropped = overflow & (rank >= num_free)
    rerouted = overflow & ~dropped
    expert = jnp.where(rerouted, new_slot // capacity, flat_e)
    slot = jnp.where(rerouted, new_slot % capacity, jnp.where(dropped, capacity, position))
    to_tk = lambda a: a.reshape(k, num_tokens).T
    expert, slot, rerouted, dropped = map(to_tk, (expert, slot, rerouted, dropped))
    prob = jnp.take_along_axis(routing.probs, expert, axis=-1)
    if k > 1:  # same normaliser as the original choices
        orig = jnp.take_along_axis(routing.probs, routing.expert_ids, axis=-1)
        prob = prob / jnp.sum(orig, axis=-1, keepdims=True)
    weights = jnp.where(rerouted, prob, routing.weights)
    weights = jnp.where(dropped, 0.0, weights)
    return SlotAssignment(
        expert.astype(jnp.int32), slot.astype(jnp.int32), weights, rerouted, dropped
    )


def dispatch(x: jax.Array, a: SlotAssignment, num_experts: int, capacity: int) -> jax.Array:
    """Tokens into per-expert buffers [E, C, D] (dropped pairs go nowhere)."""
    k = a.expert_ids.shape[1]
    buffers = jnp.zeros((num_experts, capacity + 1, x.shape[-1]), x.dtype)  # +1: drop slot
    rows = jnp.repeat(x, k, axis=0)
    buffers = buffers.at[a.expert_ids.reshape(-1), a.slots.reshape(-1)].set(rows)
    return buffers[:, :capacity]


def combine(buffers: jax.Array, a: SlotAssignment, dtype) -> jax.Array:
    """Per-expert outputs [E, C, D] back to tokens, weighted: [T, D]."""
    y = buffers[a.expert_ids, jnp.minimum(a.slots, buffers.shape[1] - 1)]  # [T, k, D]
    weights = jnp.where(a.dropped, 0.0, a.weights)
    return jnp.einsum("tkd,tk->td", y.astype(jnp.float32), weights).astype(dtype)


def swiglu_batched(buffers: jax.Array, w: ExpertWeights) -> jax.Array:
    """SwiGLU of every expert on its own buffer: [E, C, D] -> [E, C, D]."""
    gate = checkpoint_name(qops.einsum("ecd,edf->ecf", buffers, w.gate), "moe_gate")
    up = checkpoint_name(qops.einsum("ecd,edf->ecf", buffers, w.up), "moe_up")
    down = qops.einsum("ecf,efd->ecd", jax.nn.silu(gate) * up, w.down)
    return checkpoint_name(down, "moe_down")


def capacity_stats(a: SlotAssignment) -> dict[str, jax.Array]:
    return {
        "rerouted_fraction": jnp.mean(a.rerouted.astype(jnp.float32)),
        "dropped_fraction": jnp.mean(a.dropped.astype(jnp.float32)),
    }


def make_capacity_experts(capacity_factor: float) -> ExpertsFn:
    """The single-device training path: capacity routing with random compensation."""

    @on_tokens
    def experts_fn(x, routing, w, key):
        num_experts = w.gate.shape[0]
        capacity = expert_capacity(
            x.shape[0], routing.expert_ids.shape[1], num_experts, capacity_factor
        )
        a = assign_slots(routing, capacity, key)
        out = swiglu_batched(dispatch(x, a, num_experts, capacity), w)
        return combine(out, a, x.dtype), capacity_stats(a)

    return experts_fn


@on_tokens
def few_token_experts(x: jax.Array, routing, w, key=None):
    """Routed experts for a handful of tokens (decode steps): for each choice j, every token's
    chosen expert weights are gathered ([T, D, F]) and applied to that token alone, so a step
    reads only the chosen experts' weights, never all of them (the grouped matmul's cost at
    small batch), one batched matmul per projection instead of one slice and matvec per token
    (measured: docs/performance.md). Meant for T*k <= num_experts.
    Same math as `moe.dropless_experts`."""
    _, k = routing.expert_ids.shape
    acc = jnp.zeros(x.shape, jnp.float32)
    for j in range(k):
        e = routing.expert_ids[:, j]
        gate = qops.einsum("td,tdf->tf", x, qops.take(w.gate, e))
        up = qops.einsum("td,tdf->tf", x, qops.take(w.up, e))
        y = qops.einsum("tf,tfd->td", jax.nn.silu(gate) * up, qops.take(w.down, e))
        acc = acc + y.astype(jnp.float32) * routing.weights[:, j, None]
    return acc.astype(x.dtype), {}


@on_tokens
def tiled_experts(x: jax.Array, routing, w, key=None):
    """Routed experts for many tokens as fixed-size row tiles: (token, choice) pairs sorted by
    expert, each expert's group padded to a multiple of the tile size m, then one matmul per
    tile with its expert's weights indexed dynamically (`lax.map` over the tiles). Exact
    (dropless); computes at most T*k + E*(m-1) rows. For CPU, where `jax.lax.ragged_dot`'s
    lowering is slow (docs/performance.md); accelerators keep the model's ragged_dot. Same math
    as `moe.dropless_experts`."""
    num_tokens, k = routing.expert_ids.shape
    num_experts = w.gate.shape[0]
    pairs = num_tokens * k
    m = int(min(64, max(8, 1 << max(0, math.ceil(math.log2(max(pairs / num_experts, 1)))))))
    flat = routing.expert_ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # pair indices sorted by expert
    sizes = jnp.bincount(flat, length=num_experts)
    padded = (sizes + m - 1) // m * m
    ends = jnp.cumsum(padded)
    sorted_expert = flat[order]
    rank = jnp.arange(pairs) - (jnp.cumsum(sizes) - sizes)[sorted_expert]
    dest = (ends - padded)[sorted_expert] + rank  # row of each sorted pair in the tiled layout
    num_tiles = (pairs + num_experts * (m - 1)) // m + 1
    rows = (
        jnp.full((num_tiles * m,), num_tokens, jnp.int32)
        .at[dest]
        .set((order // k).astype(jnp.int32))
    )  # token of each row; num_tokens = a zero pad row
    xs = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])[rows]
    tile_expert = jnp.minimum(
        jnp.searchsorted(ends, jnp.arange(num_tiles) * m, side="right"), num_experts - 1
    )

    def tile(args):
        xt, e = args
        take, mm = (lambda a: qops.take(a, e)), qops.matmul
        return mm(jax.nn.silu(mm(xt, take(w.gate))) * mm(xt, take(w.up)), take(w.down))

    y = jax.lax.map(tile, (xs.reshape(num_tiles, m, -1), tile_expert)).reshape(num_tiles * m, -1)
    y = y[dest][jnp.argsort(order)].reshape(num_tokens, k, -1)  # back to (token, choice)
    combined = jnp.einsum("tkd,tk->td", y.astype(jnp.float32), routing.weights)
    return combined.astype(x.dtype), {}


def float8_as_activations(fn: ExpertsFn) -> ExpertsFn:
    """`fn` run with float8 expert values cast to the activations' dtype first (`qops.float8_as`:
    exact, so the same math; one layer's local experts in that dtype as a temporary)."""

    @functools.wraps(fn)
    def experts_fn(x, routing, w, key=None):
        return fn(x, routing, ExpertWeights(*(qops.float8_as(a, x.dtype) for a in w)), key)

    return experts_fn


def load_balancing_stats(routing: Routing, num_experts: int) -> dict[str, jax.Array]:
    """Switch auxiliary loss E * sum_e(mean p_e * fraction routed to e), the load histogram and
    the router z-loss mean(logsumexp(logits)^2)."""
    counts = jnp.zeros((num_experts,), jnp.float32).at[routing.expert_ids.reshape(-1)].add(1.0)
    fraction = counts / jnp.maximum(jnp.sum(counts), 1.0)
    mean_prob = jnp.mean(routing.probs.reshape(-1, num_experts), axis=0)
    return {
        "aux_loss": num_experts * jnp.sum(mean_prob * fraction),
        "expert_load": fraction,
        "z_loss": jnp.mean(jnp.square(routing.log_z)),
    }


class MoE(nnx.Module):
    """Shared SwiGLU expert plus routed SwiGLU experts (Hunyuan-Large "mixed MLP-MoE")."""

    def __init__(self, cfg: ModelConfig, policy: RuntimePolicy, *, rngs: nnx.Rngs):
        self.num_experts = cfg.num_experts
        self.top_k = cfg.moe_top_k
        self.compute_dtype = jnp.dtype(policy.compute_dtype)
        d, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
        std, pdt = cfg.initializer_range, jnp.dtype(policy.param_dtype)
        # The router stays float32 whatever the parameter dtype (as in the released checkpoints).
        self.router = param(rngs, (d, e), ("embed", "router"), jnp.float32, std)
        self.shared = MLP(cfg, policy, rngs=rngs) if cfg.num_shared_experts else None
        self.gate_proj = param(rngs, (e, d, f), ("exp", "exp_embed", "exp_mlp"), pdt, std)
        self.up_proj = param(rngs, (e, d, f), ("exp", "exp_embed", "exp_mlp"), pdt, std)
        self.down_proj = param(rngs, (e, f, d), ("exp", "exp_mlp", "exp_embed"), pdt, std)

    def expert_weights(self, lora_key=None) -> ExpertWeights:
        w = lambda name: qops.weight(self, name, self.compute_dtype, lora_key)
        return ExpertWeights(w("gate_proj"), w("up_proj"), w("down_proj"))

    def __call__(
        self, x: jax.Array, experts_fn: ExpertsFn, key: jax.Array | None = None, lora_key=None
    ):
        """x: [B, S, D] -> ([B, S, D], load-balancing stats). `experts_fn` computes the routed
        part (`hunyuan_jax.model.dispatch.experts_fn_for` picks it); `key` only in training;
        `lora_key`: the LoRA adapters' dropout key in training."""
        routing = route(x, self.router[...], self.top_k)
        routed, extra = experts_fn(x, routing, self.expert_weights(lora_key), key)
        out = routed.astype(x.dtype)
        if self.shared is not None:
            out = out + self.shared(x, lora_key)
        return out, {**load_balancing_stats(routing, self.num_experts), **extra}
