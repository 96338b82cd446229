"""Memory options of the runtime policy and the optimizer: the chunked cross entropy equals the
whole-sequence one (value and gradient), the Adam moments stored in float32 equal optax's and
in bfloat16 are stored as bfloat16, and the policy refuses contradictory settings."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hunyuan_jax.errors import ConfigError
from hunyuan_jax.model.policy import RuntimePolicy
from hunyuan_jax.train.losses import chunked_cross_entropy, cross_entropy
from hunyuan_jax.train.optim import scale_by_adam


@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
def test_chunked_cross_entropy_equals_whole(chunk):
    """Chunks of 1, 5 (padding: 37 = 7 x 5 + 2), 8 and longer than the sequence; float32
    summation order is the only difference (tolerance a few float32 steps of the sum)."""
    rng = np.random.default_rng(chunk)
    b, s, d, v = 2, 37, 16, 50
    hidden = jnp.asarray(rng.standard_normal((b, s, d)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((d, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, s)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, (b, s)), jnp.float32)

    def whole(h, w):
        return cross_entropy(h @ w, targets, mask)[0]

    def chunked(h, w):
        return chunked_cross_entropy(lambda x: x @ w, h, targets, mask, chunk)[0]

    (a, ga), (c, gc) = (
        jax.value_and_grad(f, argnums=(0, 1))(hidden, head) for f in (whole, chunked)
    )
    np.testing.assert_allclose(float(c), float(a), rtol=2e-6)
    for x, y in zip(ga, gc):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=2e-6, rtol=2e-5)
    tokens = chunked_cross_entropy(lambda x: x @ head, hidden, targets, mask, chunk)[1]
    assert float(tokens) == float(mask.sum())


def test_adam_float32_moments_equal_optax_and_bfloat16_storage():
    params = {"w": jnp.ones((3, 4)), "b": jnp.arange(5.0)}
    ours, ref = scale_by_adam(0.9, 0.95, 1e-8), optax.scale_by_adam(0.9, 0.95, 1e-8)
    s1, s2 = ours.init(params), ref.init(params)
    rng = np.random.default_rng(0)
    for _ in range(4):
        g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
        u1, s1 = ours.update(g, s1)
        u2, s2 = ref.update(g, s2)
        for x, y in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=3e-7)  # f32 steps
    half = scale_by_adam(0.9, 0.95, 1e-8, "bfloat16")
    state = half.init(params)
    assert {x.dtype for x in jax.tree.leaves((state.mu, state.nu))} == {jnp.dtype("bfloat16")}
    u, state = half.update(jax.tree.map(jnp.ones_like, params), state)
    assert {x.dtype for x in jax.tree.leaves(u)} == {jnp.dtype("float32")}
    # First step: m/c1 = g, v/c2 = g^2, so the direction is g / (|g| + eps) = 1 exactly.
    np.testing.assert_allclose(np.asarray(u["w"]), 1.0, rtol=1e-6)


def test_policy_refuses_contradictions():
    with pytest.raises(ConfigError, match="attention_dropout"):
        RuntimePolicy(attention="flash", attention_dropout=0.1)
    with pytest.raises(ConfigError, match="loss_chunk"):
        RuntimePolicy(loss_chunk=-1)
    with pytest.raises(ConfigError, match="attention"):
        RuntimePolicy(attention="cudnn")
    assert RuntimePolicy(attention_dropout=0.1).attention == "auto"


def test_lm_loss_chunked_equals_whole_on_the_tiny_model():
    """`lm_loss` with the head made once outside the chunk loop: value and gradient equal the
    whole-sequence loss's (float32; summation order only)."""
    from conftest import load_tiny
    from flax import nnx

    from hunyuan_jax.train.losses import lm_loss

    model = load_tiny()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 1024, (2, 13)), jnp.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    graphdef, state = nnx.split(model)

    def loss(state, chunk):
        return lm_loss(nnx.merge(graphdef, state), batch, phase="prefill", loss_chunk=chunk)[0]

    step = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (a, ga), (c, gc) = (step(state, k) for k in (0, 5))
    np.testing.assert_allclose(float(c), float(a), rtol=2e-6)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gc)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=2e-6, rtol=2e-5)
