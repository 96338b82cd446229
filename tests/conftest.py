"""Test set-up: 8 simulated CPU devices (before JAX starts) and paths to the shipped data."""

import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

DATA = Path(__file__).parent / "data"
HY_TINY = DATA / "hy_tiny"


@pytest.fixture(scope="session")
def reference():
    import numpy as np

    return dict(np.load(HY_TINY / "expected.npz"))
