"""Training-time routing (moe.assign_slots: expert capacity with the report's random
compensation), property-tested with hypothesis against an independent numpy model of the
per-expert queues, plus the capacity expert path against the dropless one."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hunyuan_jax import moe


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
