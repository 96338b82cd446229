"""The five steps of the CPU smoke run (`cli/smoke.py` runs them after it has set up the 8
simulated devices; this module imports JAX, so it is imported only then): reference logits,
convert + sharded restore + greedy decode, train + resume, decode from the run, export."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import jax
import numpy as np

from hunyuan_jax.checkpoints import convert
from hunyuan_jax.checkpoints.runs import latest_step
from hunyuan_jax.decode import from_checkpoint
from hunyuan_jax.decode.sampling import SamplingConfig
from hunyuan_jax.engine.offline import OfflineGenerator
from hunyuan_jax.train.config import load_configs
from hunyuan_jax.train.loop import train

REPO = Path(__file__).resolve().parents[2]  # configs/tiny.yaml (a checkout's)
HY_TINY = Path(__file__).resolve().parents[1] / "assets" / "hy_tiny"  # shipped in the package
TOLERANCE = 1e-4  # float32 logits vs the original code


def say(msg: str) -> None:
    print(f"[smoke] {msg}", flush=True)


def _logits(model, ids):

    return np.asarray(jax.jit(lambda m, x: m(x)[0])(model, ids))


def step_reference(ref) -> bool:

    ok = True
    for layout in ("hf_bin", "hf_st"):
        model = from_checkpoint.load(HY_TINY / layout, dtype="float32").model
        err = float(np.abs(_logits(model, ref["input_ids"]) - ref["logits"]).max())
        ok &= err < TOLERANCE
        say(f"1. reference logits from {layout}: max |diff| {err:.1e} (tolerance {TOLERANCE})")
    return ok


def step_convert(ref, work: Path, plan) -> bool:

    out = work / "hy_tiny_converted"
    convert.hf_to_jax(HY_TINY / "hf_st", out, progress=False, log=lambda m: None)
    model = from_checkpoint.load(out, dtype="float32", plan=plan).model
    err = float(np.abs(_logits(model, ref["input_ids"]) - ref["logits"]).max())
    gen = OfflineGenerator(model).generate(
        ref["greedy_prompt"].tolist(),
        ref["greedy_out"].shape[1] - ref["greedy_prompt"].shape[1],
    )
    greedy = ref["greedy_prompt"][0].tolist() + gen.tokens[0]
    same = greedy == ref["greedy_out"][0].tolist()
    say(
        f"2. converted to orbax, restored on {plan.describe()}: logits max |diff| "
        f"{err:.1e}; greedy decode {'reproduces' if same else 'DIFFERS FROM'} the original "
        f"{len(greedy)} tokens"
    )
    return err < TOLERANCE and same


def smoke_train(
    run_dir: str | Path, config: str | Path | None = None, overrides=(), log=print
) -> dict:
    """The tiny model on the embedded corpus (configs/tiny.yaml: SentencePiece tokenizer
    trained on it, 8-device expert-parallel mesh): train to half the steps and stop, resume
    from the checkpoint in a second `train` call (as a restarted process would), finish, and
    check that the loss fell. Returns a summary dict."""

    config = config or REPO / "configs" / "tiny.yaml"
    run_dir = Path(run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    mcfg, policy, tcfg = load_configs(config, [*overrides, f"run_dir={run_dir}"])
    half = max(1, tcfg.steps // 2)
    t0 = time.time()
    first = train(mcfg, policy, tcfg.replace(stop_at=half), log=log)
    second = train(mcfg, policy, tcfg, log=log)
    losses = first["losses"] + second["losses"]
    k = min(5, len(losses))
    summary = {
        "steps": tcfg.steps,
        "resumed_at": second["start_step"],
        "first_loss": losses[0],
        "last_loss_mean": float(np.mean(losses[-k:])),
        "wall_s": time.time() - t0,
    }
    summary["ok"] = (
        second["start_step"] == half and summary["last_loss_mean"] < summary["first_loss"] - 0.5
    )
    return summary


def step_train(work: Path, steps: int) -> tuple[bool, Path]:
    run = work / "tiny_run"
    summary = smoke_train(
        run, overrides=[f"steps={steps}"], log=lambda m: print(f"    {m}", flush=True)
    )
    say(
        f"3. trained {summary['steps']} steps on 8 devices, stopped at {summary['resumed_at']} "
        f"and resumed from its checkpoint: loss {summary['first_loss']:.3f} -> "
        f"{summary['last_loss_mean']:.3f} ({summary['wall_s']:.0f}s)"
    )
    return bool(summary["ok"]), run


def step_decode(run: Path, plan) -> bool:

    inf = from_checkpoint.load(run, dtype="float32", plan=plan)
    sampling = SamplingConfig(temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.2)
    prompts = ["def main(", "The quick brown fox", "import os\nimport"]
    ids = [inf.tokenizer.encode(p) for p in prompts]
    gen = OfflineGenerator(inf.model, eos_ids=inf.eos_ids, sampling=sampling)
    gen = gen.generate(ids, 24, seed=0)
    for p, toks in zip(prompts, gen.tokens):
        say(f"4. {p!r} -> {inf.tokenizer.decode(toks)!r}")
    say(
        f"4. decoded {gen.new_tokens} tokens from the training checkpoint: prefill "
        f"{gen.prefill_tokens_per_s:.0f} tok/s, decode {gen.decode_tokens_per_s:.0f} tok/s"
    )
    return all(len(t) > 0 for t in gen.tokens)


def step_export(run: Path, work: Path) -> bool:

    step = latest_step(run)
    hf_out = work / "tiny_run_hf"
    convert.jax_to_hf(run, hf_out, progress=False, log=lambda m: None)  # its latest step
    trained = from_checkpoint.load(run, dtype="float32").model
    reloaded = from_checkpoint.load(hf_out, dtype="float32").model
    ids = np.arange(32, dtype=np.int32).reshape(2, 16) % trained.cfg.vocab_size
    err = float(np.abs(_logits(trained, ids) - _logits(reloaded, ids)).max())
    say(
        f"5. exported step {step} to Hugging Face safetensors ({hf_out.name}); reloaded "
        f"logits max |diff| {err:.1e}"
    )
    return err == 0.0
