"""Sharding never changes the numbers: forward logits, loss and gradients on the 8-device CPU
meshes equal the single-device results (float32), for the tiny reference model with every
feature on, with the MoE dispatch the model chooses itself (`dispatch.experts_fn_for`: both
expert-parallel training strategies where the plan shards the experts); the expert-parallel
shard_map alone equals the dropless experts for every token layout; parameters land where the
presets say; and sharded initialisation never materialises the full tree on one device."""

import warnings

import jax
import numpy as np
import pytest
from conftest import HY_TINY, f32_policy, load_tiny, make_plan
from flax import nnx

from hunyuan_jax.model import moe
from hunyuan_jax.model.config import ModelConfig
from hunyuan_jax.model.expert_parallel import make_expert_parallel_fn
from hunyuan_jax.model.kernels.attention import kernel_layout
from hunyuan_jax.model.policy import RuntimePolicy
from hunyuan_jax.model.state import abstract_model, init_model
from hunyuan_jax.model.transformer import HunyuanForCausalLM
from hunyuan_jax.train.losses import lm_loss

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

MESHES = [  # (data, fsdp, expert, tensor), rules preset, rule overrides (--rule)
    ((8, 1, 1, 1), "fsdp", None),
    ((1, 8, 1, 1), "fsdp", None),
    ((2, 1, 4, 1), "fsdp_ep", None),
    ((1, 2, 2, 2), "fsdp_ep_tp", None),
    # Sequence split over the tensor axis: the tokens reach the experts split over an axis the
    # expert weights are tensor-parallel over (a wrong psum there once gave logits off by 3.7).
    ((1, 2, 2, 2), "fsdp_ep_tp", {"length": "tensor"}),
]
# Float32 on CPU: sharded reductions (psum, reduce-scatter, split contractions) add in another
# order than one device; measured differences are ~1e-6 for logits and ~1e-7 for gradients.
LOGITS_ATOL = 5e-5
GRAD_ATOL = 5e-6
LOSS_ATOL = 1e-5
# Training policy of these tests: float32, remat as in training, and a capacity large enough
# that no (token, choice) pair is ever re-routed: capacity routing (one device, all_to_all) is
# then exactly the dropless computation.
TRAIN = f32_policy(remat="full", capacity_factor=8.0)
CONFIGS = HY_TINY.parents[2] / "configs"


@pytest.fixture(scope="module")
def batch(reference):
    ids = np.asarray(reference["input_ids"], np.int32)  # [2, 24]
    rng = np.random.default_rng(0)
    inputs = np.concatenate([ids, rng.integers(0, 1024, size=(6, 24), dtype=np.int32)])
    targets = np.roll(inputs, -1, axis=1)
    segment_ids = np.ones_like(inputs)
    segment_ids[4:, 12:] = 2  # packed rows: two documents
    positions = np.where(segment_ids == 2, np.arange(24) - 12, np.arange(24)).astype(np.int32)
    return {
        "inputs": inputs,
        "targets": targets,
        "segment_ids": segment_ids,
        "positions": positions,
        "loss_mask": np.ones_like(inputs, np.float32),
    }


def _loss_and_grads(model, batch, experts_fn=None):
    """(logits, loss, grads); loss and grads in the 'train' phase, logits in 'prefill' (the
    dispatch of each is the model's own unless `experts_fn` overrides it)."""
    plan = model.plan
    batch = {
        k: jax.device_put(v, plan.sharding(("batch", "length"), v.shape)) for k, v in batch.items()
    }
    graphdef, state = nnx.split(model)

    def loss_fn(state):
        loss, metrics = lm_loss(
            nnx.merge(graphdef, state),
            batch,
            phase="train",
            experts_fn=experts_fn,
            aux_loss_coef=0.01,
        )
        return loss, metrics

    @jax.jit
    def run(state):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state)
        logits, _, _ = nnx.merge(graphdef, state)(
            batch["inputs"],
            batch["positions"],
            batch["segment_ids"],
            phase="prefill",
            experts_fn=experts_fn,
        )
        return logits, loss, grads

    return run(state)


@pytest.fixture(scope="module")
def single_device(batch):
    """The reference: one device, the plain dropless experts (sort + ragged_dot)."""
    model = load_tiny(policy=TRAIN)
    return jax.tree.map(np.asarray, _loss_and_grads(model, batch, moe.dropless_experts))


@pytest.mark.parametrize("shape,preset,overrides", MESHES)
@pytest.mark.parametrize("train_dispatch", ["gather", "all_to_all"])
def test_sharded_equals_single_device(
    shape, preset, overrides, train_dispatch, batch, single_device
):
    plan = make_plan(shape, preset, overrides)
    if train_dispatch == "all_to_all" and not plan.shards("exp"):
        pytest.skip("no expert axis: the experts are not distributed")
    # The model picks its MoE dispatch: expert parallel (train: `train_dispatch`; prefill:
    # gather) where the plan shards 'exp', else capacity routing / row tiles under GSPMD.
    model = load_tiny(plan, TRAIN.replace(train_dispatch=train_dispatch))
    logits, loss, grads = _loss_and_grads(model, batch)
    ref_logits, ref_loss, ref_grads = single_device
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=LOGITS_ATOL, rtol=0)
    np.testing.assert_allclose(float(loss), float(ref_loss), atol=LOSS_ATOL, rtol=0)
    flat, ref_flat = nnx.to_flat_state(grads), dict(nnx.to_flat_state(ref_grads))
    assert len(flat) == len(ref_flat)
    for path, g in flat:
        np.testing.assert_allclose(
            np.asarray(g.get_value()),
            ref_flat[path].get_value(),
            atol=GRAD_ATOL,
            rtol=0,
            err_msg=".".join(map(str, path)),
        )


def test_capacity_routing_all_to_all_matches_single_device_when_routing_agrees(batch):
    """With re-routing active (capacity 1.0), a mesh whose tokens are not split over devices
    sees the same per-device token set as one device, so the outputs agree exactly."""
    model = load_tiny()
    x = jax.random.normal(jax.random.key(1), (2, 24, model.cfg.hidden_size))
    w = jax.tree.map(lambda a: a[0], nnx.state(model.groups.layers[0].moe))  # group 0
    router = w["router"].get_value()
    routing = moe.route(x, router, 1)
    weights = moe.ExpertWeights(*(w[n].get_value() for n in ("gate_proj", "up_proj", "down_proj")))
    key = jax.random.key(7)
    single, stats = moe.make_capacity_experts(1.0)(x, routing, weights, key)
    assert float(stats["rerouted_fraction"]) > 0  # the test exercises re-routing
    plan = make_plan((1, 1, 8, 1), "fsdp_ep", overrides={"batch": None})  # tokens replicated
    assert plan.activation_spec(("batch", "length"), x.shape[:2]) == jax.sharding.PartitionSpec(
        None, None
    )
    fn = make_expert_parallel_fn(plan, "all_to_all", capacity_factor=1.0)
    sharded, sharded_stats = jax.jit(fn)(x, routing, weights, key)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5)
    # keys differ per device layout, so re-routing may pick other slots; the fraction agrees
    np.testing.assert_allclose(
        float(sharded_stats["rerouted_fraction"]), float(stats["rerouted_fraction"])
    )


def test_parameters_are_placed_as_the_preset_says():
    _, abstract_state = nnx.split(abstract_model(ModelConfig.from_hf(HY_TINY / "hf_st")))
    plan = make_plan((1, 2, 2, 2), "fsdp_ep_tp")
    specs = dict(nnx.to_flat_state(plan.state_shardings(abstract_state)))
    spec = lambda *path: specs[path].get_value().spec
    P = jax.sharding.PartitionSpec
    assert spec("groups", "layers", 0, "moe", "gate_proj") == P(None, "expert", "fsdp", "tensor")
    assert spec("groups", "layers", 1, "moe", "down_proj") == P(None, "expert", "tensor", "fsdp")
    assert spec("groups", "layers", 0, "attn", "q_proj") == P(
        None, ("fsdp", "expert"), "tensor", None
    )
    assert spec("groups", "layers", 0, "attn", "k_proj") == P(
        None, ("fsdp", "expert"), "tensor", None
    )
    assert spec("embed") == P("tensor", ("fsdp", "expert"))
    assert spec("groups", "layers", 0, "input_norm", "weight") == P(None, None)
    fsdp_specs = dict(
        nnx.to_flat_state(make_plan((1, 8, 1, 1), "fsdp").state_shardings(abstract_state))
    )
    assert fsdp_specs[("embed",)].get_value().spec == P(None, "fsdp")
    assert fsdp_specs[("groups", "layers", 0, "moe", "up_proj")].get_value().spec == P(
        None, None, "fsdp", None
    )


def test_sharded_init_never_holds_the_full_tree_on_one_device():
    """The jitted initialiser's per-device output + temporaries stay far below the full tree:
    if any device materialised every parameter, temp/output would be >= the tree size."""
    cfg = ModelConfig.from_yaml(CONFIGS / "small.yaml")
    policy = RuntimePolicy(param_dtype="float32")
    plan = make_plan((1, 8, 1, 1), "fsdp")
    graphdef, abstract_state = nnx.split(abstract_model(cfg, policy, plan))
    full_bytes = sum(
        v.get_value().size * v.get_value().dtype.itemsize
        for _, v in nnx.to_flat_state(abstract_state)
    )
    shardings = plan.state_shardings(abstract_state)

    def create(key):
        return nnx.state(HunyuanForCausalLM(cfg, policy, plan, rngs=nnx.Rngs(key)))

    compiled = jax.jit(create, out_shardings=shardings).lower(jax.random.key(0)).compile()
    mem = compiled.memory_analysis()
    per_device = mem.output_size_in_bytes + mem.temp_size_in_bytes
    assert mem.output_size_in_bytes < full_bytes / 6, (mem.output_size_in_bytes, full_bytes)
    assert per_device < full_bytes / 3, (per_device, full_bytes)
    # And the real thing: every array is split 8 ways where the rules shard it.
    model = init_model(cfg, policy, plan, seed=0)
    embed = model.embed[...]
    assert embed.addressable_shards[0].data.shape == (cfg.vocab_size, cfg.hidden_size // 8)
    experts = model.groups.layers[0].moe.gate_proj[...]
    assert experts.addressable_shards[0].data.shape[2] == cfg.hidden_size // 8


def test_expert_count_must_divide_expert_axis():
    cfg = ModelConfig.from_hf(HY_TINY / "hf_st").replace(num_experts=6)
    with pytest.raises(ValueError, match="exp"):
        init_model(cfg, plan=make_plan((2, 1, 4, 1), "fsdp_ep"))


# ----------------------------------------------------------------------------- the shard_map
@pytest.fixture(scope="module")
def moe_layer():
    """Layer 0's experts of hy_tiny and its router (float32)."""
    model = load_tiny()
    w = jax.tree.map(lambda a: a[0], nnx.state(model.groups.layers[0].moe))  # group 0
    names = ("gate_proj", "up_proj", "down_proj")
    return w["router"].get_value(), moe.ExpertWeights(*(w[n].get_value() for n in names))


@pytest.mark.parametrize(
    "shape,preset,overrides",
    [
        ((1, 8, 1, 1), "fsdp", None),  # no expert axis: FSDP weights gathered in the shard_map
        ((2, 1, 4, 1), "fsdp_ep", None),
        ((1, 2, 2, 2), "fsdp_ep_tp", None),
        ((1, 1, 8, 1), "fsdp_ep", None),
        # tokens split over the TP axis of the expert weights (sequence over 'tensor')
        ((1, 2, 2, 2), "fsdp_ep_tp", {"length": "tensor"}),
        # experts over two axes; a batch of 2 divides only 'fsdp' of them
        ((1, 2, 4, 1), "fsdp_ep", {"exp": ("fsdp", "expert")}),
    ],
)
@pytest.mark.parametrize("strategy", ["gather", "all_to_all"])
@pytest.mark.parametrize("lead", [(8, 6), (2, 24), (1, 48)])
def test_expert_parallel_equals_dropless_for_every_token_layout(
    shape, preset, overrides, strategy, lead, moe_layer
):
    """Tokens [B, S, D] enter the shard_map laid out as the plan lays out (batch, length):
    a batch that divides every batch axis is split over all of them (tokens over the expert
    axes: all-gather / all-to-all), a smaller one over a prefix of them or none (tokens
    replicated over the expert axes); layouts the bodies cannot take as they are (tokens split
    over a tensor-parallel axis, or over only some expert-parallel axes) are resharded on the
    way in. Every layout computes the dropless result."""
    router, w = moe_layer
    plan = make_plan(shape, preset, overrides)
    if strategy == "all_to_all" and not plan.shards("exp"):
        pytest.skip("no expert axis: the experts are not distributed")
    x = jax.random.normal(jax.random.key(3), (*lead, w.gate.shape[1]))
    routing = moe.route(x, router, 1)
    want, _ = moe.dropless_experts(x, routing, w)
    x = jax.device_put(x, plan.sharding(("batch", "length", "act_embed"), x.shape))
    fn = make_expert_parallel_fn(plan, strategy, capacity_factor=8.0)  # nothing re-routed
    got, stats = jax.jit(fn)(x, routing, w, jax.random.key(0))
    assert got.shape == x.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    if strategy == "all_to_all":
        assert float(stats["rerouted_fraction"]) == float(stats["dropped_fraction"]) == 0.0


def test_context_parallel_equals_single_device(batch, single_device):
    """fsdp_ep_cp: the sequence over 'tensor' (2), experts over 'expert', weights over fsdp;
    flash attention with each device's query chunk over all keys (K/V gathered) and the
    chunked loss: the loss and gradients of the one-device step."""
    plan = make_plan((1, 2, 2, 2), "fsdp_ep_cp")
    spec = kernel_layout("flash", plan, (8, 24, 12, 8), (8, 24, 4, 8))
    assert spec["q_spec"][1] == "tensor" and spec["kv_spec"][1] is None
    model = load_tiny(plan, TRAIN.replace(attention="flash", loss_chunk=8))
    logits, loss, grads = _loss_and_grads(model, batch)
    ref_logits, ref_loss, ref_grads = single_device
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=LOGITS_ATOL, rtol=0)
    np.testing.assert_allclose(float(loss), float(ref_loss), atol=LOSS_ATOL, rtol=0)
    ref_flat = dict(nnx.to_flat_state(ref_grads))
    for path, g in nnx.to_flat_state(grads):
        np.testing.assert_allclose(
            np.asarray(g.get_value()), ref_flat[path].get_value(), atol=GRAD_ATOL, rtol=0
        )


@pytest.fixture(scope="module")
def long_batch():
    """Four rows of 256 tokens (the tiny model's longest), two of them packed with a second
    document: 128-token query chunks over two context shards, splash's smallest block."""
    rng = np.random.default_rng(1)
    inputs = rng.integers(0, 1024, size=(4, 256), dtype=np.int32)
    segment_ids = np.ones_like(inputs)
    segment_ids[2:, 100:] = 2  # a document boundary inside the first query chunk
    positions = np.where(segment_ids == 2, np.arange(256) - 100, np.arange(256)).astype(np.int32)
    return {
        "inputs": inputs,
        "targets": np.roll(inputs, -1, axis=1),
        "segment_ids": segment_ids,
        "positions": positions,
        "loss_mask": np.ones_like(inputs, np.float32),
    }


def test_context_parallel_splash_equals_single_device(long_batch):
    """fsdp_ep_cp with the splash kernel (Pallas interpreter on CPU): the kernel is built for the
    global causal mask with its metadata split along q (`splash.context_parallel_splash`), each
    device runs its 128-token query chunk over the gathered K/V; experts over 'expert', the
    chunked loss (4 chunks). Loss, logits and gradients equal the one-device step with the
    materialised-scores attention. Tolerances as above: both are float32; splash adds one
    online-softmax rescale per key block (2 here), each one rounding (2^-24 relative), far under
    the reduction-order differences of the sharded sums that set LOGITS_ATOL / GRAD_ATOL."""
    plan = make_plan((1, 2, 2, 2), "fsdp_ep_cp")
    spec = kernel_layout("splash", plan, (4, 256, 12, 8), (4, 256, 4, 8))
    assert spec["q_spec"][1] == "tensor" and spec["kv_spec"][1] is None and spec["interpret"]
    ref_model = load_tiny(policy=TRAIN.replace(attention="xla", loss_chunk=64))
    ref_logits, ref_loss, ref_grads = _loss_and_grads(ref_model, long_batch, moe.dropless_experts)
    model = load_tiny(plan, TRAIN.replace(attention="splash", loss_chunk=64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to flash
        logits, loss, grads = _loss_and_grads(model, long_batch)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=LOGITS_ATOL, rtol=0)
    np.testing.assert_allclose(float(loss), float(ref_loss), atol=LOSS_ATOL, rtol=0)
    ref_flat = dict(nnx.to_flat_state(ref_grads))
    for path, g in nnx.to_flat_state(grads):
        np.testing.assert_allclose(
            np.asarray(g.get_value()),
            np.asarray(ref_flat[path].get_value()),
            atol=GRAD_ATOL,
            rtol=0,
            err_msg=".".join(map(str, path)),
        )
