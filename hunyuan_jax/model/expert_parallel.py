"""Expert parallelism: routed experts live on the devices of the mesh axes that the rules give
the logical axis `exp`; tokens travel to them inside `jax.shard_map`.

Two strategies, both `ExpertsFn`s for `MoE.__call__(experts_fn=...)`:

* `all_to_all` (training): each device routes its own tokens into fixed-size per-expert buffers
  (capacity routing with random compensation, `moe.assign_slots`), an all-to-all over the expert
  axes brings each expert its buffers from every peer, the experts run, a second all-to-all
  returns the results. Fixed-size buffers work on every backend (XLA:CPU has no
  `ragged_all_to_all`).
* `gather` (dropless; inference and decode): tokens are all-gathered over the expert axes, each
  device runs its local experts on the rows routed to them (sorted, `ragged_dot`), and a
  reduce-scatter sums the partial outputs back to the token owners. Nothing is ever dropped.

Inside, expert weights sharded over other axes are handled as FSDP (`exp_embed`: all-gathered
before use) and tensor parallelism (`exp_mlp`: partial sums reduced with `psum`).
The code never names a mesh axis: it reads them from the rules.

Quantized expert weights (qwix `QArray`s, `hunyuan_jax.model.quantize`) enter the `shard_map` as they
are stored: the values with the weight's spec, the scales with the same spec except on their
size-1 (contracted) dims (int4's grouped contracted dims keep the spec: a device's slice of the
contraction holds whole groups, `ShardingPlan.check_state` sees that the group count divides);
the FSDP all-gather moves the int8 / fp8 / int4 values (and the scales where they are sharded),
and each device dequantizes only its local experts next to the matmul.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hunyuan_jax.model import moe
from hunyuan_jax.model.moe import ExpertWeights, Routing
from hunyuan_jax.model.qops import Adapted, QArray
from sharding.gathered import LocalShard, gather_shards, scatter_by_all_to_all

STRATEGIES = ("gather", "all_to_all")


def make_expert_parallel_fn(
    plan, strategy: str = "gather", capacity_factor: float = 1.0
) -> moe.ExpertsFn:
    """An ExpertsFn running the routed experts sharded over the plan's mesh as its rules place
    them. Tokens [B, S, D] enter the `shard_map` with the layout the plan gives the logical
    axes (batch, length): the same layout as every other activation, so nothing is resharded
    on the way in or out."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown expert-parallel strategy {strategy!r}; use one of {STRATEGIES}")
    mesh = plan.mesh
    ep_axes = plan.mesh_axes("exp")
    fsdp_axes = tuple(a for a in plan.mesh_axes("exp_embed") if a not in ep_axes)
    tp_axes = tuple(a for a in plan.mesh_axes("exp_mlp") if a not in ep_axes + fsdp_axes)
    float_specs = ExpertWeights(
        P(ep_axes or None, fsdp_axes or None, tp_axes or None),
        P(ep_axes or None, fsdp_axes or None, tp_axes or None),
        P(ep_axes or None, tp_axes or None, fsdp_axes or None),
    )

    def experts_fn(x, routing: Routing, w: ExpertWeights, key):
        num_experts = w.gate.shape[0]
        ep = math.prod(mesh.shape[a] for a in ep_axes)
        if num_experts % ep:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the expert-parallel "
                f"mesh axes {ep_axes} of size {ep}"
            )
        lead = x.shape[:-1]
        names = ("batch", "length")[: len(lead)]
        tok_spec = _token_spec(plan.activation_spec(names, lead), ep_axes, tp_axes)
        tok_axes = tuple(a for axes in tok_spec for a in _names(axes))
        with_dims = lambda extra: P(*tok_spec, *([None] * extra))
        body = partial(
            _gather_body if strategy == "gather" else _all_to_all_body,
            planes=scatter_by_all_to_all(mesh),
            ep_axes=ep_axes,
            fsdp_axes=fsdp_axes,
            tp_axes=tp_axes,
            tokens_over_ep=set(ep_axes) <= set(tok_axes),
            tok_axes=tok_axes,
            capacity_factor=capacity_factor,
        )
        if key is None:
            key = jax.random.key(0)  # unused by the dropless strategy
        routing_specs = Routing(with_dims(1), with_dims(1), with_dims(1), with_dims(0))
        w_specs = ExpertWeights(*(_leaf_spec(a, spec) for a, spec in zip(w, float_specs)))
        fn = jax.shard_map(
            _flat(body),
            mesh=mesh,
            in_specs=(with_dims(1), routing_specs, w_specs, P()),
            out_specs=(with_dims(1), P()),
            check_vma=False,
        )
        return fn(x, routing, w, key)

    return experts_fn


def _names(axes) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _token_spec(spec: P, ep_axes, tp_axes) -> P:
    """The tokens' layout inside the shard_map: the plan's (batch, length) layout, except that
    tokens are never split over the tensor-parallel axes (the bodies `psum` partial outputs of
    the *same* tokens over them) and are split over all the expert-parallel axes or none (the
    bodies either exchange tokens over all of them or treat them as replicas). Layouts outside
    that (e.g. `--rule length=tensor`, or a batch that only divides some axes of a multi-axis
    `exp` rule) are resharded on the way in instead of being silently summed wrongly."""
    present = {a for axes in spec for a in _names(axes)}
    drop = set(tp_axes) | (set() if set(ep_axes) <= present else set(ep_axes))
    out = []
    for axes in spec:
        kept = tuple(a for a in _names(axes) if a not in drop)
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return P(*out)


def _flat(body):
    """The per-device body sees its tokens as [T_local, D] (and routing as [T_local, ...])."""

    def flat_body(x, routing, w, key):
        lead = x.shape[:-1]
        routing = Routing(*(a.reshape((-1,) + a.shape[len(lead) :]) for a in routing))
        y, stats = body(x.reshape(-1, x.shape[-1]), routing, w, key)
        return y.reshape(x.shape), stats

    return flat_body


def _leaf_spec(w, spec: P):
    """The in_spec of one expert weight: `spec` for an array; for a QArray, `spec` for its
    values and `spec` without the axes of its size-1 (contracted) dims for its scales; for a
    LoRA-adapted weight [E, X, Y], its base's and A [E, X, r] / B [E, r, Y] laid out like it."""
    if isinstance(w, Adapted):
        a, b = P(spec[0], spec[1], None), P(spec[0], None, spec[2])
        key = None if w.key is None else P()  # the dropout key (training), replicated
        return Adapted(_leaf_spec(w.base, spec), a, b, w.scale, key, w.rate)
    if not isinstance(w, QArray):
        return spec
    scale = P(*(None if s == 1 and d != 1 else a for a, s, d in zip(spec, w.scale.shape, w.shape)))
    return QArray(spec, scale, None, w.qtype)


def _full_weights(
    w: ExpertWeights, fsdp_axes, defer: bool = False, by_all_to_all=frozenset()
) -> ExpertWeights:
    """FSDP: gather the hidden (embed) dimension of the local experts' weights (a QArray's
    values as stored, and its scales when they have that dimension). `defer`: a float weight
    becomes a `LocalShard` whose gather its einsum makes (`sharding.gathered.einsum_of_shard`:
    the gradient reduce-scattered from a product laid out for it, docs/tpu.md)."""
    if not fsdp_axes:
        return w

    def gather(a, axis):
        g = lambda x: gather_shards(x, fsdp_axes, axis)
        if defer and isinstance(a, jax.Array):
            return LocalShard(a, tuple(fsdp_axes), axis, by_all_to_all)
        if isinstance(a, Adapted):  # the hidden dim is A's input (axis 1) or B's output (2)
            lo, hi = (g(a.a), a.b) if axis == 1 else (a.a, g(a.b))
            return Adapted(gather(a.base, axis), lo, hi, a.scale, a.key, a.rate)
        if not isinstance(a, QArray):
            return g(a)
        scale = a.scale if a.scale.shape[axis] == 1 else g(a.scale)
        return QArray(g(a.qvalue), scale, None, a.qtype)

    return ExpertWeights(gather(w.gate, 1), gather(w.up, 1), gather(w.down, 2))


def _gather_body(
    x,
    routing,
    w,
    key,
    *,
    planes,
    ep_axes,
    fsdp_axes,
    tp_axes,
    tokens_over_ep,
    tok_axes,
    capacity_factor,
):
    """Dropless: all-gather tokens over the expert axes, run local experts, reduce-scatter."""
    del key, capacity_factor, planes  # its weight gathers are plain all-gathers
    w = _full_weights(w, fsdp_axes)
    local_experts = w.gate.shape[0]
    if tokens_over_ep:
        gather = lambda a: jax.lax.all_gather(a, ep_axes, axis=0, tiled=True)
        x_all, ids, weights = gather(x), gather(routing.expert_ids), gather(routing.weights)
    else:
        x_all, ids, weights = x, routing.expert_ids, routing.weights
    first = jax.lax.axis_index(ep_axes) * local_experts if ep_axes else 0
    local = ids - first  # local expert index, out of [0, E_local) for other devices' experts
    is_local = (local >= 0) & (local < local_experts)
    num_tokens, k = ids.shape
    flat = jnp.where(is_local, local, local_experts).reshape(-1)  # non-local rows sort last
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=local_experts + 1)[:local_experts].astype(jnp.int32)
    y = moe.swiglu_grouped(x_all[order // k], group_sizes, w)  # rows past the groups are 0
    y = y[jnp.argsort(order)].reshape(num_tokens, k, -1)
    y = jnp.einsum("tkd,tk->td", y.astype(jnp.float32), jnp.where(is_local, weights, 0.0))
    # Reduced in the activation dtype: half the bytes of float32 (the serving prefill's largest
    # collective: A52B int8 on v6e-16, a 4096-token step sent 26.9 GiB per chip, 25.4 of it
    # these psums in float32); over the expert axes a token's k=1 output meets zeros only.
    y = y.astype(x.dtype)
    if tp_axes:
        y = jax.lax.psum(y, tp_axes)
    if ep_axes:
        y = (
            jax.lax.psum_scatter(y, ep_axes, scatter_dimension=0, tiled=True)
            if tokens_over_ep
            else jax.lax.psum(y, ep_axes)
        )
    return y, {}


def _all_to_all_body(
    x,
    routing,
    w,
    key,
    *,
    planes,
    ep_axes,
    fsdp_axes,
    tp_axes,
    tokens_over_ep,
    tok_axes,
    capacity_factor,
):
    """Capacity routing on local tokens, all-to-all to the experts' devices and back."""
    w = _full_weights(w, fsdp_axes, defer=True, by_all_to_all=planes)
    local_experts = w.gate.shape[0]
    ep = jax.lax.psum(1, ep_axes) if ep_axes else 1
    num_experts = local_experts * ep
    num_tokens, k = routing.expert_ids.shape
    capacity = moe.expert_capacity(num_tokens, k, num_experts, capacity_factor)
    if tok_axes:  # a different key per token shard, the same across replicas of the shard
        key = jax.random.fold_in(key, jax.lax.axis_index(tok_axes))
    a = moe.assign_slots(routing, capacity, key)
    buffers = moe.dispatch(x, a, num_experts, capacity)  # [E, C, D]
    if ep_axes and tokens_over_ep:
        # [E, C, D] = [ep, E_local, C, D]: send block i to peer i; receive one block per peer.
        buffers = buffers.reshape(ep, local_experts, capacity, -1)
        buffers = jax.lax.all_to_all(buffers, ep_axes, 0, 0, tiled=True)
        buffers = buffers.transpose(1, 0, 2, 3).reshape(local_experts, ep * capacity, -1)
    elif ep_axes:  # tokens replicated over the expert axes: take this device's experts
        first = jax.lax.axis_index(ep_axes) * local_experts
        buffers = jax.lax.dynamic_slice_in_dim(buffers, first, local_experts, axis=0)
    out = moe.swiglu_batched(buffers, w)
    if tp_axes:
        out = jax.lax.psum(out, tp_axes)
    if ep_axes and tokens_over_ep:
        out = out.reshape(local_experts, ep, capacity, -1).transpose(1, 0, 2, 3)
        out = jax.lax.all_to_all(out, ep_axes, 0, 0, tiled=True)
        out = out.reshape(num_experts, capacity, -1)
    elif ep_axes:
        out = jax.lax.all_gather(out, ep_axes, axis=0, tiled=True)
    stats = moe.capacity_stats(a)
    if tok_axes:
        stats = jax.tree.map(lambda s: jax.lax.pmean(s, tok_axes), stats)
    return moe.combine(out, a, x.dtype), stats
