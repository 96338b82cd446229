"""Test set-up: 8 simulated CPU devices (before JAX starts), paths to the shipped data, and the
helpers several test files share (the hy_tiny checkpoint under a policy and a plan, meshes)."""

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
