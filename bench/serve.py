"""Continuous batching (the server's engine) against static batching (the Generator, batches
formed as requests arrive), same weights, same run, Poisson arrivals at several rates.

    python -m bench.serve [--checkpoint DIR] [--rates 4,16,64] [--requests 160] [--slots 8]

Workload: prompts of 8..64 random token ids; max_tokens heavy-tailed like chat traffic (80%
draw 8..24 tokens, 20% draw 96..160), EOS ignored so every request produces exactly its
max_tokens; greedy. Both sides are driven in-process (no HTTP), so only scheduling differs:
- continuous: `scheduler.Engine` with `--slots` slots; a request is admitted as soon as a slot
  is free and leaves as soon as it is done.
- static: whenever the Generator is idle, every request that has arrived (up to --slots) forms
  one batch, padded to --slots rows (one compiled shape), decoded until its longest request
  is done; requests arriving meanwhile wait for the next batch.
Throughput = useful new tokens / (last finish - first arrival); TTFT = first token - arrival.
Every compile happens before timing. The machine's float32 matmul rate (2048^3, 5 runs) is
printed before and after; a spread over 1.5x means other work shared the CPU (the numbers
are then noisy: compare the two sides of one run, not runs with each other).
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402


def matmul_gflops(n: int = 2048, runs: int = 5) -> list[float]:
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        out.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return out


def workload(n: int, vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(16, vocab, size=int(k)).tolist() for k in rng.integers(8, 65, n)]
    long = rng.random(n) < 0.2
    max_tokens = np.where(long, rng.integers(96, 161, n), rng.integers(8, 25, n))
    return prompts, [int(m) for m in max_tokens]


def arrivals(n: int, rate: float, seed: int) -> np.ndarray:
    return np.cumsum(np.random.default_rng(seed + 1).exponential(1.0 / rate, n))


def run_continuous(engine, prompts, max_tokens, arrive):
    from hunyuan_jax.serve.scheduler import GenParams, Request

    n = len(prompts)
    first, finish, count = [None] * n, [None] * n, [0] * n
    done = queue.Queue()

    def sink(i):
        def f(ev):
            if ev.kind == "token":
                count[i] += 1
                if first[i] is None:
                    first[i] = time.perf_counter()
            elif ev.kind == "done":
                finish[i] = time.perf_counter()
                done.put(i)

        return f

    t0 = time.perf_counter()
    for i in range(n):
        delay = t0 + arrive[i] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        params = GenParams(max_tokens=max_tokens[i], ignore_eos=True)
        engine.submit(Request(prompts[i], params, sink(i)))
    for _ in range(n):
        done.get(timeout=600)
    return _summary(t0, arrive, first, finish, count, max_tokens)


def run_static(gen, slots, cache_len, prompts, max_tokens, arrive):
    n = len(prompts)
    first, finish = [None] * n, [None] * n
    t0 = time.perf_counter()
    nxt = 0
    while nxt < n:
        now = time.perf_counter() - t0
        if arrive[nxt] > now:
            time.sleep(arrive[nxt] - now)
            continue
        batch = []
        while nxt < n and arrive[nxt] <= time.perf_counter() - t0 and len(batch) < slots:
            batch.append(nxt)
            nxt += 1
        rows = [prompts[i] for i in batch] + [[1]] * (slots - len(batch))
        longest = max(max_tokens[i] for i in batch)

        def stream(step, tokens, live, batch=batch):
            if step == 0:
                t = time.perf_counter()
                for i in batch:
                    first[i] = t

        gen.generate(rows, longest, max_len=cache_len, stream=stream, stream_every=10**6)
        t = time.perf_counter()
        for i in batch:
            finish[i] = t
    return _summary(t0, arrive, first, finish, max_tokens, max_tokens)


def _summary(t0, arrive, first, finish, count, max_tokens):
    ttft = np.array([f - t0 - a for f, a in zip(first, arrive)])
    span = max(finish) - t0 - arrive[0]
    useful = sum(min(c, m) for c, m in zip(count, max_tokens))
    return {
        "tok_s": useful / span,
        "ttft_p50": float(np.percentile(ttft, 50)),
        "ttft_p99": float(np.percentile(ttft, 99)),
        "span": span,
    }


def warm_static(gen, slots, cache_len, chunk, vocab):
    """Compiles every program shape the static side can meet (prompt widths up to 64)."""
    for width in range(chunk, 65 + chunk, chunk):
        rows = [list(range(16, 16 + min(width, 64)))] * slots
        gen.generate(rows, 2, max_len=cache_len, stream=lambda *a: None, stream_every=10**6)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="default: the embedded default model")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rates", default="4,16,64", help="requests per second, comma-separated")
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--prefill-chunk", type=int, default=32)
    ap.add_argument("--prefill-budget", type=int, default=4, help="chunks per engine step")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from hunyuan_jax.cli.serve import build_state
    from hunyuan_jax.decode.generate import Generator

    before = matmul_gflops()
    state = build_state(
        args.checkpoint, dtype=args.dtype, slots=args.slots, max_len=256,
        prefill_chunk=args.prefill_chunk, prefill_budget=args.prefill_budget, max_queue=10**6,
    )  # fmt: skip
    engine, ex = state.engine, state.engine.ex
    from flax import nnx

    model = nnx.merge(ex.graphdef, ex.params)  # the same weights for both sides
    gen = Generator(model, prefill_chunk=args.prefill_chunk, vocab_limit=ex.vocab_limit)
    warm_static(gen, args.slots, ex.cache_len, min(args.prefill_chunk, 16), ex.vocab_limit)
    engine.start()
    prompts, max_tokens = workload(args.requests, ex.vocab_limit, args.seed)
    run_continuous(engine, prompts[:4], [2] * 4, np.zeros(4))  # warm the host path
    print(
        f"{args.requests} requests, prompts 8..64 tokens, max_tokens 8..24 (80%) / 96..160 "
        f"(20%), {args.slots} slots, greedy, EOS ignored; {ex.describe()}"
    )
    print(f"{'rate/s':>7} {'mode':>10} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'span s':>7}")
    ratios = []
    for rate in [float(r) for r in args.rates.split(",")]:
        arrive = arrivals(args.requests, rate, args.seed)
        cont = run_continuous(engine, prompts, max_tokens, arrive)
        stat = run_static(gen, args.slots, ex.cache_len, prompts, max_tokens, arrive)
        for name, r in (("continuous", cont), ("static", stat)):
            print(
                f"{rate:7.1f} {name:>10} {r['tok_s']:8.1f} {r['ttft_p50']:9.3f} "
                f"{r['ttft_p99']:9.3f} {r['span']:7.1f}",
                flush=True,
            )
        ratios.append((rate, cont["tok_s"] / stat["tok_s"], cont["ttft_p99"], stat["ttft_p99"]))
    engine.shutdown()
    after = matmul_gflops()
    for rate, ratio, p99c, p99s in ratios:
        print(
            f"rate {rate:g}/s: continuous/static throughput {ratio:.2f}x, TTFT p99 "
            f"{p99c:.3f}s vs {p99s:.3f}s"
        )
    allr = before + after
    spread = max(allr) / min(allr)
    print(
        f"float32 2048^3 matmul: {np.median(before):.1f} GFLOP/s before, "
        f"{np.median(after):.1f} after (best {max(allr):.1f}, worst {min(allr):.1f})"
    )
    if spread > 1.5:
        print(
            f"WARNING: matmul rate varied {spread:.1f}x during the run: the machine was busy; "
            "compare the two modes of this run only"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
