"""One layer group's weights as its matmuls read them inside the layer scan's body: the FSDP
gathers of training made explicit (a matmul weight's left to its matmul, `sharding.gathered`, so
that its gradient is reduce-scattered; the rest by `ShardingPlan.gather`) and matmul weights cast
to the compute dtype on the local shard first (`qops.cast`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hunyuan_jax.model import qops
from hunyuan_jax.model.layers import matmul_of
from sharding import gathered
from sharding.plan import ShardingPlan


def weights_for_use(plan: ShardingPlan, group_state, dtype):
    """One layer group's dense weights as its matmuls read them, made inside the scan body:
    the hidden dim gathered to the activations' layout (the FSDP all-gather of training,
    explicit: a matmul weight's inside its matmul, `sharding.gathered`, so that its gradient
    is reduce-scattered; others' by `plan.gather`), matmul weights cast to `dtype` on the
    local shard first (`qops.cast`: the gather moves bf16, and no stacked bf16 copy is made
    outside the loop). The routed experts gather inside their own shard_map
    (`expert_parallel`); quantized weights and the rest are left as stored."""
    dtype = jnp.dtype(dtype)

    def one(leaf):
        value = leaf.get_value()
        axes = leaf.get_metadata("logical_axes", None)
        if not isinstance(value, jax.Array) or axes is None or "embed" not in axes:
            return leaf
        axes = tuple(axes)[len(axes) - value.ndim :]  # the scan took the leading `layers`
        # float weights only: an fp8 QArray's values (float8, one byte) stay as stored
        wide = jnp.issubdtype(value.dtype, jnp.floating) and value.dtype.itemsize >= 2
        cast = matmul_of(axes) is not None and wide
        fn = (lambda a: qops.cast(a, dtype)) if cast else None
        # a matmul weight is gathered inside its matmul (`gathered.defer`: the gradient is
        # reduce-scattered), the rest (the router) here
        use = gathered.defer if matmul_of(axes) is not None else ShardingPlan.gather
        return leaf.replace(use(plan, value, axes, {"embed": "act_embed"}, cast=fn))

    return jax.tree.map(one, group_state, is_leaf=lambda v: isinstance(v, nnx.Variable))
