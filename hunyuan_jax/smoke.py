"""The CPU smoke run, the README's main command: the whole stack end to end on a simulated
8-device mesh, on data that ships with the repository and Python. Exits non-zero on any failure.

1. reference: the tiny checkpoint written by the original PyTorch code (`tests/data/hy_tiny`,
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

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
HY_TINY = REPO / "tests" / "data" / "hy_tiny"
TOLERANCE = 1e-4  # float32 logits vs the original code


def _say(msg: str) -> None:
    print(f"[smoke] {msg}", flush=True)


def _logits(model, ids, experts_fn=None):
    import jax

    return np.asarray(jax.jit(lambda m, x: m(x, experts_fn=experts_fn)[0])(model, ids))


def step_reference(ref) -> bool:
    from hunyuan_jax.state import load_hf_model

    ok = True
    for layout in ("hf_bin", "hf_st"):
        _, model = load_hf_model(HY_TINY / layout, compute_dtype="float32", remat="none")
        err = float(np.abs(_logits(model, ref["input_ids"]) - ref["logits"]).max())
        ok &= err < TOLERANCE
        _say(f"1. reference logits from {layout}: max |diff| {err:.1e} (tolerance {TOLERANCE})")
    return ok


def step_convert(ref, work: Path, mesh, rules) -> bool:
    import jax

    from hunyuan_jax import checkpoint_format, convert
    from hunyuan_jax.decode import Generator
    from hunyuan_jax.expert_parallel import make_expert_parallel_fn

    out = work / "hy_tiny_converted"
    convert.hf_to_jax(HY_TINY / "hf_st", out, progress=False, log=lambda m: None)
    cfg, model = checkpoint_format.restore_model(
        out, mesh=mesh, rules=rules, compute_dtype="float32", remat="none"
    )
    experts_fn = make_expert_parallel_fn(mesh, rules, "gather")
    with jax.set_mesh(mesh):
        err = float(np.abs(_logits(model, ref["input_ids"], experts_fn) - ref["logits"]).max())
        gen = Generator(model, mesh=mesh, rules=rules).generate(
            ref["greedy_prompt"].tolist(),
            ref["greedy_out"].shape[1] - ref["greedy_prompt"].shape[1],
        )
    greedy = ref["greedy_prompt"][0].tolist() + gen.tokens[0]
    same = greedy == ref["greedy_out"][0].tolist()
    _say(
        f"2. converted to orbax, restored on mesh {dict(mesh.shape)}: logits max |diff| "
        f"{err:.1e}; greedy decode {'reproduces' if same else 'DIFFERS FROM'} the original "
        f"{len(greedy)} tokens"
    )
    return err < TOLERANCE and same


def step_train(work: Path, steps: int) -> tuple[bool, Path]:
    from hunyuan_jax.train_step import smoke_train

    run = work / "tiny_run"
    summary = smoke_train(
        run, overrides=[f"steps={steps}"], log=lambda m: print(f"    {m}", flush=True)
    )
    _say(
        f"3. trained {summary['steps']} steps, resumed at {summary['resumed_at']}: loss "
        f"{summary['first_loss']:.3f} -> {summary['last_loss_mean']:.3f}"
    )
    return bool(summary["ok"]), run


def step_decode(run: Path, mesh, rules) -> bool:
    import jax

    from hunyuan_jax.decode import Generator, load_for_inference
    from hunyuan_jax.sampling import SamplingConfig

    inf = load_for_inference(run, dtype="float32", mesh=mesh, rules=rules)
    sampling = SamplingConfig(temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.2)
    prompts = ["def main(", "The quick brown fox", "import os\nimport"]
    ids = [inf.tokenizer.encode(p) for p in prompts]
    with jax.set_mesh(mesh):
        gen = Generator(
            inf.model, mesh=mesh, rules=rules, eos_ids=inf.eos_ids, sampling=sampling
        ).generate(ids, 24, seed=0)
    for p, toks in zip(prompts, gen.tokens):
        _say(f"4. {p!r} -> {inf.tokenizer.decode(toks)!r}")
    _say(
        f"4. decoded {gen.new_tokens} tokens from the training checkpoint: prefill "
        f"{gen.prefill_tokens_per_s:.0f} tok/s, decode {gen.decode_tokens_per_s:.0f} tok/s"
    )
    return all(len(t) > 0 for t in gen.tokens)


def step_export(run: Path, work: Path) -> bool:
    from hunyuan_jax import convert
    from hunyuan_jax.checkpointing import checkpoint_dir, latest_step, restore_params
    from hunyuan_jax.state import load_hf_model

    step = latest_step(run)
    hf_out = work / "tiny_run_hf"
    convert.jax_to_hf(
        checkpoint_dir(run) / str(step) / "params",
        hf_out,
        config=run / "config.yaml",
        progress=False,
        log=lambda m: None,
    )
    _, trained = restore_params(run, compute_dtype="float32", remat="none")
    _, reloaded = load_hf_model(hf_out, compute_dtype="float32", remat="none")
    ids = np.arange(32, dtype=np.int32).reshape(2, 16) % trained.cfg.vocab_size
    err = float(np.abs(_logits(trained, ids) - _logits(reloaded, ids)).max())
    _say(
        f"5. exported step {step} to Hugging Face safetensors ({hf_out.name}); reloaded "
        f"logits max |diff| {err:.1e}"
    )
    return err == 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None, help="keep outputs here (default: a temp dir)")
    ap.add_argument("--steps", type=int, default=60, help="training steps")
    args = ap.parse_args(argv)

    import jax

    from sharding.mesh import build_mesh
    from sharding.rules import get_rules

    t0 = time.time()
    _say(f"JAX {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices")
    mesh, rules = build_mesh("data=2,fsdp=1,expert=4,tensor=1"), get_rules("fsdp_ep")
    ref = dict(np.load(HY_TINY / "expected.npz"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = {
            "reference": step_reference(ref),
            "convert": step_convert(ref, work, mesh, rules),
        }
        ok_train, run = step_train(work, args.steps)
        results["train"] = ok_train
        results["decode"] = step_decode(run, mesh, rules)
        results["export"] = step_export(run, work)
    failed = [k for k, v in results.items() if not v]
    _say(
        f"{'PASS' if not failed else 'FAIL: ' + ', '.join(failed)} "
        f"({len(results) - len(failed)}/{len(results)} steps, {time.time() - t0:.0f}s)"
    )
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
