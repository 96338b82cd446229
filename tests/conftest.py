"""Test set-up: 8 simulated CPU devices (before JAX starts), paths to the shipped data, and the
helpers several test files share (the hy_tiny checkpoint under a policy and a plan, meshes)."""

import functools
import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

DATA = Path(__file__).parent / "data"
# The reference checkpoint ships inside the package (the smoke run reads it too).
HY_TINY = Path(__file__).resolve().parents[1] / "hunyuan_jax" / "assets" / "hy_tiny"
MESH_AXES = ("data", "fsdp", "expert", "tensor")


@pytest.fixture(scope="session")
def reference():
    import numpy as np

    return dict(np.load(HY_TINY / "expected.npz"))


def f32_policy(**changes):
    """Float32 parameters and compute (exact comparisons), no remat unless asked."""
    from hunyuan_jax.model.policy import RuntimePolicy

    return RuntimePolicy.inference("float32").replace(**changes)


def make_plan(shape=None, rules="fsdp", overrides=None):
    """A ShardingPlan over the simulated devices: `shape` = (data, fsdp, expert, tensor) sizes
    (None: one device, no mesh)."""
    from sharding.plan import ShardingPlan

    mesh = None if shape is None else dict(zip(MESH_AXES, shape))
    return ShardingPlan.create(mesh, rules, overrides)


def decode_tiny(plan=None):
    """hy_tiny loaded for decoding (`from_checkpoint.load`) in float32, placed by `plan`."""
    from hunyuan_jax.decode import from_checkpoint

    return from_checkpoint.load(HY_TINY / "hf_st", dtype="float32", plan=plan).model


def load_tiny(plan=None, policy=None, fmt="hf_st"):
    """hy_tiny (the PyTorch reference checkpoint) in float32 unless `policy` says otherwise,
    laid out by `plan` (default one device)."""
    from hunyuan_jax.checkpoints import loading

    ckpt = loading.open_checkpoint(HY_TINY / fmt)
    return loading.load_params(ckpt, policy or f32_policy(), plan)


def flat_params(model) -> dict:
    """{path: numpy value} of every nnx.Param of `model`."""
    import numpy as np
    from flax import nnx

    return {
        tuple(p): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def same_bits(a, b) -> bool:
    """Equal dtype, shape and bytes."""
    import numpy as np

    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@functools.cache
def _prefill_fn():
    import jax
    from flax import nnx

    return jax.jit(lambda g, s, t: nnx.merge(g, s)(t, phase="prefill")[0], static_argnums=0)


def prefill_logits(model, tokens):
    """numpy logits of a full prefill forward of `model`; one compile per tree structure
    (graphdef) and token shape, shared by the tests."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    graphdef, state = nnx.split(model)
    return np.asarray(_prefill_fn()(graphdef, state, jnp.asarray(tokens)))
