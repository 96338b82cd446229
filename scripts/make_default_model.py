"""Make the server's embedded default model: `hunyuan_jax/assets/default_model/`.

    python scripts/make_default_model.py [--steps 300] [--out hunyuan_jax/assets/default_model]

A smaller sibling of the smoke run's model (configs/tiny.yaml with 4 layers and 4 experts, so
the folder stays under ~3 MB), trained by `hunyuan_jax.train.loop.train` on the embedded corpus
(Python's own stdlib sources) with a SentencePiece tokenizer trained on the same corpus, on a
simulated 8-device expert-parallel CPU mesh; then exported with the converter's CLI
(`python -m hunyuan_jax.cli.convert jax-to-hf --dtype bfloat16`) into Hugging Face layout:
config.json, model-*.safetensors (+ index), tokenizer.model and a generation_config.json
(greedy by default; its EOS ids are the tokenizer's). It completes Python-looking text; it is
a demo and test model, not a useful assistant. A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parent.parent

OUT = REPO / "hunyuan_jax" / "assets" / "default_model"
# configs/tiny.yaml, made smaller (the asset ships inside the package) and given a longer
# context than it is trained on (RoPE extrapolates a little; the server's default --max-len).
MODEL_OVERRIDES = [
    "model.num_layers=4",
    "model.num_experts=4",
    "model.max_position_embeddings=512",
]
MAX_BYTES = 3_000_000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--workdir", default=None, help="keep the training run here")
    args = ap.parse_args(argv)

    from hunyuan_jax.checkpoints.runs import checkpoint_dir, latest_step
    from hunyuan_jax.train.config import load_configs
    from hunyuan_jax.train.loop import train

    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.workdir or tmp) / "default_model_run"
        if run.exists():
            shutil.rmtree(run)
        overrides = [*MODEL_OVERRIDES, f"steps={args.steps}", f"run_dir={run}"]
        overrides += [f"save_every={args.steps}", "log_every=25"]
        mcfg, policy, tcfg = load_configs(REPO / "configs" / "tiny.yaml", overrides)
        t0 = time.time()
        summary = train(mcfg, policy, tcfg, log=lambda m: print(f"  {m}", flush=True))
        losses = summary["losses"]
        print(
            f"trained {args.steps} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f} "
            f"({time.time() - t0:.0f}s)"
        )
        step = latest_step(run)
        export = Path(tmp) / "hf"
        cmd = [
            sys.executable, "-m", "hunyuan_jax.cli.convert", "jax-to-hf",
            "--ckpt", str(checkpoint_dir(run) / str(step) / "params"),
            "--out", str(export), "--dtype", "bfloat16",
            "--config", str(run / "config.yaml"), "--no-progress",
        ]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=REPO)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for p in export.iterdir():
            if p.suffix in (".json", ".safetensors"):
                shutil.copy(p, out / p.name)
        shutil.copy(run / "tokenizer" / "tokenizer.model", out / "tokenizer.model")

    from hunyuan_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(out / "tokenizer.model")
    gen = {
        "do_sample": False,
        "eos_token_id": tok.eos_ids,
        "pad_token_id": tok.pad_id,
        "bos_token_id": tok.bos_id,
        "_comment": "hunyuan-jax default model: scripts/make_default_model.py",
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (out / "README.md").write_text(
        "# hunyuan-jax default model\n\n"
        f"Made by `scripts/make_default_model.py` ({args.steps} steps of configs/tiny.yaml with "
        f"{', '.join(MODEL_OVERRIDES)}) on the embedded corpus (Python stdlib sources); final "
        f"training loss {losses[-1]:.3f}. SentencePiece tokenizer trained on the same corpus. "
        "A demo and test model for `python -m hunyuan_jax.cli.serve` with no --checkpoint.\n"
    )
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.2f} MB): {sorted(p.name for p in out.iterdir())}")
    if size > MAX_BYTES:
        print(f"error: {size} bytes is over the {MAX_BYTES} budget", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
