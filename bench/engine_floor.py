"""The floors under issue 22's CPU targets for the serving engine, each measured beside this
machine's memory read rate and matmul peak in the same process, sides alternating
(bench/harness.py: median and min-max over the rounds).

    python -m bench.engine_floor                         # all four parts
    python -m bench.engine_floor --only matvec --config configs/small.yaml
    python -m bench.engine_floor --only matvec --flags-sweep   # XLA:CPU flag variants
    python -m bench.engine_floor --only batch,static     # the serve bench's default model

1. matvec: the best XLA:CPU does here for the reads of a batch-1 decode step: a jitted chain
   of the model's own batch-1 matvec shapes over float32 weights (every dense projection of
   every layer, one routed expert per layer, the shared expert, the router and the tied
   embedding as the LM head: the bytes the engine's step reads, cache aside), as a fraction of
   the read rate. Variants (same bytes): `flat x@W` (one array per matrix, [K, N] as the model
   stores them), `flat W@x` (the transpose, [N, K]: contiguous dot products), `scan` (the
   model's layout: weights stacked over layer groups, `lax.scan`, the routed expert indexed by
   a traced id, as `moe.few_token_experts` reads it). `--flags-sweep` reruns this part in a
   child process per XLA_FLAGS variant (the flags are read when XLA starts).
2. batch: the engine's decode-step throughput (tokens/s of one program call, no scheduler) at
   1, 8, 16, 32, 50 decode rows, on the paged engine shape of bench/serve.py's comparison 2
   (64 rows) and at 8 on its slot-rows shape (8 rows): the compute floor of the paged vs slot
   rows throughput goal.
3. static: for bench/serve.py's mixed workload (160 requests, 8 rows), the upper bound of
   continuous / static batching when a step costs the same whatever it carries: static runs
   every batch for its longest request (sum over batches of 8 x max), continuous runs only
   real tokens (sum of prompt + new tokens over requests, 8 per step at best); and the host's
   share of a continuous step (engine step wall time vs the program call alone).
5. layout: the engine's batch-1 decode step (program call only) with the layer weights
   stacked and run by `lax.scan` (`EngineCore(group_arrays=False)`) vs each group's weights
   arrays of their own run by a Python loop (`group_arrays=True`, the CPU default).
4. host: where a batch-1 decode step's wall time goes on the engine (scheduler, building and
   packing the step, the program call, reading its results, the per-token bookkeeping), per
   step, timed by wrapping the scheduler's methods.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench import harness  # noqa: E402
from hunyuan_jax.checkpoints.loading import read_model_config  # noqa: E402
from hunyuan_jax.engine.core import EngineCore  # noqa: E402
from hunyuan_jax.engine.requests import GenParams, Request  # noqa: E402
from hunyuan_jax.engine.scheduler import Engine  # noqa: E402
from hunyuan_jax.engine.step import StepWork  # noqa: E402
from hunyuan_jax.model.policy import RuntimePolicy  # noqa: E402
from hunyuan_jax.model.state import init_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PAGE = 16
FLAG_VARIANTS = {  # XLA_FLAGS of the flag sweep (options of the installed jaxlib)
    "default": "",
    "one thread": "--xla_cpu_multi_thread_eigen=false",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "xnn graph greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "onednn": "--xla_cpu_use_onednn=true",
    "fast math": "--xla_cpu_enable_fast_math=true",
    "no thunk runtime": "--xla_cpu_use_thunk_runtime=false",
}


# ============================================================================ 1. matvec floor
def decode_matrices(model, batch: int = 1) -> dict[str, tuple[int, ...]]:
    """{name: stacked shape} of the matrices one decode step multiplies by: [G, K, N] per
    projection (G layer groups; the routed experts as [G, n, K, N] with n the experts a batch
    can choose) and the LM head [V, D]."""
    cfg = model.cfg
    out = {}
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape, names = v.get_value().shape, [str(k) for k in path]
        if len(shape) < 3 and names[0] != "embed":
            continue  # norm weights: vectors
        if names[0] == "embed":
            out["embed"] = shape
            continue
        g, rest = shape[0], shape[1:]
        key = ".".join(names[2:])
        if names[-1] in ("gate_proj", "up_proj", "down_proj") and "shared" not in names:
            n = min(batch * cfg.moe_top_k, cfg.num_experts)
            out[key] = (g, n, rest[1], int(np.prod(rest[2:])))
        else:
            k = rest[0] * rest[1] if names[-1] == "o_proj" else rest[0]
            out[key] = (g, k, int(np.prod(rest)) // k)
    return out


def _matrices(shapes, transpose: bool, seed=0):
    """Random float32 arrays of `decode_matrices`' shapes; `transpose`: [.., N, K]."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if name != "embed" and transpose:
            shape = shape[:-2] + (shape[-1], shape[-2])
        out[name] = jnp.asarray(rng.standard_normal(shape, np.float32) * 0.01)
    return out


def _chain_flat(mats: list, embed, x0, transpose: bool):
    """x -> sum(x[:K] @ W) feeds the next matvec (a dependency chain); W@x when transposed;
    then the LM head [V, D] @ x[:D]."""
    x = x0
    for w in mats:
        y = w @ x[: w.shape[1]] if transpose else x[: w.shape[0]] @ w
        x = x + jnp.sum(y) * 1e-30
    return x + jnp.sum(embed @ x[: embed.shape[1]]) * 1e-30


def _chain_scan(stacked: dict, embed, x0, expert_id, unroll: bool = False):
    """The model's layout: a scan over layer groups of stacked weights, the routed expert
    indexed by a traced id (as `moe.few_token_experts` reads it)."""

    def body(x, ws):
        for w in ws.values():
            if w.ndim == 3:  # [E, K, N]: the chosen expert, dynamic index
                w = jax.lax.dynamic_index_in_dim(w, expert_id, keepdims=False)
            y = x[: w.shape[0]] @ w
            x = x + jnp.sum(y) * 1e-30
        return x, None

    if unroll:  # a Python loop over the groups: static slices of the stacked weights
        x = x0
        for g in range(next(iter(stacked.values())).shape[0]):
            x, _ = body(x, {k: w[g] for k, w in stacked.items()})
    else:
        x, _ = jax.lax.scan(body, x0, stacked)
    return x + jnp.sum(embed @ x[: embed.shape[1]]) * 1e-30


def _run(fn, args) -> None:
    """A harness side timed as a whole (returns None)."""
    jax.block_until_ready(fn(*args))


def matvec_sides(model, log):
    """Harness sides of the matvec floor; returns (sides, bytes per chain)."""
    shapes = decode_matrices(model, batch=1)
    width = max(max(s[-2:]) for k, s in shapes.items() if k != "embed")
    x0 = jnp.ones((width,), jnp.float32) * 0.01
    sides, nbytes = {}, None
    for label, transpose in (("flat x@W", False), ("flat W@x", True)):
        mats = _matrices(shapes, transpose)
        flat = []
        for name, w in mats.items():
            if name == "embed":
                continue
            flat += [w[g].reshape(w.shape[-2:]) if w.ndim == 4 else w[g] for g in range(w.shape[0])]
        flat = [jax.block_until_ready(jnp.array(w)) for w in flat]
        nbytes = sum(w.nbytes for w in flat) + mats["embed"].nbytes
        fn = jax.jit(functools.partial(_chain_flat, transpose=transpose))
        a = (flat, mats["embed"], x0)
        fn(*a).block_until_ready()
        sides[label] = functools.partial(_run, fn, a)
    # the model's stacked layout: all experts stored (E of them), one read per layer group
    cfg = model.cfg
    stacked = {}
    for name, shape in shapes.items():
        if name == "embed":
            continue
        if len(shape) == 4:
            shape = (shape[0], cfg.num_experts) + shape[2:]
        stacked[name] = jnp.asarray(np.random.default_rng(1).standard_normal(shape, np.float32))
    embed = _matrices({"embed": shapes["embed"]}, False)["embed"]
    eid = jnp.int32(cfg.num_experts - 1)
    for label, unroll in (("scan (model layout)", False), ("loop (model layout)", True)):
        fn = jax.jit(functools.partial(_chain_scan, unroll=unroll))
        fn(stacked, embed, x0, eid).block_until_ready()
        sides[label] = functools.partial(_run, fn, (stacked, embed, x0, eid))
    log(f"# matvec chain: {len(shapes)} matrix kinds, {nbytes / 1e6:.1f} MB read per chain")
    return sides, nbytes


# ============================================================================ 2. batch floor
def decode_work(core: EngineCore, rows: int, context: int) -> StepWork:
    """A decode step of `rows` sequences, each `context` tokens in (pages 1.. in order)."""
    w = StepWork.empty(core.shape(core.bucket_for(rows)))
    pages_each = -(-(context + 1) // core.page_size)
    for i in range(rows):
        pages = 1 + i * pages_each + np.arange(pages_each)
        w.tokens[i], w.positions[i] = 17 + i, context
        w.slots[i] = pages[context // core.page_size] * core.page_size + context % core.page_size
        w.seq_ids[i], w.valid[i] = i, 1
        w.kv_lens[i], w.last_index[i], w.rows[i], w.sample[i] = context + 1, i, i, 1
        w.page_indices[i, :pages_each] = pages
        w.cu_q_lens[i + 1] = i + 1
        w.keys[i] = (0, i)
    w.cu_q_lens[rows + 1 :] = rows
    w.num_seqs[0] = rows
    return w


def batch_sides(paged: EngineCore, rows8: EngineCore, batches, context: int):
    sides = {}
    for core, label, bs in ((paged, "paged", batches), (rows8, "slot rows", [8])):
        for b in bs:
            packed = decode_work(core, b, context).pack()
            t = core.bucket_for(b)

            def call(core=core, t=t, packed=packed, b=b):
                t0 = time.perf_counter()
                jax.block_until_ready(core.step_packed(t, *packed))
                return {"tok_s": b / (time.perf_counter() - t0)}

            call()  # compile (lazy) and warm up
            sides[f"{label} {b}"] = call
    return sides


# ============================================================================ 3. static bound
def static_bound(prompts, max_tokens, rows: int = 8) -> dict:
    """Token slots each scheme computes for the workload when every step runs `rows` rows."""
    lens = [len(p) + m for p, m in zip(prompts, max_tokens)]
    static = 0
    for s in range(0, len(prompts), rows):
        b = range(s, min(s + rows, len(prompts)))
        static += rows * (max(len(prompts[i]) for i in b) + max(max_tokens[i] for i in b))
    decode_static = sum(
        rows * max(max_tokens[i] for i in range(s, min(s + rows, len(prompts))))
        for s in range(0, len(prompts), rows)
    )
    return {
        "static slots": static,
        "continuous slots": sum(lens),
        "bound": static / sum(lens),
        "decode-only bound": decode_static / sum(max_tokens),
    }


# ============================================================================ 4. host profile
class StepClock:
    """Wall time of named Engine methods, per call of the engine's step (wrapped in place)."""

    METHODS = ("_admit", "_reap", "_schedule", "_build", "_do_step", "_token", "_emit")

    def __init__(self, engine: Engine):
        self.total = collections.Counter()
        self.engine = engine
        for name in self.METHODS:
            setattr(engine, name, self._wrap(name, getattr(engine, name)))
        core = engine.ex
        core.step_packed = self._wrap("program call", core.step_packed, block=True)

    def _wrap(self, name, fn, block=False):
        def timed(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            if block:
                jax.block_until_ready(out)
            self.total[name] += time.perf_counter() - t0
            return out

        return timed


def host_profile(core: EngineCore, new_tokens: int, rows: int = 1):
    """run(clock) -> (wall seconds, decode steps, StepClock or None): `rows` requests decoded
    to `new_tokens` on `core`, timed from after their prefill step (clock: the scheduler's
    methods and the program call timed apart)."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(16, core.cfg.vocab_size, 32).tolist() for _ in range(rows)]

    def run(clock: bool):
        engine = Engine(core, max_queue=rows, log=lambda m: None)
        timer = StepClock(engine) if clock else None
        for p in prompts:
            engine.submit(
                Request(p, GenParams(max_tokens=new_tokens, ignore_eos=True), lambda e: None)
            )
        engine._iteration(stop=False)  # the prefill step (not counted)
        if timer:
            timer.total.clear()
        t0 = time.perf_counter()
        steps = 0
        while engine.running:
            engine._iteration(stop=False)
            steps += 1
        wall = time.perf_counter() - t0
        if clock:
            del core.step_packed  # the class's method again
        return wall, steps, timer

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "small.yaml"), help="matvec, host")
    ap.add_argument("--only", default="matvec,batch,static,host")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32, 50])
    ap.add_argument("--context", type=int, default=64, help="cached tokens per row (batch)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--flags-sweep", action="store_true", help="matvec under each XLA_FLAGS")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    log = lambda m: print(m, flush=True)
    log(f"# {harness.machine_line()} at start; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    if args.flags_sweep:
        for label, flags in FLAG_VARIANTS.items():
            env = dict(os.environ, XLA_FLAGS=flags)
            cmd = [sys.executable, "-m", "bench.engine_floor", "--only", "matvec", "--config",
                   args.config, "--rounds", str(args.rounds)]  # fmt: skip
            cmd += [a for s in args.set for a in ("--set", s)]
            log(f"\n### flags variant '{label}': XLA_FLAGS={flags!r}")
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
            log(r.stdout.strip() or r.stderr.strip()[-2000:])
        return 0

    cfg = read_model_config(args.config)
    for item in args.set:
        key, _, value = item.partition("=")
        cfg = cfg.replace(**{key: float(value) if "." in value else int(value)})
    if {"matvec", "host", "layout"} & only:
        model = init_model(cfg, RuntimePolicy.inference("float32"), seed=0)
    if "matvec" in only:
        sides, nbytes = matvec_sides(model, log)
        read, mem_bytes = harness.memory_bandwidth_fn()
        sides["memory"] = lambda: read() and None
        res = harness.alternate(sides, args.rounds, log=log)
        bw = mem_bytes / res["memory"]["time"].median
        log(f"\n## 1. matvec floor ({Path(args.config).name}{''.join(' ' + s for s in args.set)}"
            f", batch 1, {nbytes / 1e6:.1f} MB of float32 weights per chain)")  # fmt: skip
        harness.report_peak(res)
        log(f"memory read rate (512 MiB float32 reduction, same rounds): "
            f"{bw / 1e9:.1f} GB/s ({res['memory']['time'].rate(mem_bytes / 1e9)})")  # fmt: skip
        log("| chain | ms | GB/s (min-max) | of the read rate |")
        log("|---|---|---|---|")
        for name, q in res.items():
            if name in ("peak", "memory"):
                continue
            st = q["time"]
            log(f"| {name} | {st.median * 1e3:.2f} | {st.rate(nbytes / 1e9)} | "
                f"{nbytes / st.median / bw:.0%} |")  # fmt: skip
        for w in harness.busy_warnings(res):
            log(w)

    if "batch" in only or "static" in only:
        from bench.serve import mixed_workload
        from hunyuan_jax.cli.serve import DEFAULT_MODEL
        from hunyuan_jax.decode import from_checkpoint

        bundle = from_checkpoint.load(DEFAULT_MODEL, dtype="float32")
        smodel, vocab = bundle.model, bundle.tokenizer.vocab_size
        pages = 8 * 256 // PAGE + 1
        kw = dict(max_len=256, page_size=PAGE, token_budget=256, vocab_limit=vocab, lazy=True)
        # the pool of bench/serve.py holds 2048 tokens; rows at `context` need more here
        need = max(args.batches) * -(-(args.context + 1) // PAGE) + 1
        paged = EngineCore(smodel, max_seqs=64, num_pages=max(pages, need), **kw)
        rows8 = EngineCore(smodel, max_seqs=8, num_pages=pages, **kw)
    if "batch" in only:
        sides = batch_sides(paged, rows8, args.batches, args.context)
        res = harness.alternate(sides, args.rounds, log=log)
        log(f"\n## 2. engine decode-step throughput (default model, {args.context}-token rows,"
            f" program call only)")  # fmt: skip
        harness.report_peak(res)
        base = res["slot rows 8"]["tok_s"].median
        log("| engine shape | decode rows | tokens/s (min-max) | vs slot rows at 8 |")
        log("|---|---|---|---|")
        for name, q in res.items():
            if name == "peak":
                continue
            st = q["tok_s"]
            label, b = name.rsplit(" ", 1)
            log(f"| {label} | {b} | {st.median:,.0f} ({st.lo:,.0f}-{st.hi:,.0f}) | "
                f"{st.median / base:.2f}x |")  # fmt: skip
        for w in harness.busy_warnings(res):
            log(w)
    if "static" in only:
        prompts, mt = mixed_workload(160, vocab, 0)
        b = static_bound(prompts, mt)
        log("\n## 3. continuous / static upper bound, bench/serve.py's mixed workload (160 "
            "requests, 8 rows, equal cost per step)")  # fmt: skip
        log(f"token slots: static {b['static slots']:,} (prompt + new, each batch padded to "
            f"its longest), continuous {b['continuous slots']:,} (real tokens only): bound "
            f"{b['bound']:.2f}x; decode steps alone: {b['decode-only bound']:.2f}x")  # fmt: skip
        run = host_profile(rows8, 48, rows=8)
        run(False)
        walls, progs = [], []
        for _ in range(args.rounds):
            wall, steps, timer = run(True)
            walls.append(wall / steps)
            progs.append(timer.total["program call"] / steps)
        w, p = np.median(walls), np.median(progs)
        log(f"8 decode rows on the slot-rows engine: step wall {w * 1e3:.2f} ms, program call "
            f"{p * 1e3:.2f} ms: host {100 * (w - p) / w:.0f}% of a step")  # fmt: skip
    if "layout" in only:
        from bench.decode import decode_step_bytes

        kw = dict(max_seqs=8, max_len=256, page_size=PAGE, token_budget=256, lazy=True)
        cores = {
            "stacked weights, scan": EngineCore(model, group_arrays=False, **kw),
            "group arrays, loop": EngineCore(model, group_arrays=True, **kw),
        }
        sides = {}
        for name, core in cores.items():
            packed = decode_work(core, 1, args.context).pack()

            def call(core=core, packed=packed):
                jax.block_until_ready(core.step_packed(1, *packed))

            call()
            sides[name] = call
        read, mem_bytes = harness.memory_bandwidth_fn()
        sides["memory"] = lambda: read() and None
        res = harness.alternate(sides, args.rounds, log=log)
        bw = mem_bytes / res["memory"]["time"].median
        step_bytes = decode_step_bytes(cfg, model, 1, args.context)
        log(f"\n## 5. engine batch-1 decode step (program call only), stacked weights by scan "
            f"vs per-group arrays; {step_bytes / 1e6:.1f} MB read per step; read rate "
            f"{bw / 1e9:.1f} GB/s")  # fmt: skip
        harness.report_peak(res)
        for name in cores:
            st = res[name]["time"]
            log(f"| {name} | {st.median * 1e3:.2f} ms ({st.lo * 1e3:.2f}-{st.hi * 1e3:.2f}) | "
                f"{1 / st.median:.1f} steps/s | {step_bytes / st.median / bw:.0%} of the read "
                f"rate |")  # fmt: skip
        for w in harness.busy_warnings(res):
            log(w)
    if "host" in only:
        core = EngineCore(model, max_seqs=8, max_len=256, page_size=PAGE, token_budget=256,
                          lazy=True)  # fmt: skip
        run = host_profile(core, 64, rows=1)
        run(False)
        totals, walls, n = collections.Counter(), [], 0
        for _ in range(args.rounds):
            wall, steps, timer = run(True)
            walls.append(wall / steps)
            for k, v in timer.total.items():
                totals[k] += v / steps
            n += 1
        log(f"\n## 4. engine host profile, batch-1 decode ({Path(args.config).name}), ms per "
            f"step, mean of {n} runs of 63 steps; step wall median {np.median(walls) * 1e3:.2f} "
            f"ms (min-max {min(walls) * 1e3:.2f}-{max(walls) * 1e3:.2f})")  # fmt: skip
        for k, v in sorted(totals.items(), key=lambda kv: -kv[1]):
            log(f"  {k:>14}: {v / n * 1e3:.3f} ms")
        log("  (_do_step includes the program call and _token/_emit; _token includes _emit)")
    log(f"# {harness.machine_line()} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
