"""Training-time routing (moe.assign_slots: expert capacity with the report's random
compensation), property-tested with hypothesis against an independent numpy model of the
per-expert queues, plus the capacity expert path against the dropless one; every expert
strategy on [B, S, D] tokens; and the one dispatch choice (`dispatch.experts_fn_for`): which
strategy runs per phase on one device and on meshes, and that the model asks for its phase."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import f32_policy, make_plan
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from hunyuan_jax.model import dispatch, expert_parallel, moe
from hunyuan_jax.model.config import ModelConfig
from hunyuan_jax.model.policy import RuntimePolicy
from hunyuan_jax.model.state import abstract_model
from sharding.plan import ShardingPlan

needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def _routing(seed, tokens, experts, k, skew):
    """Router output for random logits; `skew` > 0 piles tokens onto a few experts."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(tokens, experts)) + skew * np.linspace(2.0, 0.0, experts)
    x = jnp.eye(experts, dtype=jnp.float32)  # route(x = logits @ I) == softmax(logits), top-k
    return moe.route(jnp.asarray(logits, jnp.float32), x, k)


def _queues(expert_ids, capacity):
    """Independent model: pairs queue per expert in (choice, token) order; the first
    `capacity` of each queue stay, the rest overflow. Returns overflow [T, k] bool."""
    tokens, k = expert_ids.shape
    overflow = np.zeros((tokens, k), bool)
    seen = {}
    for j in range(k):
        for t in range(tokens):
            e = int(expert_ids[t, j])
            seen[e] = seen.get(e, 0) + 1
            overflow[t, j] = seen[e] > capacity
    return overflow


# Shapes come from small menus so that the jitted function is reused across examples (each new
# shape is a compile); the router logits, their skew and the PRNG key vary freely.
_assign = jax.jit(moe.assign_slots, static_argnums=1)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**31 - 1),
    tokens=st.sampled_from([1, 7, 32]),
    experts=st.sampled_from([1, 3, 8]),
    k=st.integers(1, 2),
    capacity=st.sampled_from([1, 3, 8]),
    skew=st.floats(0.0, 6.0),
    keyed=st.booleans(),
)
def test_assign_slots_properties(seed, tokens, experts, k, capacity, skew, keyed):
    k = min(k, experts)
    r = _routing(seed, tokens, experts, k, skew)
    a = _assign(r, capacity, jax.random.key(seed)) if keyed else _assign(r, capacity, None)
    ids0, w0, probs = map(np.asarray, (r.expert_ids, r.weights, r.probs))
    ids, slots, w = map(np.asarray, (a.expert_ids, a.slots, a.weights))
    rerouted, dropped = np.asarray(a.rerouted), np.asarray(a.dropped)
    kept = ~dropped

    # Loads never exceed capacity; every kept pair owns a distinct slot of its expert.
    assert np.all((slots[kept] >= 0) & (slots[kept] < capacity))
    assert np.all(slots[dropped] == capacity)
    occupied = list(zip(ids[kept].tolist(), slots[kept].tolist()))
    assert len(occupied) == len(set(occupied))
    loads = np.bincount(ids[kept], minlength=experts)
    assert loads.max(initial=0) <= capacity

    # Nothing is dropped while total capacity suffices; otherwise exactly the excess.
    assert dropped.sum() == max(0, tokens * k - experts * capacity)
    assert not np.any(rerouted & dropped)

    # Pairs within their expert's capacity keep expert and weight; the others are re-routed.
    overflow = _queues(ids0, capacity)
    np.testing.assert_array_equal(ids[~overflow], ids0[~overflow])
    np.testing.assert_array_equal(w[~overflow], w0[~overflow])
    np.testing.assert_array_equal(rerouted | dropped, overflow)

    # A re-routed pair is weighted by its probability for the new expert (renormalised by the
    # original choices' total for k > 1, like the original weights); dropped pairs weigh 0.
    new_p = np.take_along_axis(probs, ids, axis=1)
    if k > 1:
        new_p = new_p / np.take_along_axis(probs, ids0, axis=1).sum(1, keepdims=True)
    np.testing.assert_allclose(w[rerouted], new_p[rerouted], rtol=1e-6)
    assert np.all(w[dropped] == 0)


def test_random_compensation_spreads_over_free_slots():
    """With a key, overflow goes to random experts with room; different keys differ."""
    r = _routing(0, 64, 8, 1, skew=6.0)  # most tokens want expert 0
    a1 = moe.assign_slots(r, 8, jax.random.key(1))
    a2 = moe.assign_slots(r, 8, jax.random.key(2))
    assert int(a1.rerouted.sum()) > 20 and not bool(a1.dropped.any())
    assert not np.array_equal(np.asarray(a1.expert_ids), np.asarray(a2.expert_ids))
    assert np.all(np.bincount(np.asarray(a1.expert_ids).ravel(), minlength=8) == 8)


def test_capacity_experts_equal_dropless_when_nothing_overflows():
    rng = np.random.default_rng(0)
    tokens, d, f, e = 24, 16, 32, 4
    x = jnp.asarray(rng.normal(size=(tokens, d)), jnp.float32)
    w = moe.ExpertWeights(
        *(
            jnp.asarray(rng.normal(size=s) * 0.2, jnp.float32)
            for s in ((e, d, f), (e, d, f), (e, f, d))
        )
    )
    r = moe.route(x, jnp.asarray(rng.normal(size=(d, e)), jnp.float32), 1)
    dropless, _ = moe.dropless_experts(x, r, w)
    capped, stats = moe.make_capacity_experts(float(e))(x, r, w, jax.random.key(0))
    np.testing.assert_allclose(capped, dropless, atol=1e-5)
    assert float(stats["rerouted_fraction"]) == 0.0 and float(stats["dropped_fraction"]) == 0.0


# ----------------------------------------------------------------------------- any leading shape
def _experts(rng, d=16, f=24, e=4):
    return moe.ExpertWeights(
        *(
            jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32)
            for s in ((e, d, f), (e, d, f), (e, f, d))
        )
    )


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize(
    "name", ["dropless_experts", "few_token_experts", "tiled_experts", "capacity"]
)
def test_strategies_take_batch_and_length(name, k):
    """The model hands every ExpertsFn x [B, S, D] and routing [B, S, ...]: the result is the
    token-level strategy on the flattened tokens, reshaped back (and all of them agree)."""
    rng = np.random.default_rng(k)
    b, s, d, e = 2, 3, 16, 4
    w = _experts(rng, d=d, e=e)
    x = jnp.asarray(rng.normal(size=(b, s, d)), jnp.float32)
    routing = moe.route(x, jnp.asarray(rng.normal(size=(d, e)), jnp.float32), k)
    assert routing.expert_ids.shape == (b, s, k) and routing.probs.shape == (b, s, e)
    fn = moe.make_capacity_experts(float(e)) if name == "capacity" else getattr(moe, name)
    key = jax.random.key(0)
    got, _ = fn(x, routing, w, key)
    assert got.shape == (b, s, d) and got.dtype == x.dtype
    flat = moe.Routing(*(a.reshape((b * s,) + a.shape[2:]) for a in routing))
    want, _ = fn(x.reshape(b * s, d), flat, w, key)
    np.testing.assert_allclose(np.asarray(got).reshape(b * s, d), np.asarray(want), atol=1e-6)
    reference, _ = moe.dropless_experts(x.reshape(b * s, d), flat, w)
    np.testing.assert_allclose(np.asarray(want), np.asarray(reference), atol=1e-5)


# ----------------------------------------------------------------------------- dispatch table
CFG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    num_experts=8,
    moe_top_k=1,
)


@pytest.fixture
def recorded(monkeypatch):
    """Replaces the two strategy factories with recorders: [(factory, args...)]."""
    calls = []

    def capacity(capacity_factor):
        calls.append(("capacity", capacity_factor))
        return "capacity"

    def expert_parallel_fn(plan, strategy="gather", capacity_factor=1.0):
        calls.append(("expert_parallel", plan, strategy, capacity_factor))
        return "expert_parallel"

    monkeypatch.setattr(moe, "make_capacity_experts", capacity)
    monkeypatch.setattr(expert_parallel, "make_expert_parallel_fn", expert_parallel_fn)
    return calls


def _one_device_table(plan, recorded, policy):
    fn = lambda phase, tokens, cfg=CFG: dispatch.experts_fn_for(phase, cfg, policy, plan, tokens)
    # train: capacity routing with random compensation whatever the token count
    for tokens in (1, 8, 4096):
        recorded.clear()
        assert fn("train", tokens) == "capacity"
        assert recorded == [("capacity", policy.capacity_factor)]
    recorded.clear()
    for phase in ("prefill", "decode"):  # inference: dropless, never the capacity path
        # tokens x k <= experts: per-token experts (reads only the chosen experts' weights)
        assert fn(phase, 1) is moe.few_token_experts
        assert fn(phase, 8) is moe.few_token_experts
        assert fn(phase, 4, CFG.replace(moe_top_k=2)) is moe.few_token_experts
        assert fn(phase, 5, CFG.replace(moe_top_k=2)) is moe.tiled_experts
        assert fn(phase, 9) is moe.tiled_experts  # row tiles on CPU
        assert fn(phase, 4096) is moe.tiled_experts
    assert recorded == []


def test_dispatch_one_device(recorded):
    policy = RuntimePolicy(capacity_factor=1.5)
    plan = ShardingPlan.single()
    assert plan.platform == "cpu"
    _one_device_table(plan, recorded, policy)
    # Off CPU the grouped matmul (ragged_dot) serves inference beyond a handful of tokens.
    tpu = types.SimpleNamespace(shards=lambda logical: False, platform="tpu")
    for phase in ("prefill", "decode"):
        assert dispatch.experts_fn_for(phase, CFG, policy, tpu, 9) is moe.dropless_experts
        assert dispatch.experts_fn_for(phase, CFG, policy, tpu, 8) is moe.few_token_experts
    with pytest.raises(ValueError, match="phase"):
        dispatch.experts_fn_for("eval", CFG, policy, plan, 8)


@needs8
@pytest.mark.parametrize("shape,preset", [((1, 8, 1, 1), "fsdp"), ((8, 1, 1, 1), "fsdp_ep")])
def test_dispatch_mesh_without_expert_sharding_is_the_one_device_table(shape, preset, recorded):
    """A mesh whose rules (or sizes) leave 'exp' unsharded runs the experts as one device
    does (GSPMD shards the tokens); 'fsdp_ep' on expert=1 does not shard 'exp'."""
    plan = make_plan(shape, preset)
    assert not plan.shards("exp")
    _one_device_table(plan, recorded, RuntimePolicy(capacity_factor=2.0))


@needs8
@pytest.mark.parametrize("train_dispatch", ["all_to_all", "gather"])
@pytest.mark.parametrize("shape,preset", [((2, 1, 4, 1), "fsdp_ep"), ((1, 2, 2, 2), "fsdp_ep_tp")])
def test_dispatch_mesh_sharding_experts(shape, preset, train_dispatch, recorded):
    """Experts sharded over 'expert': expert parallel in every phase; training uses the
    policy's train_dispatch and capacity, inference the dropless gather."""
    plan = make_plan(shape, preset)
    assert plan.shards("exp")
    policy = RuntimePolicy(capacity_factor=1.25, train_dispatch=train_dispatch)
    for phase, tokens, want in [
        ("train", 4096, train_dispatch),
        ("train", 1, train_dispatch),
        ("prefill", 4096, "gather"),
        ("prefill", 1, "gather"),
        ("decode", 1, "gather"),
        ("decode", 64, "gather"),
    ]:
        recorded.clear()
        assert dispatch.experts_fn_for(phase, CFG, policy, plan, tokens) == "expert_parallel"
        assert recorded == [("expert_parallel", plan, want, 1.25)], (phase, tokens)


def test_model_asks_dispatch_for_its_phase(monkeypatch):
    """phase defaults to 'train' with a key and 'prefill' without; num_tokens is B * S; an
    explicit experts_fn bypasses the choice."""
    model = abstract_model(CFG, f32_policy())  # shapes only: the forward is only traced
    asked = []
    real = dispatch.experts_fn_for

    def spy(phase, cfg, policy, plan, num_tokens):
        asked.append((phase, num_tokens))
        return real(phase, cfg, policy, plan, num_tokens)

    monkeypatch.setattr(dispatch, "experts_fn_for", spy)
    tokens = jnp.zeros((2, 5), jnp.int32)
    shape_of = lambda **kw: nnx.eval_shape(lambda m: m(tokens, **kw)[0], model).shape
    assert shape_of() == (2, 5, CFG.vocab_size)
    shape_of(key=jax.random.key(0))
    shape_of(phase="decode")
    shape_of(phase="train")
    shape_of(phase="prefill", key=jax.random.key(0))
    assert asked == [("prefill", 10), ("train", 10), ("decode", 10), ("train", 10), ("prefill", 10)]
    asked.clear()
    shape_of(experts_fn=moe.dropless_experts)
    assert asked == []
