"""The CPU smoke run, the README's main command: the whole stack end to end on a simulated
8-device mesh, on data that ships with the repository and Python. Exits non-zero on any failure.

1. reference: the tiny checkpoint written by the original PyTorch code (`hunyuan_jax/assets/hy_tiny`,
   `.bin` and safetensors) gives the original logits;
2. convert: HF -> our orbax layout, restored sharded over the mesh (expert parallel), logits
   again, and greedy decoding with the KV cache reproduces the original greedy output;
3. train: the tiny model on the embedded corpus (SentencePiece tokenizer trained on it),
   checkpoint, stop, resume from the checkpoint, finish; the loss must fall;
4. decode: prompts completed (sampled, seeded) from the trained run's checkpoint (same
   parameter tree, no conversion), batched and on the mesh;
5. export: the trained checkpoint -> Hugging Face safetensors, reloaded, same logits.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hunyuan_jax.cli_help import HelpFormatter
from hunyuan_jax.host_env import reexec_with_hugepage_malloc

# JAX (with the steps, `smoke_steps`) is imported inside `main`: it sets up the 8 simulated
# devices first (XLA reads XLA_FLAGS when JAX starts), after the start-up re-exec.


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    ap.add_argument("--workdir", default=None, help="keep outputs here (default: a temp dir)")
    ap.add_argument("--steps", type=int, default=60, help="training steps")
    args = ap.parse_args(argv)
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax

    from hunyuan_jax.cli import smoke_steps as S
    from sharding.plan import ShardingPlan

    t0 = time.time()
    S.say(f"JAX {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices")
    plan = ShardingPlan.create("data=2,fsdp=1,expert=4,tensor=1", "fsdp_ep")
    ref = dict(np.load(S.HY_TINY / "expected.npz"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = {
            "reference": S.step_reference(ref),
            "convert": S.step_convert(ref, work, plan),
        }
        ok_train, run = S.step_train(work, args.steps)
        results["train"] = ok_train
        results["decode"] = S.step_decode(run, plan)
        results["export"] = S.step_export(run, work)
    failed = [k for k, v in results.items() if not v]
    S.say(
        f"{'PASS' if not failed else 'FAIL: ' + ', '.join(failed)} "
        f"({len(results) - len(failed)}/{len(results)} steps, {time.time() - t0:.0f}s)"
    )
    return 0 if not failed else 1


def entry() -> int:
    """`python -m hunyuan_jax.cli.smoke`: the start-up re-exec (before any work: glibc reads its
    tunables at start-up), then `main()`."""
    reexec_with_hugepage_malloc()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
