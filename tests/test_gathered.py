"""Gathered matmuls (`sharding.gathered`): a training weight's FSDP gather and its matmul in one
shard_map give the one-device product and gradients, the weight gradient as reduce-scatters
(one per mesh axis, no psum over the axes the weight is sharded over), and serving (where the
weights and activations agree) gathers nothing."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_plan

from hunyuan_jax.model import qops
from sharding.gathered import Gathered, defer

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

# (einsum of the model, the weight's logical axes, weight shape): q_proj, o_proj, shared MLP.
CASES = [
    ("bsd,dnh->bsnh", ("embed", "heads", "head_dim"), (16, 4, 8)),
    ("bsnh,nhd->bsd", ("heads", "head_dim", "embed"), (4, 8, 16)),
    (None, ("embed", "mlp"), (16, 24)),  # qops.matmul: x @ w
]


def _x_shape(eq, w_shape):
    if eq is None:
        return (8, 4, w_shape[0])
    lhs, rhs = eq.split("->")[0].split(",")
    sizes = dict(zip(rhs, w_shape), b=8, s=4)
    return tuple(sizes[c] for c in lhs)


@pytest.mark.parametrize("eq,axes,w_shape", CASES)
def test_gathered_matmul_equals_one_device_with_reduce_scattered_gradient(eq, axes, w_shape):
    plan = make_plan((2, 2, 2, 1), "fsdp_ep")  # embed over fsdp x expert, batch over all three
    kw, kx = jax.random.split(jax.random.key(0))
    w = jax.random.normal(kw, w_shape, jnp.float32)
    x = jax.random.normal(kx, _x_shape(eq, w_shape), jnp.float32)
    mm = (lambda x, w: x @ w) if eq is None else (lambda x, w: jnp.einsum(eq, x, w))

    def loss(w, x, deferred=True):
        if deferred:
            w = defer(plan, w, axes, {"embed": "act_embed"}, cast=lambda a: a * 1.0)
            assert isinstance(w, Gathered)
        y = qops.matmul(x, w) if eq is None else qops.einsum(eq, x, w)
        return jnp.sum(jnp.sin(y)), y

    w_in = jax.device_put(w, plan.sharding(axes, w.shape, activation=False))
    x_in = jax.device_put(x, plan.sharding(("batch",) + (None,) * (x.ndim - 1), x.shape))
    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (value, y), (gw, gx) = jax.jit(grad)(w_in, x_in)
    (ref_value, ref_y), (ref_gw, ref_gx) = grad(w, x, deferred=False)
    # float32 sums of at most 16 terms in another order: a few ulps of values of size ~4
    np.testing.assert_allclose(np.asarray(y), np.asarray(mm(x, w)), atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(value), float(ref_value), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(ref_gw), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(ref_gx), atol=1e-5, rtol=0)
    assert gw.sharding.is_equivalent_to(w_in.sharding, w.ndim)

    jaxpr = str(jax.make_jaxpr(jax.grad(lambda w, x: loss(w, x)[0]))(w_in, x_in))
    assert jaxpr.count("reduce_scatter") == 2  # fsdp, then expert
    psums = re.findall(r"psum\[axes=\(([^)]*)\)", jaxpr)  # the batch axes the weight is not on
    assert psums and not any("fsdp" in p or "expert" in p for p in psums), psums


def test_nothing_is_deferred_where_weights_stay_put():
    """Serving (`serve_ep_tp`): activations are sharded like the weights' embed dim, so the
    weight is the array itself (cast), and one device never defers."""
    w = jnp.ones((16, 24), jnp.float32)
    for plan in (make_plan((1, 2, 2, 2), "serve_ep_tp"), make_plan(None)):
        out = defer(
            plan, w, ("embed", "mlp"), {"embed": "act_embed"}, lambda a: a.astype(jnp.bfloat16)
        )
        assert isinstance(out, jax.Array) and out.dtype == jnp.bfloat16
