"""The CPU smoke run: the README's main command. Checks the whole stack end to end on the
embedded tiny reference checkpoint (written by the original PyTorch code) and a simulated
8-device mesh, and prints a summary. Exits non-zero on any mismatch."""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
HY_TINY = REPO / "tests" / "data" / "hy_tiny"


def check_reference_logits() -> float:
    import jax
    from hunyuan_jax.state import load_hf_model

    ref = np.load(HY_TINY / "expected.npz")
    worst = 0.0
    for layout in ("hf_st", "hf_bin"):
        t0 = time.time()
        cfg, model = load_hf_model(HY_TINY / layout, compute_dtype="float32", remat="none")
        logits, _, _ = jax.jit(lambda m, x: m(x))(model, ref["input_ids"])
        err = float(np.abs(np.asarray(logits) - ref["logits"]).max())
        worst = max(worst, err)
        print(f"[smoke] reference logits ({layout}): max |diff| = {err:.2e} "
              f"({time.time() - t0:.1f}s)")
    return worst


def main() -> int:
    import jax
    print(f"[smoke] JAX {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} "
          f"devices")
    err = check_reference_logits()
    ok = err < 1e-4
    print(f"[smoke] {'PASS' if ok else 'FAIL'}: logits match the original PyTorch code "
          f"within 1e-4 (max diff {err:.2e})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
