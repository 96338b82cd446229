"""Accuracy of quantized weights against float32: the table of docs/quantization.md.

    python -m bench.quantized_accuracy --checkpoint hunyuan_jax/assets/hy_tiny/hf_st --random-prompts
    python -m bench.quantized_accuracy --checkpoint runs/tiny      # a trained tiny model
    python -m bench.quantized_accuracy --checkpoint C --weights int4 int4-experts --int4-group-size 32

Reference: the checkpoint in float32 (weights and compute) with a float32 KV cache. Each row
holds the matmul weights in one form (`RuntimePolicy.weights`: bf16, int8, fp8, int4 in groups of
`--int4-group-size` along the contraction, int4-experts; compute stays float32, so only the
stored weights differ) with a float32 or int8 KV cache; `--weights` keeps the rows of the forms
it names:

* teacher-forced logits: every prompt is prefilled through the cache, then the reference's
  greedy continuation is fed one token per decode step; the logits of those `--new` steps are
  compared with the reference's (max and mean |difference|; top-1 agreement);
* greedy: each row decodes `--new` tokens greedily with `Generator` (its own continuation);
  "tokens equal" is the fraction of positions whose token equals the reference's, "first
  divergence" the mean index of the first differing token (`--new` when none differs).

Prompts: `--random-prompts` draws random token ids (the reference checkpoint has random
weights; text means nothing to it), else lines of the embedded training corpus tokenized with
the checkpoint's tokenizer. Prints a markdown table and writes JSON with `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Before jax is imported: jax reads JAX_PLATFORMS when it is imported (a CPU benchmark;
# set JAX_PLATFORMS to run it elsewhere).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hunyuan_jax.data.corpus import embedded_corpus
from hunyuan_jax.decode import from_checkpoint
from hunyuan_jax.model.policy import INT4_GROUP_SIZE
from tests.helpers.contiguous import Generator

FORMS = ("float32", "bf16", "int8", "fp8", "int4", "int4-experts")
ROWS = tuple((w, c) for w in FORMS for c in ("float32", "int8"))


def teacher_forced(model, prompts: np.ndarray, continuation: np.ndarray, cache_dtype: str):
    """Logits [B, N, V] of the N continuation tokens, fed one decode step at a time after a
    prefill of the prompts [B, P] through a cache of `cache_dtype`."""
    graphdef, state = nnx.split(model)
    b, p = prompts.shape
    n = continuation.shape[1]

    @jax.jit
    def prefill(state, tokens):
        m = nnx.merge(graphdef, state)
        cache = m.init_cache(b, p + n, cache_dtype)
        logits, _, cache = m(tokens, cache=cache, phase="prefill")
        return logits[:, -1], cache

    @jax.jit
    def step(state, token, cache):
        logits, _, cache = nnx.merge(graphdef, state)(token[:, None], cache=cache, phase="decode")
        return logits[:, 0], cache

    first, cache = prefill(state, jnp.asarray(prompts))
    out = [first]
    for t in range(n - 1):
        logits, cache = step(state, jnp.asarray(continuation[:, t]), cache)
        out.append(logits)
    return np.stack([np.asarray(x) for x in out], axis=1)


def greedy(model, prompts: np.ndarray, new: int, cache_dtype: str) -> np.ndarray:
    gen = Generator(model, cache_dtype=cache_dtype, eos_ids=[])
    out = gen.generate([list(p) for p in prompts], new)
    return np.asarray([row + [-1] * (new - len(row)) for row in out.tokens])


def first_divergence(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    diff = a != b
    return np.where(diff.any(axis=1), diff.argmax(axis=1), a.shape[1])


def corpus_prompts(tokenizer, n: int, length: int, seed: int) -> np.ndarray:
    ids = tokenizer.encode("\n".join(embedded_corpus(400_000)))
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - length, n)
    return np.asarray([ids[s : s + length] for s in starts], np.int32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--random-prompts", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", nargs="+", choices=FORMS, default=list(FORMS))
    ap.add_argument("--int4-group-size", type=int, default=INT4_GROUP_SIZE)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    ref_bundle = from_checkpoint.load(args.checkpoint, dtype="float32", weights="auto")
    cfg = ref_bundle.cfg
    if args.random_prompts or ref_bundle.tokenizer is None:
        rng = np.random.default_rng(args.seed)
        limit = cfg.vocab_size if ref_bundle.tokenizer is None else ref_bundle.tokenizer.vocab_size
        prompts = rng.integers(3, limit, (args.prompts, args.prompt_len)).astype(np.int32)
    else:
        prompts = corpus_prompts(ref_bundle.tokenizer, args.prompts, args.prompt_len, args.seed)

    ref_tokens = greedy(ref_bundle.model, prompts, args.new, "float32")
    ref_logits = teacher_forced(ref_bundle.model, prompts, ref_tokens, "float32")
    scale = float(np.std(ref_logits))
    results = []
    for weights, cache in ROWS:
        if weights not in args.weights:
            continue
        t0 = time.time()
        model = (
            ref_bundle.model
            if weights == "float32"
            else from_checkpoint.load(
                args.checkpoint,
                dtype="float32",
                weights=weights,
                int4_group_size=args.int4_group_size,
            ).model
        )
        logits = teacher_forced(model, prompts, ref_tokens, cache)
        err = np.abs(logits - ref_logits)
        tokens = greedy(model, prompts, args.new, cache)
        row = {
            "weights": weights,
            "cache": cache,
            "logits_max_abs_err": float(err.max()),
            "logits_mean_abs_err": float(err.mean()),
            "top1_agree": float(np.mean(logits.argmax(-1) == ref_logits.argmax(-1))),
            "greedy_tokens_equal": float(np.mean(tokens == ref_tokens)),
            "greedy_first_divergence": float(first_divergence(tokens, ref_tokens).mean()),
            "seconds": round(time.time() - t0, 1),
        }
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    print(
        f"\n{args.checkpoint}: {args.prompts} prompts x {args.prompt_len} tokens "
        f"({'random ids' if args.random_prompts else 'corpus text'}), {args.new} new tokens, "
        f"int4 groups of {args.int4_group_size}; "
        f"reference logits std {scale:.3f}, max |logit| {float(np.abs(ref_logits).max()):.2f}\n"
    )
    print(
        "| weights | KV cache | logits max abs err | mean abs err | top-1 agree "
        "(teacher-forced) | greedy tokens equal | mean first divergence |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['weights']} | {r['cache']} | {r['logits_max_abs_err']:.4f} | "
            f"{r['logits_mean_abs_err']:.4f} | {100 * r['top1_agree']:.1f} % | "
            f"{100 * r['greedy_tokens_equal']:.1f} % | {r['greedy_first_divergence']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "checkpoint": args.checkpoint,
                    "prompts": args.prompts,
                    "prompt_len": args.prompt_len,
                    "new": args.new,
                    "int4_group_size": args.int4_group_size,
                    "random_prompts": bool(args.random_prompts),
                    "ref_logits_std": scale,
                    "rows": results,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
