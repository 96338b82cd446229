"""merge-lora: fold a LoRA run's adapters into its base and write the merged model as a run
directory, which every other tool reads as a full checkpoint::

    python -m hunyuan_jax.cli.convert merge-lora --run RUN --out MERGED [--base B] [--step N]
        [--dtype float32|bfloat16] [--mesh fsdp=8 --rules fsdp] [--overwrite]
        [--allow-base-mismatch]
    python -m hunyuan_jax.cli.convert jax-to-hf --ckpt MERGED --out HF      # export, as usual

The base is the one the run records (`<run>/lora_base.json`) unless `--base` names another
copy; it must be the base the adapters were trained on (the digest lora_base.json records,
`lora_base.check_base`; `--allow-base-mismatch` applies them to another base of the same shapes
anyway); it is loaded by `hunyuan_jax.checkpoints.loading` (any format, quantized too) with parameters in
`--dtype`, the adapters of step N (default: the latest; integrity-checked) are attached, and
each adapted weight becomes W + alpha/rank * A @ B computed in float32 (`lora.merge_adapters`,
one weight at a time), then stored in `--dtype`. Output (the train.py run layout,
`hunyuan_jax.checkpoints.runs`): MERGED/config.yaml (the architecture, an inference policy),
MERGED/tokenizer/ (the run's), MERGED/checkpoints/<N>/params with its integrity record. One
code path: export is jax-to-hf of that directory, decoding / `--init-from` read it like any
run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from hunyuan_jax.checkpoints import loading, lora_base, runs
from hunyuan_jax.errors import CheckpointError, UsageError
from hunyuan_jax.model import lora
from hunyuan_jax.model.policy import RuntimePolicy
from sharding.plan import ShardingPlan

DTYPES = ("float32", "bfloat16")


def merge_lora(
    run: str | Path,
    out: str | Path,
    *,
    base: str | Path | None = None,
    step: int | None = None,
    dtype: str = "float32",
    plan=None,
    overwrite: bool = False,
    allow_base_mismatch: bool = False,
    log=print,
) -> Path:
    """Writes the merged model of LoRA run `run` into `out` (a run directory); returns it."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    run, out = Path(run), Path(out)
    if lora_base.run_lora_config(run) is None:
        raise CheckpointError(f"{run} is not a LoRA run (its config.yaml has no train.lora)")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{out} exists and is not empty (pass --overwrite to replace)")
        shutil.rmtree(out)
    base = Path(base) if base is not None else Path(lora_base.recorded_base(run))
    plan = ShardingPlan.or_single(plan)
    ckpt = loading.open_checkpoint(base)
    policy = RuntimePolicy.inference(dtype)
    model, step = lora_base.load_adapted(
        ckpt, policy, run, plan, step=step, allow_base_mismatch=allow_base_mismatch, log=log
    )
    n = len(list(lora.adapted(model)))
    lora.merge_adapters(model, dtype=np.dtype(dtype))
    params = nnx.state(model, nnx.Param)
    ckpt_out = runs.Checkpointer(out, keep=1, async_save=False)
    try:
        ckpt_out.save(step, params, {"merged": np.zeros((), np.int32)}, {}, None)
    finally:
        ckpt_out.close()
    runs.write_run_config(out, ckpt.cfg, policy)
    if jax.process_index() == 0:
        for src in (run / "tokenizer", ckpt.path / "tokenizer"):
            if src.is_dir():
                shutil.copytree(src, out / "tokenizer")
                break
        gen = ckpt.path / "generation_config.json"
        if gen.is_file():
            shutil.copy2(gen, out / "generation_config.json")
    log(f"[merge-lora] {n} adapted weights of {run} (step {step}) folded into {base} -> {out}")
    return out
