"""Gathered matmuls (`sharding.gathered`): a training weight's FSDP gather and its matmul in one
shard_map give the one-device product and gradients, the weight gradient as reduce-scatters
(one per mesh axis, no psum over the axes the weight is sharded over), and serving (where the
weights and activations agree) gathers nothing."""

import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_plan

from hunyuan_jax.model import expert_parallel, moe, qops
from sharding import gathered
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
@pytest.mark.parametrize("planes", [frozenset(), frozenset({"expert"})])
def test_gathered_matmul_equals_one_device_with_reduce_scattered_gradient(
    eq, axes, w_shape, planes, monkeypatch
):
    """`planes`: the mesh axes whose reduce-scatter goes as an all-to-all and a local sum
    (`scatter_by_all_to_all`: on TPU the axes spanning two torus dimensions; none on CPU)."""
    monkeypatch.setattr(gathered, "scatter_by_all_to_all", lambda mesh: planes)
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

    closed = jax.make_jaxpr(jax.grad(lambda w, x: loss(w, x)[0]))(w_in, x_in)
    jaxpr = str(closed)
    assert jaxpr.count("reduce_scatter") == 2 - len(planes)  # fsdp, then expert
    assert _all_to_all_axes(closed.jaxpr) == sorted(planes)
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


@pytest.mark.parametrize("planes", [frozenset(), frozenset({"fsdp"})])
def test_routed_experts_gradient_is_reduce_scattered_from_products_laid_out_for_it(
    planes, monkeypatch
):
    """The routed experts' FSDP gather inside the expert-parallel shard_map (all_to_all, the
    training dispatch) runs through `einsum_of_shard`: the dropless one-device values and
    gradients, each weight gradient one reduce-scatter over fsdp (no psum over fsdp), and each
    weight-gradient product a dot_general with the scattered (hidden) dim ahead of the other
    free dim: [E, D, F] for gate, up and down (autodiff writes gate's and up's as [E, F, D], the
    layout XLA:TPU turned into all-reduces on the A52B, docs/tpu.md)."""
    monkeypatch.setattr(expert_parallel, "scatter_by_all_to_all", lambda mesh: planes)
    plan = make_plan((1, 2, 2, 1), "fsdp_ep")  # experts over expert, their hidden over fsdp
    e, d, f, k = 4, 16, 40, 1
    keys = jax.random.split(jax.random.key(1), 5)
    x = jax.random.normal(keys[0], (4, 6, d), jnp.float32)
    router = jax.random.normal(keys[1], (d, e), jnp.float32)
    w = moe.ExpertWeights(
        jax.random.normal(keys[2], (e, d, f), jnp.float32) / 4,
        jax.random.normal(keys[3], (e, d, f), jnp.float32) / 4,
        jax.random.normal(keys[4], (e, f, d), jnp.float32) / 4,
    )
    routing = moe.route(x, router, k)
    fn = expert_parallel.make_expert_parallel_fn(plan, "all_to_all", capacity_factor=8.0)
    spec = lambda name: plan.sharding(moe_axes(name), getattr(w, name).shape, activation=False)
    w_in = moe.ExpertWeights(*(jax.device_put(getattr(w, n), spec(n)) for n in w._fields))
    x_in = jax.device_put(x, plan.sharding(("batch", "length", "act_embed"), x.shape))

    def loss(x, w, experts_fn):
        y, _ = experts_fn(x, routing, w, jax.random.key(0))
        return jnp.sum(jnp.sin(y)), y

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (value, y), (gx, gw) = jax.jit(grad, static_argnums=2)(x_in, w_in, fn)
    (ref_value, ref_y), (ref_gx, ref_gw) = grad(x, w, moe.dropless_experts)
    # float32 sums in another order: outputs of <= 40 terms; a weight gradient sums its
    # expert's <= 24 tokens, entries up to ~6: 24 x 6 x 1.2e-7 ~ 2e-5 at worst, hence rtol
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(value), float(ref_value), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(ref_gx), atol=1e-5, rtol=0)
    for name, g, ref in zip(w._fields, gw, ref_gw):
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(ref), atol=1e-5, rtol=1e-5, err_msg=name
        )
        assert g.sharding.is_equivalent_to(spec(name), 3), name

    jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: loss(x, w, fn)[0], argnums=1))(x_in, w_in)
    text = str(jaxpr)
    assert text.count("reduce_scatter") == 3 - 3 * len(planes)  # gate, up, down: over fsdp
    assert _all_to_all_axes(jaxpr.jaxpr).count("fsdp") == 3 * len(planes)
    local = e // 2  # experts per device
    psums = [  # (axes, operand shapes) of every psum
        (eqn.params["axes"], [v.aval.shape for v in eqn.invars])
        for eqn in _eqns(jaxpr.jaxpr)
        if eqn.primitive.name == "psum"
    ]
    assert not any("fsdp" in axes and max(map(len, s)) > 1 for axes, s in psums), psums
    products = [
        eqn.outvars[0].aval.shape
        for eqn in _eqns(jaxpr.jaxpr)
        if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.ndim == 3
    ]
    assert products.count((local, d, f)) == 3, products
    assert (local, f, d) not in products, products


def moe_axes(name):
    return ("exp", "exp_mlp", "exp_embed") if name == "down" else ("exp", "exp_embed", "exp_mlp")


def _eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (shard_map, custom_vjp, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _eqns(sub)


def _all_to_all_axes(jaxpr) -> list:
    """The mesh axis of every all_to_all in a jaxpr (the expert dispatch's over 'expert')."""
    axes = []
    for eqn in _eqns(jaxpr):
        if eqn.primitive.name == "all_to_all":
            name = eqn.params["axis_name"]
            axes += list(name) if isinstance(name, tuple) else [name]
    return sorted(axes)
