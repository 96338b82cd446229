"""Train-step throughput of hunyuan_jax (the jitted, sharded step of train.py) vs a PyTorch
eager implementation of the same math, in the same process, on configs/small.yaml.

    python -m bench.train_step                   # small config, batch 4 x 256, 5 rounds
    python -m bench.train_step --batch 4 --seq 128 --rounds 7 --micro-batches 2
    python -m bench.train_step --set model.num_layers=16   # e.g. the compile time at depth 16

The baseline (`TorchTrain` below) is a compact eager PyTorch version of the original
Hunyuan-Large training math: CLA (K/V from the first layer of each pair), NTK-alpha NeoX RoPE,
QK-norm after RoPE, GQA through `F.scaled_dot_product_attention`, shared SwiGLU expert + top-1
routed experts (float32 softmax router, raw probability weight) as a loop over the experts with
their tokens gathered (dropless, as the original modeling code's eager path), tied embeddings,
cross entropy + 0.01 x Switch auxiliary loss; `torch.nn.utils.clip_grad_norm_` and
`torch.optim.AdamW` (foreach) with the same hyper-parameters. transformers is not installed (and
its in-library HunYuan class is not Hunyuan-Large). Both sides start from the same float32
weights; their losses on the same batch are compared first as a correctness check (the JAX side
with dropless routing for that check; its timed step uses capacity routing as in training).

Timing (bench/harness.py): the JAX step is compiled ahead of time (compile time printed
separately); the PyTorch side runs in a worker process of its own, in PyTorch's default
environment (`TorchProcess`); each side runs one untimed warm-up step, then `--rounds` rounds of
`--steps-per-round` steps of each, back to back, and one float32 2048^3 matmul (the machine's
peak, same run), so that all see the same machine load; a round's time is the median of its
steps after the first, the steady state of a training loop. (The first step after the other
side's turn pays for the pause: the per-step temporaries freed before it are faulted back in,
and on this VM, whose host probably reclaims free guest memory, that was 1.7 s of system time
on a 2.1 s JAX step, measured with a 2 s sleep between train.py steps.) Median and min-max
over the rounds are printed, and a warning when the spread says the machine was busy. Model
FLOP/s = 6 x active parameters x tokens / step time.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from pathlib import Path

# Before jax is imported: jax reads JAX_PLATFORMS when it is imported (a CPU benchmark;
# set JAX_PLATFORMS to run it elsewhere).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx

from bench import harness
from hunyuan_jax.data.corpus import to_global
from hunyuan_jax.host_env import OPT_OUT, TUNABLE, reexec_with_hugepage_malloc
from hunyuan_jax.model.state import init_model
from hunyuan_jax.train.config import load_configs
from hunyuan_jax.train.losses import lm_loss
from hunyuan_jax.train.optim import active_params
from hunyuan_jax.train.step import TrainStep
from sharding.plan import ShardingPlan

ROOT = Path(__file__).resolve().parent.parent


# ============================================================================ PyTorch baseline
class TorchTrain:
    """Hunyuan-Large loss in eager PyTorch (float32), parameters from the JAX tree."""

    def __init__(self, cfg, params_state, tcfg):
        self.cfg = cfg
        # One tensor per layer and per expert, as in the original modules (indexing a stacked
        # tensor would make autograd build a full-size gradient for every slice).
        self.p = {}
        for path, var in nnx.to_flat_state(params_state):
            name = ".".join(map(str, path))
            value = np.array(var.get_value(), np.float32)
            if path[0] != "groups":
                self.p[name] = torch.nn.Parameter(torch.from_numpy(value))
                continue
            for g in range(cfg.num_groups):
                if path[-2:-1] == ("moe",) and path[-1] in ("gate_proj", "up_proj", "down_proj"):
                    for e in range(cfg.num_experts):
                        self.p[f"{name}.{g}.{e}"] = torch.nn.Parameter(
                            torch.from_numpy(value[g, e].copy())
                        )
                else:
                    self.p[f"{name}.{g}"] = torch.nn.Parameter(torch.from_numpy(value[g].copy()))
        d = cfg.head_dim
        base = cfg.rope_theta * cfg.rope_alpha ** (d / (d - 2))
        self.inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        self.opt = torch.optim.AdamW(
            self.p.values(),
            lr=tcfg.lr,
            betas=(tcfg.b1, tcfg.b2),
            eps=tcfg.eps,
            weight_decay=tcfg.weight_decay,
            foreach=True,
        )
        self.clip, self.aux_coef = tcfg.grad_clip, tcfg.aux_loss_coef

    def _norm(self, x, w):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)) * w

    def _rope(self, x, pos):
        freqs = pos[..., None].float() * self.inv_freq
        emb = torch.cat([freqs, freqs], -1)[:, :, None, :]
        x1, x2 = x.chunk(2, -1)
        return x * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()

    def loss(self, tokens, targets):
        cfg, p = self.cfg, self.p
        b, s = tokens.shape
        pos = torch.arange(s)[None].expand(b, s)
        x = p["embed"][tokens]
        aux = 0.0
        for g in range(cfg.num_groups):
            for j in range(cfg.cla_share_factor):
                w = lambda n: p[f"groups.layers.{j}.{n}.{g}"]
                h = self._norm(x, w("input_norm.weight"))
                if j == 0:
                    k = self._rope(torch.einsum("bsd,dnh->bsnh", h, w("attn.k_proj")), pos)
                    v = torch.einsum("bsd,dnh->bsnh", h, w("attn.v_proj"))
                q = self._rope(torch.einsum("bsd,dnh->bsnh", h, w("attn.q_proj")), pos)
                q = self._norm(q, w("attn.query_norm.weight"))
                kn = self._norm(k, w("attn.key_norm.weight"))
                rep = cfg.num_heads // cfg.num_kv_heads
                o = F.scaled_dot_product_attention(
                    q.transpose(1, 2),
                    kn.repeat_interleave(rep, 2).transpose(1, 2),
                    v.repeat_interleave(rep, 2).transpose(1, 2),
                    is_causal=True,
                )
                x = x + torch.einsum("bnsh,nhd->bsd", o, w("attn.o_proj"))
                h = self._norm(x, w("post_attn_norm.weight")).reshape(b * s, -1)
                probs = torch.softmax(h @ w("moe.router"), -1)
                weight, ids = probs.max(-1)
                shared = (
                    F.silu(h @ w("moe.shared.gate_proj")) * (h @ w("moe.shared.up_proj"))
                ) @ w("moe.shared.down_proj")
                routed = torch.zeros_like(h)
                for e in range(cfg.num_experts):
                    idx = (ids == e).nonzero(as_tuple=True)[0]
                    if idx.numel():
                        he = h[idx]
                        we = lambda n: p[f"groups.layers.{j}.moe.{n}.{g}.{e}"]
                        ye = (F.silu(he @ we("gate_proj")) * (he @ we("up_proj"))) @ we("down_proj")
                        routed = routed.index_add(0, idx, ye * weight[idx, None])
                frac = torch.bincount(ids, minlength=cfg.num_experts).float() / ids.numel()
                aux = aux + cfg.num_experts * (probs.mean(0) * frac).sum()
                x = x + (shared + routed).reshape(b, s, -1)
        logits = self._norm(x, p["final_norm.weight"]) @ p["embed"].T
        ce = F.cross_entropy(logits.reshape(b * s, -1), targets.reshape(-1))
        return ce + self.aux_coef * aux / cfg.num_layers, ce

    def step(self, tokens, targets):
        self.opt.zero_grad(set_to_none=True)
        loss, _ = self.loss(tokens, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.p.values(), self.clip)
        self.opt.step()
        return float(loss.detach())


class TorchProcess:
    """The PyTorch side in a process of its own, driven over a pipe, so that each side runs in
    its own default environment: the JAX process re-executes itself with glibc's huge-page
    malloc advice (as train.py does, hunyuan_jax/host_env.py), which slows PyTorch's eager
    steps (2.15 -> 2.45 s, measured); the worker is started without it. It builds the same
    float32 weights (same config, same seed) and gets the batch over the pipe."""

    def __init__(self, config: str, overrides: list[str], inputs, targets):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_torch_worker, args=(config, overrides, child), daemon=True)
        saved = {k: os.environ.get(k) for k in ("GLIBC_TUNABLES", OPT_OUT)}
        tunables = (saved["GLIBC_TUNABLES"] or "").split(":")
        os.environ["GLIBC_TUNABLES"] = ":".join(t for t in tunables if t != TUNABLE)
        os.environ[OPT_OUT] = "1"
        try:
            self.proc.start()  # the child's environment is the parent's at this moment
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k)
                else:
                    os.environ[k] = v
        child.close()
        self._reply()  # the worker's weights are ready
        self._call("data", inputs, targets)

    def _reply(self):
        ok, value = self.conn.recv()
        if not ok:
            raise RuntimeError(f"PyTorch worker: {value}")
        return value

    def _call(self, *msg):
        self.conn.send(msg)
        return self._reply()

    def loss(self) -> float:
        return self._call("loss")

    def step(self) -> float:
        return self._call("step")

    def close(self) -> None:
        self.conn.send(("stop",))
        self.proc.join(timeout=30)


def _torch_worker(config: str, overrides: list[str], conn) -> None:
    """TorchProcess's other end: the same weights as the parent's JAX state, then commands."""
    try:
        mcfg, policy, tcfg = load_configs(config, overrides)
        plan = ShardingPlan.create(tcfg.mesh, tcfg.rules)
        model = init_model(mcfg, policy, plan, tcfg.seed)
        params = TrainStep(mcfg, policy, tcfg, plan).init_state(model).params
        torch.set_num_threads(os.cpu_count() or 1)
        torch_model = TorchTrain(mcfg, params, tcfg)
        del model, params
        conn.send((True, None))
    except Exception as e:  # reported to the parent, which raises it
        conn.send((False, repr(e)))
        return
    while True:
        msg = conn.recv()
        try:
            if msg[0] == "stop":
                return
            if msg[0] == "data":
                tt, tg = (torch.from_numpy(a).long() for a in msg[1:])
                conn.send((True, None))
            elif msg[0] == "loss":
                with torch.no_grad():
                    conn.send((True, float(torch_model.loss(tt, tg)[0])))
            else:
                conn.send((True, torch_model.step(tt, tg)))
        except Exception as e:
            conn.send((False, repr(e)))


# ============================================================================ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "small.yaml"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro-batches", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of each side, alternating")
    ap.add_argument(
        "--steps-per-round",
        type=int,
        default=3,
        help="steps of a side per round, back to back; the first of them is not timed",
    )
    ap.add_argument(
        "--compile-only",
        action="store_true",
        help="only compile the JAX step and print the seconds (e.g. with model.num_layers=16)",
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    overrides = [
        "mesh=data=1,fsdp=1,expert=1,tensor=1",
        "rules=fsdp",
        f"batch_size={args.batch}",
        f"seq_len={args.seq}",
        f"micro_batches={args.micro_batches}",
        "warmup_steps=0",
        *args.overrides,
    ]
    mcfg, policy, tcfg = load_configs(args.config, overrides)
    print(
        f"JAX {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, "
        f"{os.cpu_count()} CPU threads; {args.config}: {tcfg.batch_size} x {tcfg.seq_len} "
        f"tokens/step, {tcfg.micro_batches} micro-batch(es), compute {policy.compute_dtype}"
    )

    # The train.py step: TrainStep picks the layout (plan) and the MoE dispatch (the model's).
    plan = ShardingPlan.create(tcfg.mesh, tcfg.rules)
    step = TrainStep(mcfg, policy, tcfg, plan)
    state = step.init_state(init_model(mcfg, policy, plan, tcfg.seed))
    graphdef = step.graphdef
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    n_active = active_params(mcfg, state.params)
    print(f"model: {n_params / 1e6:.1f}M parameters, {n_active / 1e6:.1f}M active per token")

    rng = np.random.default_rng(0)
    b, s, m = tcfg.batch_size, tcfg.seq_len, tcfg.micro_batches
    tokens = rng.integers(0, mcfg.vocab_size, (b, s + 1)).astype(np.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    local = {
        "inputs": inputs,
        "targets": targets,
        "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
        "segment_ids": np.ones((b, s), np.int32),
        "loss_mask": np.ones((b, s), np.float32),
    }
    local = {k: v.reshape(m, b // m, s) for k, v in local.items()}

    if args.compile_only:
        batch = to_global(local, step.batch_sharding, b)
        t0 = time.perf_counter()
        step.compile(state, batch)
        print(
            f"train step compile: {time.perf_counter() - t0:.1f} s ({mcfg.num_layers} layers, "
            f"scan over {mcfg.num_groups} groups; {harness.machine_line()})"
        )
        return

    # Correctness: the same loss from the same weights (dropless routing on the JAX side: the
    # dispatch of the 'prefill' phase).
    torch_side = TorchProcess(args.config, overrides, inputs, targets)
    t_loss = torch_side.loss()
    flat = {k: v.reshape(b, s) for k, v in local.items()}
    j_loss, _ = jax.jit(
        lambda mdl, bt: lm_loss(mdl, bt, aux_loss_coef=tcfg.aux_loss_coef, phase="prefill")
    )(nnx.merge(graphdef, state.params), flat)
    print(
        f"initial loss: JAX {float(j_loss):.5f}, PyTorch {float(t_loss):.5f} "
        f"(|diff| {abs(float(j_loss) - float(t_loss)):.1e})"
    )

    # JAX: the train.py step (capacity routing, donated state), compiled ahead of time.
    batch = to_global(local, step.batch_sharding, b)
    t0 = time.perf_counter()
    compiled = step.compile(state, batch)
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(state, batch)  # warm-up, both sides
    jax.block_until_ready(metrics)
    torch_side.step()
    last = {}

    def steady(step_fn):
        """One round of a side: `--steps-per-round` steps back to back, as a training loop runs
        them; the first absorbs the pause while the other side ran (see the docstring), the
        median of the others is the round's step time."""

        def run():
            times = []
            for _ in range(args.steps_per_round):
                t0 = time.perf_counter()
                step_fn()
                times.append(time.perf_counter() - t0)
            return {"time": float(np.median(times[1:] or times))}

        return run

    def jax_step():
        nonlocal state
        state, m = compiled(state, batch)
        jax.block_until_ready((state, m))
        last["jax"] = float(m["loss"])

    def torch_step():
        last["torch"] = torch_side.step()

    # Alternate the two (and the matmul peak) so that all see the same machine load.
    res = harness.alternate({"jax": steady(jax_step), "torch": steady(torch_step)}, args.rounds)
    torch_side.close()
    jt, pt = res["jax"]["time"], res["torch"]["time"]

    tokens_per_step = b * s
    flops = 6 * n_active * tokens_per_step
    print(f"\n{harness.machine_line()} at the end")
    peak = harness.report_peak(res)
    print(
        f"\n| implementation | step ms, median (min-max) of {args.rounds} | tokens/s median "
        f"(min-max) | model GFLOP/s | % of matmul peak | loss after "
        f"{args.rounds * args.steps_per_round + 1} steps |"
    )
    print("|---|---|---|---|---|---|")
    for name, st, loss in (
        (f"hunyuan_jax jit train step (compile {compile_s:.1f}s)", jt, last["jax"]),
        ("PyTorch eager", pt, last["torch"]),
    ):
        gf = flops / st.median / 1e9
        print(
            f"| {name} | {st.median * 1e3:.0f} ({st.lo * 1e3:.0f}-{st.hi * 1e3:.0f}) | "
            f"{st.rate(tokens_per_step)} | {gf:.1f} | {100 * gf / peak:.0f}% | {loss:.4f} |"
        )
    ratios = sorted(p / j for p, j in zip(pt.samples, jt.samples))
    print(
        f"\nratio JAX / PyTorch tokens/s: {pt.median / jt.median:.2f}x (per-round "
        f"{ratios[0]:.2f}-{ratios[-1]:.2f}x); model FLOPs per step (6 x active x tokens) "
        f"{flops / 1e9:.1f} GFLOP; train step compile {compile_s:.1f} s "
        f"({mcfg.num_layers} layers)"
    )
    for w in harness.busy_warnings(res):
        print(w)


if __name__ == "__main__":
    reexec_with_hugepage_malloc()  # as train.py / infer.py do (hunyuan_jax/host_env.py)
    main()
