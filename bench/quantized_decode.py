"""CPU decode throughput with float32, bfloat16, int8 and int4 matmul weights, same run.

    python -m bench.quantized_decode                       # configs/small.yaml, batch 1 and 8
    python -m bench.quantized_decode --batches 1 --rounds 9 --weights float32 int8 int4

One random model of the config (float32) is held in each form of `--weights`
(`RuntimePolicy.weights`): float32 (as built), bf16, int8 (per output channel), int4 (one scale
per `--int4-group-size` values along the contraction), int4-experts (`hunyuan_jax.model.quantize`);
compute is float32 on every side, so the sides differ only in how the weights are stored and read
(a bf16 weight is cast to float32 at each matmul, an int8 / int4 one dequantized next to it).
Weight bytes count int4 values at 4 bits (numpy holds them a byte each; XLA:TPU packs them;
XLA:CPU keeps a byte per value in memory): all parameters, and the matmul weights alone. Each side
runs `Generator.generate` (compiled beforehand) on the same prompts; the sides alternate
(a, b, c, then c, b, a, ...) for `--rounds` rounds, so a load change on the shared machine hits
them all, and each reports the median decode tokens/s and its min-max spread. A 2048x2048
float32 jnp.dot is timed in the same rounds: the machine's matmul peak. Greedy tokens are
compared with the float32 side (equal fraction over the batch). A spread over 20 % means the
machine was busy: compare with care.
"""

from __future__ import annotations

import argparse
import os
import statistics
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

from hunyuan_jax.checkpoints.loading import read_model_config
from hunyuan_jax.model import quantize
from hunyuan_jax.model.policy import INT4_GROUP_SIZE, RuntimePolicy
from hunyuan_jax.model.state import init_model
from tests.helpers.contiguous import Generator

ROOT = Path(__file__).resolve().parent.parent
BUSY_SPREAD = 0.20


def _bytes(a) -> float:
    bits = 4 if a.dtype == quantize.QTYPES["int4"] else 8 * a.dtype.itemsize
    return a.size * bits / 8


def weight_bytes(model) -> tuple[float, float]:
    """(bytes of every parameter, bytes of the matmul weights: values + scales)."""
    total = sum(_bytes(v.get_value()) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    matmul = 0.0
    for _, module, name in quantize.matmul_weights(model):
        stored = getattr(module, name)[...]
        stored = getattr(stored, "array", stored)
        parts = (stored.qvalue, stored.scale) if isinstance(stored, quantize.QArray) else (stored,)
        matmul += sum(_bytes(p) for p in parts)
    return total, matmul


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "small.yaml"))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--weights", nargs="+", default=["float32", "bf16", "int8", "int4"])
    ap.add_argument("--int4-group-size", type=int, default=INT4_GROUP_SIZE)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    cfg = read_model_config(args.config)
    policy = RuntimePolicy.inference("float32")
    models = {}
    for w in args.weights:
        model = init_model(cfg, policy, seed=args.seed)  # the same float32 weights each time
        if w != "float32":
            quantize.convert_model(model, w, plan=None, group=args.int4_group_size)
        models[w] = model
    rng = np.random.default_rng(args.seed)
    m = jnp.asarray(rng.standard_normal((2048, 2048), np.float32))
    dot = jax.jit(jnp.dot)
    dot(m, m).block_until_ready()
    print(
        f"{args.config}: decode {args.new_tokens} new tokens after {args.prompt_len}-token "
        f"prompts, compute float32, {args.rounds} alternating rounds on "
        f"{jax.devices()[0].device_kind} ({os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f})"
    )
    base = weight_bytes(models[args.weights[0]])
    for w, model in models.items():
        total, matmul = weight_bytes(model)
        print(
            f"  {w:<12} weights {total / 2**20:8.1f} MiB ({total / base[0]:5.1%} of "
            f"{args.weights[0]}), matmul weights {matmul / 2**20:8.1f} MiB "
            f"({matmul / base[1]:5.1%})"
            + (f", int4 groups of {args.int4_group_size}" if "int4" in w else "")
        )

    busy = False
    for batch in args.batches:
        prompts = rng.integers(3, cfg.vocab_size, (batch, args.prompt_len)).tolist()
        gens = {w: Generator(model, eos_ids=[]) for w, model in models.items()}
        tokens = {w: g.generate(prompts, args.new_tokens).tokens for w, g in gens.items()}
        rates: dict[str, list[float]] = {w: [] for w in gens}
        peaks: list[float] = []
        order = list(gens)
        for r in range(args.rounds):
            for w in order if r % 2 == 0 else order[::-1]:
                rates[w].append(gens[w].generate(prompts, args.new_tokens).decode_tokens_per_s)
            t0 = time.perf_counter()
            dot(m, m).block_until_ready()
            peaks.append(2 * 2048**3 / (time.perf_counter() - t0))
        ref = np.asarray(tokens[order[0]])
        print(f"batch {batch}:")
        for w in order:
            med, lo, hi = statistics.median(rates[w]), min(rates[w]), max(rates[w])
            spread = (hi - lo) / med
            busy |= spread > BUSY_SPREAD
            equal = float(np.mean(np.asarray(tokens[w]) == ref))
            print(
                f"  {w:<12} decode median {med:8.1f} tokens/s  spread {lo:.1f}-{hi:.1f} "
                f"({spread:5.1%})  x{med / statistics.median(rates[order[0]]):.2f} vs "
                f"{order[0]}  greedy tokens equal to {order[0]}: {equal:.0%}"
            )
        peak = statistics.median(peaks)
        print(
            f"  matmul   2048x2048 float32 jnp.dot median {peak / 1e9:.1f} GFLOP/s "
            f"(spread {min(peaks) / 1e9:.1f}-{max(peaks) / 1e9:.1f})"
        )
    if busy:
        print(
            f"WARNING: spread over {BUSY_SPREAD:.0%}: the machine was busy during the run; "
            "the medians are rough (rerun, or use more --rounds)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
