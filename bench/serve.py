"""The serving engine under load, three comparisons, same weights, same process, sides run
alternately round after round (bench/harness.py: median and min-max over the rounds, the
machine's float32 matmul peak measured in the same rounds).

    python -m bench.serve [--checkpoint DIR | --config configs/small.yaml] [--rounds 3]
        [--only prefix,paged,static]

The default model is the server's embedded default (0.9M parameters: on a CPU its step cost is
compute, proportional to the tokens of a step); `--config` takes a random-initialised model of
a YAML architecture instead (configs/small.yaml: 106M parameters, decode steps that read the
weights from memory, the regime of an accelerator serving a large model).

Every request is driven in-process (no HTTP): only scheduling and caching differ. Greedy, EOS
ignored (each request produces exactly its max_tokens). Every compile happens before timing.

1. prefix: 64 requests arriving at once, each one shared 448-token system prompt + a 12..20
   token question, 16 new tokens; prefix caching on vs off (same engine shape, the server's
   defaults: 64 rows (--slots), a pool of 16 x 512 tokens (--kv-cache-tokens for --max-len
   512), page size 16, token budget 512 (--prefill-chunk)).
   Time-to-first-token p50 and throughput.
2. paged: mixed lengths (prompts 8..64 tokens; max_tokens 8..24 for 80%, 96..160 for 20%), 160
   requests arriving at once (saturation), at equal KV cache bytes (128 pages x 16 tokens =
   8 x 256-token rows): "slot rows" (8 sequences in flight, as many as rows of max_len fit:
   the server before paging) vs paged (up to 64 sequences in flight, admitted by free pages).
   Peak sequences in flight and throughput.
3. static: the same mixed workload at saturation, continuous batching (the engine, 8 rows) vs
   static batching (the contiguous-cache Generator: whenever it is idle, up to 8 waiting
   requests form one batch decoded until its longest is done).

tokens/step and step ms/token: the real (not padding) tokens the engine's step programs fed per
call, and their wall time per such token (the programs' own cost; when it does not fall as
steps grow, a step costs its tokens' compute and more sequences in flight cannot raise the
throughput: the floor of comparison 2 on a CPU). Throughput = new tokens / (last finish -
first arrival); saturated throughput = the tokens made while requests were still waiting (until
the last request's first token) / that time, the engine's rate at full load without the tail
of a finite burst; TTFT = first token - arrival.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import time

import numpy as np

from bench.harness import alternate, busy_warnings, machine_line, report_peak
from hunyuan_jax.checkpoints.loading import read_model_config
from hunyuan_jax.cli.decode_flags import PREFILL_CHUNK
from hunyuan_jax.cli.serve import DEFAULT_MODEL, SLOTS, default_pool_tokens
from hunyuan_jax.decode import from_checkpoint
from hunyuan_jax.engine.core import EngineCore
from hunyuan_jax.engine.requests import GenParams, Request
from hunyuan_jax.engine.scheduler import Engine
from hunyuan_jax.model.policy import RuntimePolicy
from hunyuan_jax.model.state import init_model
from tests.helpers.contiguous import Generator

PAGE = 16


def mixed_workload(n: int, vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(16, vocab, size=int(k)).tolist() for k in rng.integers(8, 65, n)]
    long = rng.random(n) < 0.2
    max_tokens = np.where(long, rng.integers(96, 161, n), rng.integers(8, 25, n))
    return prompts, [int(m) for m in max_tokens]


def prefix_workload(n: int, vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    system = rng.integers(16, vocab, size=448).tolist()
    prompts = [
        system + rng.integers(16, vocab, size=int(k)).tolist() for k in rng.integers(12, 21, n)
    ]
    return prompts, [16] * n


def drive(engine: Engine, prompts, max_tokens) -> dict:
    """All requests at once; returns tok/s, TTFT p50 / p99 and the peak sequences in flight."""
    n = len(prompts)
    first, finish, count = [None] * n, [None] * n, [0] * n
    stamps = []  # time of every new token
    done = queue.Queue()

    def sink(i):
        def f(ev):
            if ev.kind == "token":
                count[i] += 1
                stamps.append(time.perf_counter())
                if first[i] is None:
                    first[i] = time.perf_counter()
            elif ev.kind == "done":
                finish[i] = time.perf_counter()
                done.put(i)

        return f

    engine.start()
    t0 = time.perf_counter()
    for i in range(n):
        engine.submit(
            Request(prompts[i], GenParams(max_tokens=max_tokens[i], ignore_eos=True), sink(i))
        )
    for _ in range(n):
        done.get(timeout=900)
    engine.shutdown()
    assert count == list(max_tokens), "a request lost tokens"
    ttft = np.array(first) - t0
    admitted = max(first)  # the last request's first token: the queue was never empty before
    return {
        "tok_s": sum(count) / (max(finish) - t0),
        "sat_tok_s": sum(t <= admitted for t in stamps) / (admitted - t0),
        "ttft_p50": float(np.percentile(ttft, 50)),
        "ttft_p99": float(np.percentile(ttft, 99)),
        "in_flight": engine.peak_running,
        # the step programs' own cost: wall time per real token fed and real tokens per step
        "ms_per_token": 1e3 * sum(engine.step_seconds.values()) / sum(engine.step_tokens.values()),
        "tokens_per_step": sum(engine.step_tokens.values()) / sum(engine.steps.values()),
    }


def run_static(gen: Generator, rows: int, max_len: int, prompts, max_tokens) -> dict:
    """Static batching of requests that all arrived at t0."""
    n = len(prompts)
    first, finish = [None] * n, [None] * n
    t0 = time.perf_counter()
    for s in range(0, n, rows):
        batch = list(range(s, min(s + rows, n)))
        padded = [prompts[i] for i in batch] + [[1]] * (rows - len(batch))

        def stream(step, tokens, live, batch=batch):
            if step == 0:
                for i in batch:
                    first[i] = time.perf_counter()

        longest = max(max_tokens[i] for i in batch)
        gen.generate(padded, longest, max_len=max_len, stream=stream, stream_every=10**6)
        for i in batch:
            finish[i] = time.perf_counter()
    ttft = np.array(first) - t0
    return {
        "tok_s": sum(max_tokens) / (max(finish) - t0),
        "sat_tok_s": float("nan"),
        "ttft_p50": float(np.percentile(ttft, 50)),
        "ttft_p99": float(np.percentile(ttft, 99)),
        "in_flight": rows,
        "ms_per_token": float("nan"),
        "tokens_per_step": float("nan"),
    }


def _side(fn):
    """A harness side: the run's figures as 'quantities' (the harness keeps their samples)."""

    def run():
        r = fn()
        keys = ("tok_s", "sat_tok_s", "ttft_p50", "ttft_p99", "in_flight", "ms_per_token",
                "tokens_per_step")  # fmt: skip
        return {k: float(r[k]) for k in keys}

    return run


def _table(title: str, results: dict, sides: list[str]) -> None:
    print(f"\n{title}")
    print(
        f"{'side':>12} {'tok/s':>22} {'saturated tok/s':>22} {'TTFT p50 s':>22} "
        f"{'TTFT p99 s':>10} {'in flight':>9} {'tokens/step':>11} {'step ms/token':>13}"
    )
    for side in sides:
        q = results[side]
        rng = lambda s, f: f"{s.median:{f}} ({s.lo:{f}}-{s.hi:{f}})"
        print(
            f"{side:>12} {rng(q['tok_s'], '.1f'):>22} {rng(q['sat_tok_s'], '.1f'):>22} "
            f"{rng(q['ttft_p50'], '.3f'):>22} "
            f"{q['ttft_p99'].median:10.3f} {q['in_flight'].median:9.0f} "
            f"{q['tokens_per_step'].median:11.1f} {q['ms_per_token'].median:13.3f}"
        )


def _ratio(results, a, b, q):
    return results[a][q].median / results[b][q].median


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="default: the embedded default model")
    ap.add_argument("--config", default=None, help="random weights of this YAML architecture")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="prefix,paged,static", help="comparisons to run")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # read when the first array is made

    if args.config:
        cfg = read_model_config(args.config)
        model, vocab = init_model(cfg, RuntimePolicy.inference(args.dtype), seed=0), cfg.vocab_size
    else:
        bundle = from_checkpoint.load(args.checkpoint or DEFAULT_MODEL, dtype=args.dtype)
        model, vocab = bundle.model, bundle.tokenizer.vocab_size
    quiet = lambda m: None
    print(machine_line())
    summary = []

    if "prefix" in only:
        pages = -(-default_pool_tokens(SLOTS, 512) // PAGE) + 1  # + the scratch page
        core = EngineCore(model, max_seqs=SLOTS, max_len=512, page_size=PAGE, num_pages=pages,
                          token_budget=PREFILL_CHUNK, vocab_limit=vocab)  # fmt: skip
        print(f"prefix: {core.describe()}")
        prompts, mt = prefix_workload(64, vocab, args.seed)
        sides = {
            "no cache": _side(
                lambda: drive(
                    Engine(core, prefix_caching=False, max_queue=10**6, log=quiet), prompts, mt
                )
            ),
            "prefix cache": _side(
                lambda: drive(Engine(core, max_queue=10**6, log=quiet), prompts, mt)
            ),
        }
        drive(Engine(core, max_queue=10**6, log=quiet), prompts[:2], [2, 2])  # warm the host path
        res = alternate(sides, args.rounds)
        _table(
            "1. shared 448-token system prompt, 64 requests at once, 16 new tokens",
            res,
            list(sides),
        )
        report_peak(res)
        for w in busy_warnings({k: res[k] for k in sides}, limit=0.5):
            print(w)
        summary.append(
            f"prefix caching: TTFT p50 {_ratio(res, 'no cache', 'prefix cache', 'ttft_p50'):.1f}x "
            f"lower, throughput {_ratio(res, 'prefix cache', 'no cache', 'tok_s'):.2f}x"
        )

    if "paged" in only or "static" in only:
        prompts, mt = mixed_workload(160, vocab, args.seed)
        pages = 8 * 256 // PAGE + 1  # 8 rows of 256 tokens, plus the scratch page
        rows8 = EngineCore(model, max_seqs=8, max_len=256, page_size=PAGE, num_pages=pages,
                           token_budget=256, vocab_limit=vocab)  # fmt: skip
        print(f"slot rows: {rows8.describe()}")
        drive(Engine(rows8, max_queue=10**6, log=quiet), prompts[:2], [2, 2])
    if "paged" in only:
        paged = EngineCore(model, max_seqs=64, max_len=256, page_size=PAGE, num_pages=pages,
                           token_budget=256, vocab_limit=vocab)  # fmt: skip
        print(f"paged: {paged.describe()}")
        drive(Engine(paged, max_queue=10**6, log=quiet), prompts[:2], [2, 2])
        sides = {
            "slot rows": _side(
                lambda: drive(Engine(rows8, max_queue=10**6, log=quiet), prompts, mt)
            ),
            "paged": _side(lambda: drive(Engine(paged, max_queue=10**6, log=quiet), prompts, mt)),
        }
        res = alternate(sides, args.rounds)
        _table(
            "2. mixed lengths, 160 requests at once, equal cache bytes (2048 tokens)",
            res,
            list(sides),
        )
        report_peak(res)
        summary.append(
            f"paged vs slot rows: {_ratio(res, 'paged', 'slot rows', 'in_flight'):.1f}x the "
            f"sequences in flight, saturated throughput "
            f"{_ratio(res, 'paged', 'slot rows', 'sat_tok_s'):.2f}x (whole run "
            f"{_ratio(res, 'paged', 'slot rows', 'tok_s'):.2f}x)"
        )
    if "static" in only:
        gen = Generator(model, prefill_chunk=32, vocab_limit=vocab)
        for width in (32, 64):  # compile every prompt width the static side meets
            gen.generate([list(range(16, 16 + width))] * 8, 2, max_len=256, stream=lambda *a: None,
                         stream_every=10**6)  # fmt: skip
        sides = {
            "continuous": _side(
                lambda: drive(Engine(rows8, max_queue=10**6, log=quiet), prompts, mt)
            ),
            "static": _side(lambda: run_static(gen, 8, 256, prompts, mt)),
        }
        res = alternate(sides, args.rounds)
        _table(
            "3. mixed lengths, 160 requests at once, 8 rows: continuous vs static", res, list(sides)
        )
        report_peak(res)
        summary.append(
            f"continuous vs static batching: throughput {_ratio(res, 'continuous', 'static', 'tok_s'):.2f}x"
        )
    print()
    for line in summary:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
