"""FLOPs per step and the step-time model behind the MFU figure.

XLA's `cost_analysis()` counts a loop body once, so for the layer scan it undercounts by about
the number of layer groups. The report therefore gives (a) the analytic count from the config
(`analytic_flops`: the formula is stated there), (b) the raw compiled count, labelled as such,
and with `--unrolled-flops` (c) XLA's exact count from two extra compiles with 1 and 2 layer
groups unrolled (rest + G x per group), plus the analytic remat recompute.
"""

from __future__ import annotations

from hunyuan_jax.aot.compiler import GiB, compile_program
from hunyuan_jax.aot.programs import Job, build
from hunyuan_jax.aot.topology import Chip
from hunyuan_jax.model.config import ModelConfig
from hunyuan_jax.model.policy import RuntimePolicy


def active_matmul_params(cfg: ModelConfig) -> dict[str, float]:
    """Weights each token multiplies by (per model): attention, experts, router, LM head."""
    d, h, kvh, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    f, L = cfg.intermediate_size, cfg.num_layers
    attn = L * 2 * d * h * hd + (L // cfg.cla_share_factor) * 2 * d * kvh * hd
    mlp = L * 3 * d * f * (cfg.num_shared_experts + cfg.moe_top_k)
    router = L * d * cfg.num_experts
    head = d * cfg.vocab_size
    return {
        "attention": attn,
        "mlp": mlp,
        "router": router,
        "lm_head": head,
        "total": attn + mlp + router + head,
    }


def layer_flops(cfg: ModelConfig, tokens: int, context: int) -> dict[str, float]:
    """Forward FLOPs of the decoder layers (whole slice), per named checkpoint point
    (`policy.REMAT_NAMES`: the matmul or attention that produces it), plus the router
    (unnamed). `last_down`: the down projections of each CLA group's last layer (their output
    only feeds the next group's input, which the layer scan saves: never recomputed)."""
    d, h, kvh, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    f, L, groups = cfg.intermediate_size, cfg.num_layers, cfg.num_groups
    shared, routed = cfg.num_shared_experts, cfg.moe_top_k
    per = {
        "q_proj": L * 2 * d * h * hd,
        "kv_proj": groups * 2 * 2 * d * kvh * hd,
        "attn_out": L * 4 * h * hd * context,
        "o_proj": L * 2 * h * hd * d,
        "mlp_gate": L * 2 * d * f * shared,
        "mlp_up": L * 2 * d * f * shared,
        "mlp_down": L * 2 * f * d * shared,
        "moe_gate": L * 2 * d * f * routed,
        "moe_up": L * 2 * d * f * routed,
        "moe_down": L * 2 * f * d * routed,
        "router": L * 2 * d * cfg.num_experts,
    }
    out = {k: float(v * tokens) for k, v in per.items()}
    out["last_down"] = float(groups * 2 * f * d * (shared + routed) * tokens)
    return out


def remat_recompute(
    cfg: ModelConfig, policy: RuntimePolicy, tokens: int, context: int
) -> tuple[float, str]:
    """(FLOPs the backward pass recomputes, how). Every named point's output is needed by the
    backward (the matmuls' inputs, the residual stream between the layers of a group) except
    the group's last down projections; the layer scan's checkpoint recomputes, once, each
    needed point it does not save (and the router, which is unnamed). The chunked loss
    (`loss_chunk` > 0) recomputes its chunk's LM head in the backward (`jax.checkpoint`)."""
    if policy.remat == "none":
        layers, how = 0.0, "no remat"
    elif policy.remat in ("full", "save", "save_attn_out"):
        saved = {
            "full": (),
            "save": policy.saved_names(),
            "save_attn_out": ("attn_out",),
        }[policy.remat]
        per = layer_flops(cfg, tokens, context)
        last = per.pop("last_down")
        layers = sum(v for k, v in per.items() if k not in saved)
        for name in ("mlp_down", "moe_down"):  # the part of `last` of the unsaved downs
            if name not in saved:
                layers -= last * per[name] / (per["mlp_down"] + per["moe_down"])
        how = f"recompute of the layers' {', '.join(k for k in per if k not in saved)}"
    else:  # save_dots: every matmul without batch dims saved: attention core recomputed
        layers = layer_flops(cfg, tokens, context)["attn_out"]
        how = "recompute of attention's scores (save_dots)"
    head = 2.0 * cfg.hidden_size * cfg.vocab_size * tokens if policy.loss_chunk else 0.0
    if head:
        how += " + the chunked loss's LM head"
    return layers + head, how


def analytic_flops(
    cfg: ModelConfig,
    mode: str,
    batch: int,
    seq: int,
    context: int,
    policy: RuntimePolicy | None = None,
) -> dict[str, float]:
    """Whole-slice FLOPs per step. Matmuls: 2 x weights x tokens forward; backward twice that;
    the remat recompute (`remat_recompute`, from `policy`) on top. Attention: QK^T and PV,
    4 x heads x head_dim x context per token and layer, full (masked, not causally halved:
    the XLA path computes the whole score matrix). `model` excludes the recompute (the MFU
    convention); `ceiling` = model / hardware, the MFU at 100% of peak."""
    policy = policy or RuntimePolicy(remat="none")
    n = active_matmul_params(cfg)["total"]
    attn_per_token = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context
    tokens = batch * seq
    fwd = tokens * (2 * n + attn_per_token)
    recompute, how = 0.0, "no backward"
    if mode == "train":
        model = 3 * fwd
        recompute, how = remat_recompute(cfg, policy, tokens, context)
        hardware = model + recompute
    else:
        model = hardware = fwd
    return {
        "model": float(model),
        "hardware": float(hardware),
        "recompute": float(recompute),
        "recompute_how": how,
        "ceiling": float(model / hardware),
        "tokens": tokens,
        "active_params": float(n),
    }


def compiled_cost(compiled) -> dict[str, float]:
    """XLA's per-chip FLOPs and bytes accessed (each loop body counted once)."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    ca = ca or {}
    return {
        "flops": float(ca.get("flops", 0.0)),
        "bytes_accessed": float(ca.get("bytes accessed", 0.0)),
    }


def unrolled_flops(job: Job) -> dict[str, float]:
    """Per-chip FLOPs and bytes of the full model from two unrolled compiles (1 and 2 layer
    groups): rest + G x per-group. The unrolled compiles use remat 'none': unrolled, XLA
    merges a remat'd layer's recomputation with its first forward (the model's checkpoint
    uses prevent_cse=False), so their count would be neither with nor without remat. The
    caller adds the recomputation analytically."""
    cfg, csf = job.cfg, job.cfg.cla_share_factor
    policy = job.policy.replace(scan_layers=False, remat="none")
    costs = []
    for groups in (1, 2):
        small = job.replace(cfg=cfg.replace(num_layers=groups * csf), policy=policy)
        compiled, _, _ = compile_program(build(small))
        costs.append(compiled_cost(compiled))
    out = {}
    for k in ("flops", "bytes_accessed"):
        per_group = costs[1][k] - costs[0][k]
        out[k] = costs[0][k] + (cfg.num_groups - 1) * per_group
        out[k + "_per_group"] = per_group
    return out


def step_time_model(
    report: dict,
    chip: Chip | None,
    step_time: float | None,
    efficiency: float,
    hbm_bytes: float | None = None,
):
    """MFU = analytic model FLOPs per chip / (step time x peak FLOP/s).

    The step time is a stated model, not a measurement (`--step-time` replaces it):
        t = max(hardware FLOPs per chip / (efficiency x peak), HBM bytes per chip / bandwidth)
    hardware FLOPs: the unrolled compiled count with --unrolled-flops, else the analytic count
    (remat recompute included). HBM bytes: XLA's bytes-accessed (unrolled) when known; for
    prefill/decode at least the argument bytes (every weight and cache slot is read once per
    step), or `hbm_bytes` when the caller models the traffic itself (the serving engine's steps:
    `hunyuan_jax.aot.serve`); for training without --unrolled-flops the HBM term is left out
    (compute-bound).
    Communication (`hunyuan_jax.aot.collectives`): the bytes each chip sends in the step's
    collectives at the chip's ICI bandwidth, all links busy (`comm_time_s`; the step is
    "communication-bound" when it exceeds the other two). The three are assumed to overlap
    (t = their max); `serial_time_s` is their sum, the no-overlap end. With efficiency 1 the
    MFU is an upper bound: model / hardware FLOPs for a compute-bound step (the FLOP ceiling,
    about 0.75 with full remat)."""
    if chip is None:
        return {"note": "no TPU chip: no peak FLOP/s to compare with"}
    f = report["flops"]
    hw = f.get("compiled_unrolled_per_chip") or f["analytic_hardware_per_chip"]
    t_compute = hw / (chip.peak_flops * efficiency)
    bytes_ = None
    if "compiled_unrolled_per_chip" in f:
        bytes_ = report.get("bytes_accessed_per_chip")
    if hbm_bytes is not None:
        bytes_ = float(hbm_bytes)
    elif report["mode"] != "train":
        args = report["memory_gib"]["arguments"] * GiB
        bytes_ = max(bytes_ or 0.0, args)
    t_memory = bytes_ / chip.hbm_bytes_per_s if bytes_ else None
    t_comm = (report.get("comm") or {}).get("ici_time_s")
    if step_time:
        t, how = step_time, "given --step-time"
    else:
        t = max(t_compute, t_memory or 0.0, t_comm or 0.0)
        how = (
            f"max(hardware FLOPs at {efficiency:.0%} of {chip.peak_flops / 1e12:.0f} "
            f"TFLOP/s = {t_compute * 1e3:.2f} ms"
            + (
                f", {bytes_ / GiB:.2f} GiB of HBM traffic at "
                f"{chip.hbm_bytes_per_s / 1e12:.2f} TB/s = {t_memory * 1e3:.2f} ms"
                if t_memory
                else ""
            )
            + (f", collectives at ICI bandwidth = {t_comm * 1e3:.2f} ms" if t_comm else "")
            + ")"
        )
    times = {"compute": t_compute, "memory": t_memory or 0.0, "communication": t_comm or 0.0}
    return {
        "step_time_s": t,
        "model": how,
        "mfu": f["analytic_model_per_chip"] / (t * chip.peak_flops),
        "tokens_per_s_per_chip": f["tokens_per_step"] / report["chips"] / t,
        "compute_time_s": t_compute,
        "hbm_time_s": t_memory,
        "comm_time_s": t_comm,
        "serial_time_s": sum(times.values()),
        "bound": "given" if step_time else max(times, key=times.get),
    }


# Below this modeled step time the fixed costs the model leaves out (the program's launch, its
# hundreds of ops' issue and synchronisation, microseconds each) are of the same order as it.
MIN_MODELED_STEP_S = 1e-3


def model_limits(cfg: ModelConfig, chip: Chip | None, mfu: dict) -> list[str]:
    """Why the step-time model (`step_time_model`, no --step-time) says nothing about this
    program; empty when it applies. It assumes matmuls that fill the chip's MXU tiles and a
    step long enough that launch and per-op overheads vanish beside compute, HBM traffic and
    communication."""
    if chip is None or "step_time_s" not in mfu or mfu.get("bound") == "given":
        return []
    out = []
    small = {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size")}
    small = {k: v for k, v in small.items() if v < chip.mxu}
    if small:
        dims = ", ".join(f"{k} {v}" for k, v in small.items())
        out.append(
            f"{dims} below the {chip.name} MXU's {chip.mxu}x{chip.mxu} tiles (most of each "
            f"matmul pass is padding)"
        )
    if mfu["step_time_s"] < MIN_MODELED_STEP_S:
        out.append(
            f"a modeled step of {mfu['step_time_s'] * 1e3:.3f} ms, below "
            f"{MIN_MODELED_STEP_S * 1e3:.0f} ms: launch and per-op overheads, which the model "
            f"leaves out, are as large"
        )
    return out
