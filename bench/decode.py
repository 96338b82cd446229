"""Prefill and decode throughput of the serving engine (hunyuan_jax.engine: what infer.py and
the server run) and of the contiguous-cache Generator vs a PyTorch eager baseline, same process.

    python -m bench.decode                      # configs/small.yaml, batch 1 and 8
    python -m bench.decode --prompt-len 128 --new-tokens 32 --batches 1 8 --repeats 3
    python -m bench.decode --threads 1         # both single-threaded (steadier when busy)
    python -m bench.decode --original-code ../shared/reference/original_code --bf16
    python -m bench.decode --layers 16 --batches 1 --repeats 1 --no-compact   # compile time
    python -m bench.decode --set num_experts=32 --set vocab_size=65536   # an untuned shape

The baseline is a compact PyTorch implementation of the same math (`TorchHunyuan` below: CLA,
QK-norm after RoPE, NTK-alpha RoPE, GQA, shared expert + top-1 experts) with its own
preallocated KV cache, run eagerly under `torch.inference_mode()` the way `transformers`
`generate` (4.41, the version of the reference outputs) runs: full-prompt logits in the
prefill, then one token per step with greedy argmax, attention through
`F.scaled_dot_product_attention` over the filled part of the cache, MoE by a loop over the
experts with their tokens gathered. transformers itself is not installed, and its in-library
HunYuan class is not Hunyuan-Large. Both sides load the same float32 weights; the greedy tokens
of the two are compared as a correctness check.

With `--original-code DIR` (the original modeling code, needs transformers==4.41.2: an
optional extra, the side is skipped with a message otherwise) the original
`HunYuanForCausalLM` with transformers' `generate` is a side too, on the same weights saved
through the project's exporter (bench/original.py). `--bf16` adds the JAX side with bfloat16
weights (reported separately; the ratios that matter are float32 against float32).

Memory bound: for each batch the table gives the bytes one decode step reads (the weights it
touches: every dense weight, the tied embedding for the logits, the routed experts the batch's
tokens can choose, min(batch x top-k, experts) per layer; plus the KV cache of every row) and the
fraction of this machine's memory read rate that the decode reaches, the rate measured in the
same rounds (a 512 MiB float32 reduction).

Timings exclude compilation (the Generator compiles ahead of time; compile seconds printed)
and come from `--repeats` rounds that run the sides alternately (bench/harness.py): median
and min-max, the machine's matmul peak in the same rounds, a warning when the spread says the
machine was busy. Prefill tokens/s = prompt tokens / (prefill + first token); decode
tokens/s = tokens from the decode loop / its time. `--accuracy` (default on) adds the int8 / bf16 KV
cache error: per-step logits of a cached greedy decode vs a float32 forward over the same
sequence, and how often the tokens match a float32-cache run.

Numbers vary a lot with machine load: torch's multi-threaded kernels slow down far more than
XLA's when the cores are oversubscribed, so on a busy machine compare `--threads 1` runs too.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # as train.py / infer.py do (hunyuan_jax/host_env.py)
    from hunyuan_jax.host_env import reexec_with_hugepage_malloc

    reexec_with_hugepage_malloc()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--threads" in sys.argv:  # before jax starts: XLA's CPU thread pool is fixed at start-up
    _threads = int(sys.argv[sys.argv.index("--threads") + 1])
    if _threads == 1:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen"
            "=false intra_op_parallelism_threads=1"
        ).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from flax import nnx  # noqa: E402

from bench import harness  # noqa: E402
from hunyuan_jax.checkpoints.loading import read_model_config  # noqa: E402
from hunyuan_jax.engine.offline import OfflineGenerator  # noqa: E402
from hunyuan_jax.model.config import ModelConfig  # noqa: E402
from hunyuan_jax.model.kv_cache import pool_bytes_per_token  # noqa: E402
from hunyuan_jax.model.policy import RuntimePolicy  # noqa: E402
from hunyuan_jax.model.state import init_model  # noqa: E402
from tests.helpers.contiguous import Generator  # noqa: E402


# ============================================================================ PyTorch baseline
class TorchHunyuan:
    """Hunyuan-Large forward + greedy generation in eager PyTorch, with a KV cache of the
    KV-producing layers (one per CLA group), from the JAX model's parameter tree."""

    def __init__(self, cfg: ModelConfig, model):
        self.cfg = cfg
        flat = {
            k: torch.from_numpy(np.array(v.get_value(), np.float32))
            for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
        }
        self.embed = flat[("embed",)]
        self.final_norm = flat[("final_norm", "weight")]
        self.layers = []
        for g in range(cfg.num_groups):
            for j in range(cfg.cla_share_factor):
                get = lambda *p: flat[("groups", "layers", j) + p][g]
                d = cfg.hidden_size
                layer = dict(
                    group=g,
                    produces_kv=j == 0,
                    input_norm=get("input_norm", "weight"),
                    post_norm=get("post_attn_norm", "weight"),
                    q=get("attn", "q_proj").reshape(d, -1),
                    o=get("attn", "o_proj").reshape(-1, d),
                    qn=get("attn", "query_norm", "weight"),
                    kn=get("attn", "key_norm", "weight"),
                    router=get("moe", "router"),
                    gate=get("moe", "gate_proj"),
                    up=get("moe", "up_proj"),
                    down=get("moe", "down_proj"),
                    s_gate=get("moe", "shared", "gate_proj"),
                    s_up=get("moe", "shared", "up_proj"),
                    s_down=get("moe", "shared", "down_proj"),
                )
                if j == 0:
                    layer["k"] = get("attn", "k_proj").reshape(d, -1)
                    layer["v"] = get("attn", "v_proj").reshape(d, -1)
                self.layers.append(layer)
        dh = cfg.head_dim
        self.inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh))

    def _rms(self, x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps) * w

    def _rope(self, x, pos):  # x [B, S, N, Dh], pos [S]
        freqs = pos[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], -1)[None, :, None, :]
        x1, x2 = x.chunk(2, -1)
        return x * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()

    def _moe(self, l, x):
        b, s, d = x.shape
        flat = x.reshape(-1, d)
        probs = torch.softmax(flat @ l["router"], -1)
        weight, expert = probs.max(-1)
        out = (F.silu(flat @ l["s_gate"]) * (flat @ l["s_up"])) @ l["s_down"]
        for e in range(self.cfg.num_experts):
            idx = (expert == e).nonzero(as_tuple=True)[0]
            if idx.numel():
                xe = flat[idx]
                ye = (F.silu(xe @ l["gate"][e]) * (xe @ l["up"][e])) @ l["down"][e]
                out.index_add_(0, idx, ye * weight[idx, None])
        return out.reshape(b, s, d)

    def forward(self, tokens, cache, start: int):
        """tokens [B, S] at positions start..start+S-1 -> logits [B, S, V]; fills `cache`."""
        cfg = self.cfg
        b, s = tokens.shape
        h_, kvh, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pos = torch.arange(start, start + s)
        x = self.embed[tokens]
        for l in self.layers:
            h = self._rms(x, l["input_norm"])
            if l["produces_kv"]:
                ck, cv = cache[l["group"]]
                ck[:, start : start + s] = self._rope((h @ l["k"]).view(b, s, kvh, dh), pos)
                cv[:, start : start + s] = (h @ l["v"]).view(b, s, kvh, dh)
                k_all, v_all = ck[:, : start + s], cv[:, : start + s]
            q = self._rms(self._rope((h @ l["q"]).view(b, s, h_, dh), pos), l["qn"])
            k = self._rms(k_all, l["kn"])
            rep = h_ // kvh
            attn = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.repeat_interleave(rep, 2).transpose(1, 2),
                v_all.repeat_interleave(rep, 2).transpose(1, 2),
                is_causal=s > 1 and start == 0,
            )
            x = x + attn.transpose(1, 2).reshape(b, s, -1) @ l["o"]
            x = x + self._moe(l, self._rms(x, l["post_norm"]))
        return self._rms(x, self.final_norm) @ self.embed.T

    @torch.inference_mode()
    def generate(self, prompts: np.ndarray, max_new: int):
        """Greedy; prompts [B, P] of equal length. -> (new tokens [B, max_new], prefill s,
        decode s)."""
        cfg = self.cfg
        b, p = prompts.shape
        shape = (b, p + max_new, cfg.num_kv_heads, cfg.head_dim)
        cache = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_groups)]
        tokens = torch.from_numpy(prompts.astype(np.int64))
        t0 = time.perf_counter()
        nxt = self.forward(tokens, cache, 0)[:, -1].argmax(-1)
        t1 = time.perf_counter()
        out = [nxt]
        for i in range(max_new - 1):
            nxt = self.forward(nxt[:, None], cache, p + i)[:, -1].argmax(-1)
            out.append(nxt)
        t2 = time.perf_counter()
        return torch.stack(out, 1).numpy(), t1 - t0, t2 - t1


# ============================================================================ benchmark
def bench_throughput(cfg, model, args, seed=0):
    """Yields (batch, harness results, compile seconds, greedy agreement per side) per batch,
    sides run alternately: jax (float32), [jax-bf16], [torch compact], [original]."""
    gens = {"jax": Generator(model, eos_ids=[]), "engine": OfflineGenerator(model, eos_ids=[])}
    if args.bf16:
        gens["jax-bf16"] = Generator(_bf16_copy(cfg, model), eos_ids=[])
    torch_model = TorchHunyuan(cfg, model) if args.compact else None
    original = None
    if args.original_code is not None:
        import tempfile

        from bench.original import OriginalGenerator

        work = Path(tempfile.mkdtemp(prefix="hy-bench-orig-"))
        original = OriginalGenerator.create(args.original_code, model, cfg, work)
        if isinstance(original, str):
            print(f"# original modeling code: skipped ({original})")
            original = None
    else:
        print("# original modeling code: skipped (pass --original-code DIR, needs transformers)")
    rng = np.random.default_rng(seed)
    for b in args.batches:
        prompts = rng.integers(0, cfg.vocab_size, (b, args.prompt_len)).astype(np.int32)
        n = args.new_tokens
        sides, tokens, compile_s = {}, {}, {}
        for name, gen in gens.items():
            compile_s[name] = gen.generate(list(prompts.tolist()), n).compile_seconds

            def run(gen=gen, name=name):
                g = gen.generate(list(prompts.tolist()), n)
                tokens[name] = np.asarray(g.tokens)
                return {"prefill": g.prefill_seconds, "decode": g.decode_seconds}

            sides[name] = run
        for name, baseline in (("torch", torch_model), ("original", original)):
            if baseline is None:
                continue
            baseline.generate(prompts, n)  # warm-up (allocator, threads)

            def run(baseline=baseline, name=name):
                t, p_s, d_s = baseline.generate(prompts, n)
                tokens[name] = np.asarray(t)
                return {"prefill": p_s, "decode": d_s}

            sides[name] = run
        read, nbytes = harness.memory_bandwidth_fn()

        def bandwidth():
            t0 = time.perf_counter()
            read()
            return {"bandwidth": nbytes / (time.perf_counter() - t0)}

        sides["memory"] = bandwidth
        res = harness.alternate(sides, args.repeats)
        agree = {k: float(np.mean(v == tokens["jax"])) for k, v in tokens.items() if k != "jax"}
        yield b, res, compile_s, agree


def decode_step_bytes(cfg, model, batch: int, context: int) -> float:
    """Bytes one decode step of `batch` rows at `context` tokens reads: the parameters, less
    the routed experts no token of the batch can choose, plus the KV cache of every row."""
    total = routed = 0
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        n = v.get_value().nbytes
        total += n
        names = [str(k) for k in path]
        i = names.index("moe") if "moe" in names else -1  # moe.{gate,up,down}_proj: routed
        if i >= 0 and names[i + 1] in ("gate_proj", "up_proj", "down_proj"):
            routed += n
    chosen = min(batch * cfg.moe_top_k, cfg.num_experts) / cfg.num_experts
    cache = batch * context * pool_bytes_per_token(cfg, "float32")
    return total - routed * (1 - chosen) + cache


def _bf16_copy(cfg, model):
    """The same weights in bfloat16 (params and compute), for the separately reported side."""
    import jax.numpy as jnp

    m16 = init_model(cfg, RuntimePolicy.inference("bfloat16"), seed=0)
    nnx.update(
        m16,
        jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), nnx.state(model, nnx.Param)),
    )
    return m16


def bench_accuracy(cfg, model, prompt_len, new_tokens, seed=1):
    """Per-step logits of bf16 and int8 caches vs a float32 forward over the same sequence."""
    rng = np.random.default_rng(seed)
    prompts = [
        rng.integers(0, cfg.vocab_size, n).tolist()
        for n in (prompt_len, prompt_len // 2, prompt_len // 3)
    ]
    full_fwd = jax.jit(lambda t: model(t)[0])
    results, ref_tokens = {}, None
    for dtype in ("float32", "bfloat16", "int8"):
        g = Generator(model, eos_ids=[], cache_dtype=dtype, record_logits=True)
        out = g.generate(prompts, new_tokens)
        seqs = [p + t for p, t in zip(prompts, out.tokens)]
        arr = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
        for i, s in enumerate(seqs):
            arr[i, : len(s)] = s
        full = np.asarray(full_fwd(arr))
        errs, agree, scale = [], [], []
        for i, p in enumerate(prompts):
            want = full[i, len(p) - 1 : len(p) - 1 + new_tokens]
            errs.append(np.abs(out.logits[i] - want).max(-1))
            agree.append(np.mean(out.logits[i].argmax(-1) == want.argmax(-1)))
            scale.append(want.std(-1))
        if ref_tokens is None:
            ref_tokens = out.tokens
        same = np.mean(
            [np.mean(np.asarray(a) == np.asarray(b)) for a, b in zip(out.tokens, ref_tokens)]
        )
        errs = np.concatenate(errs)
        results[dtype] = dict(
            median=float(np.median(errs)),
            p99=float(np.percentile(errs, 99)),
            max=float(errs.max()),
            argmax_agree=float(np.mean(agree)),
            tokens_same_as_f32_cache=float(same),
            logit_std=float(np.mean(np.concatenate(scale))),
        )
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "small.yaml"))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5, help="alternating rounds per batch")
    ap.add_argument("--layers", type=int, default=None, help="override the config's num_layers")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model key (num_experts=32, vocab_size=65536, hidden_size=512, ...): "
        "shapes the engine was not tuned on (repeatable)",
    )
    ap.add_argument(
        "--original-code",
        default=None,
        metavar="DIR",
        help="the original modeling code (a folder holding hymodels/, e.g. "
        "shared/reference/original_code): adds its transformers generate as a side "
        "(needs transformers==4.41.2; skipped with a message otherwise)",
    )
    ap.add_argument(
        "--compact",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the compact eager PyTorch baseline of this file as a side (default on)",
    )
    ap.add_argument("--bf16", action="store_true", help="also JAX with bfloat16 weights")
    ap.add_argument(
        "--compile-only",
        action="store_true",
        help="only compile the decode executables (prefill, first token, decode loop) and "
        "print the seconds, per batch",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for both (1: single-threaded XLA and torch, steadier on a "
        "busy machine); default: each library's own default",
    )
    ap.add_argument(
        "--accuracy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the int8 / bf16 KV cache error (default on)",
    )
    args = ap.parse_args(argv)

    cfg = read_model_config(args.config)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    for item in args.set:  # numbers only: every shape key of ModelConfig is an int or a float
        key, _, value = item.removeprefix("model.").partition("=")
        cfg = cfg.replace(**{key: float(value) if "." in value else int(value)})
    policy = RuntimePolicy.inference("float32")  # float32 weights and compute, as the baseline
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = init_model(cfg, policy, seed=0)  # one device; the Generator follows the model
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model))) / 1e6
    print(
        f"# {Path(args.config).name}{''.join(' --set ' + x for x in args.set)}: {params:.1f}M "
        f"params, float32; prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
        f"greedy; jax {jax.__version__} on {jax.devices()[0].platform}, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at start"
    )
    if args.compile_only:
        for b in args.batches:
            prompts = np.zeros((b, args.prompt_len), np.int32).tolist()
            gen = Generator(model, eos_ids=[])
            out = gen.generate(prompts, 2)
            print(
                f"batch {b}: decode executables {dict(gen.compiles)} compiled in "
                f"{out.compile_seconds:.1f} s ({cfg.num_layers} layers, scan over "
                f"{cfg.num_groups} groups; {harness.machine_line()})"
            )
        return
    for b, res, compile_s, agree in bench_throughput(cfg, model, args):
        print(f"\n# {harness.machine_line()} after the rounds of batch {b}")
        print(f"\n## batch {b}: tokens/s, median (min-max) of {args.repeats} alternating rounds")
        harness.report_peak(res)
        bw = res["memory"]["bandwidth"].median
        step_bytes = decode_step_bytes(cfg, model, b, args.prompt_len + args.new_tokens // 2)
        print(
            f"memory read rate (512 MiB float32 reduction, same rounds): {bw / 1e9:.1f} GB/s; "
            f"a decode step reads {step_bytes / 1e6:.1f} MB (weights it can touch + KV cache)"
        )
        print(
            "| side | prefill tok/s | decode tok/s | decode vs original | vs torch compact | "
            "of memory rate |"
        )
        print("|---|---|---|---|---|---|")
        med = {k: v["decode"].median for k, v in res.items() if "decode" in v}
        pre, dec = b * args.prompt_len, b * (args.new_tokens - 1)
        for name, qs in res.items():
            if name in ("peak", "memory"):
                continue
            vs = [
                f"{med[base] / med[name]:.2f}x" if base in med else "-"
                for base in ("original", "torch")
            ]
            steps_s = dec / b / qs["decode"].median
            print(
                f"| {name} | {qs['prefill'].rate(pre)} | {qs['decode'].rate(dec)} | "
                f"{vs[0]} | {vs[1]} | {steps_s * step_bytes / bw:.0%} |"
            )
        print(
            "# greedy tokens equal to the JAX float32 side: "
            + (", ".join(f"{k} {v:.0%}" for k, v in agree.items()) or "n/a")
            + "; compile (not timed): "
            + ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items())
            + f" ({cfg.num_layers} layers)"
        )
        for w in harness.busy_warnings(res):
            print(w)
    if args.accuracy:
        acc = bench_accuracy(cfg, model, args.prompt_len, args.new_tokens)
        print(
            "\n| KV cache | median abs logit err | p99 | max | argmax = f32 forward | "
            "tokens = f32-cache run |"
        )
        print("|---|---|---|---|---|---|")
        for k, v in acc.items():
            print(
                f"| {k} | {v['median']:.2e} | {v['p99']:.2e} | {v['max']:.2e} | "
                f"{v['argmax_agree']:.1%} | {v['tokens_same_as_f32_cache']:.1%} |"
            )
        print(f"# logits' std per position: {acc['float32']['logit_std']:.3f}")
    print(f"# total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
