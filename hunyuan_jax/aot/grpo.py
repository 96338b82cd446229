"""`--mode grpo`: the GRPO train step and the rollout engine's programs on the same slice,
sharing the weights, and the memory per chip of both at once.

A GRPO run (docs/rl.md) holds one parameter tree: the train step's state (with LoRA: the
adapters and their AdamW moments, plus the frozen base the step takes as an argument) and the
engine's page pool; the engine's programs run on the very same arrays (`EngineCore.set_params`).
So the engine here is built on the train step's own abstract tree (`nnx.merge(step.graphdef,
params, frozen)`: the train plan's shardings), not on a serving layout, and every program of it
(`EngineCore.programs`) is compiled beside the train step (`programs.train_program`, objective
grpo). The two never run at the same time, so per chip:

    train peak   = train step total (its arguments: weights, trainable state, batch; outputs,
                   temporaries) + the engine's pool and `seen` (they stay allocated)
    rollout peak = engine program total (weights + pool + its temporaries) + the optimizer
                   state and trainable state the engine does not take (AdamW moments)
    at once      = max(train peak, largest rollout peak) + the code of every executable

The pool is sized by the flags (`--max-seqs`, `--max-len` (default: the train sequence + 1, a
rollout row), `--page-size`, `--token-budget`, `--num-pages`; default one max_len sequence
per row), not fitted to the chip as `--mode serve` does: a GRPO run chooses its rollout batch.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from hunyuan_jax.aot.compiler import GiB, Memory, compile_program
from hunyuan_jax.aot.programs import Job, Program, train_program
from hunyuan_jax.aot.serve import ServeSizes, chip_bytes
from hunyuan_jax.engine.core import EngineCore
from hunyuan_jax.errors import DoesNotFit, UsageError
from hunyuan_jax.train.step import TrainStep


def _engine(job: Job, step: TrainStep, sizes: ServeSizes, max_len: int) -> EngineCore:
    rest = () if step.abstract_frozen is None else (step.abstract_frozen,)
    model = nnx.merge(step.graphdef, step.abstract_state.params, *rest)
    try:
        return EngineCore(
            model, max_seqs=sizes.max_seqs, max_len=max_len, page_size=sizes.page_size,
            num_pages=sizes.num_pages, token_budget=sizes.token_budget,
            cache_dtype=job.cache_dtype, compile=False,
        )  # fmt: skip
    except ValueError as e:
        raise UsageError(f"engine: {e}") from None


def _compile(program: Program, what: str):
    """compile_program, with a refusal naming the program (the train step or which engine
    program) and, for the engine, what to lower: every chip holds the whole pool on the train
    layout (docs/rl.md)."""
    try:
        return compile_program(program)
    except DoesNotFit as e:
        hint = "" if "engine" not in what else "; lower --max-seqs or --max-len"
        raise DoesNotFit(
            f"{what} does not fit: {e}{hint}", e.required_gib, e.available_gib
        ) from None


def measure_grpo(job: Job, sizes: ServeSizes, header: dict, hbm_gib: float | None) -> dict:
    """The report of `--mode grpo` (see the module docstring)."""
    if job.tcfg.objective != "grpo":
        job = job.replace(tcfg=job.tcfg.replace(objective="grpo"))
    program = train_program(job)
    compiled, t_lower, t_compile = _compile(program, "the GRPO train step")
    train = Memory.of(compiled)
    tcfg = job.tcfg.replace(seq_len=program.seq, batch_size=program.batch, micro_batches=job.micro)
    step = TrainStep(job.cfg, job.policy, tcfg, job.plan)
    core = _engine(job, step, sizes, sizes.max_len or program.seq + 1)
    plan = job.plan
    params, pool, seen = core.abstract_args(core.buckets[0])[:3]
    pool_b, seen_b = chip_bytes(pool), chip_bytes(seen)
    opt_b = chip_bytes(plan.abstract(step.abstract_state.opt_state, step.shardings.opt_state))
    g = lambda b: round(b / GiB, 3)  # noqa: E731
    engine: list[dict[str, Any]] = []
    code = train.code
    for name, tokens in core.programs:
        p = Program(lambda n=name, t=tokens: core.lower(n, t), None, "", tokens, 1, None, tokens)
        c, lo, co = _compile(
            p, f"the rollout engine's {name}[{tokens}] (pool {g(pool_b)} GiB per chip)"
        )
        m = Memory.of(c)
        code += m.code
        engine.append({"program": f"{name}[{tokens}]", "memory_gib": m.gib(), "peak": m.total - m.code + opt_b, "compile_s": round(lo + co, 1)})  # fmt: skip
    train_peak = train.total - train.code + pool_b + seen_b
    rollout = max(engine, key=lambda e: e["peak"])
    at_once = max(train_peak, rollout["peak"]) + code
    fits = hbm_gib is None or at_once <= hbm_gib * GiB
    for e in engine:
        e["peak_b"] = e.pop("peak")
        e["peak_gib"] = g(e["peak_b"])
    return {
        **header,
        "mode": "grpo",
        "platform": plan.platform,
        "chips": plan.num_devices,
        "mesh": dict(plan.mesh.shape) if plan.mesh is not None else {},
        "rules": plan.label,
        "step_source": program.source,
        "batch": program.batch,
        "seq": program.seq,
        "train_memory_gib": train.gib(),
        "train_compile_s": round(t_lower + t_compile, 1),
        "weights_gib": g(chip_bytes(params)),
        "optimizer_state_gib": g(opt_b),
        "pool_gib": g(pool_b),
        "pool": {
            "pages": core.num_pages,
            "page_size": core.page_size,
            "tokens": core.pool_tokens,
            "max_seqs": core.max_seqs,
            "max_len": core.max_len,
            "dtype": core.cache_dtype,
        },  # fmt: skip
        "engine_programs": engine,
        "train_peak_gib": g(train_peak),
        "rollout_peak_gib": rollout["peak_gib"],
        "rollout_peak_program": rollout["program"],
        "code_gib": g(code),
        "at_once_gib": g(at_once),
        "required_gib": g(at_once),
        "available_gib": hbm_gib,
        "hbm_gib": hbm_gib,
        "fits": fits,
        "bytes": {
            "weights": chip_bytes(params),
            "optimizer_state": opt_b,
            "pool": pool_b,
            "train_peak": train_peak,
            "rollout_peak": max(e["peak_b"] for e in engine),
            "at_once": at_once,
        },  # fmt: skip
    }


def format_grpo(r: dict) -> str:
    """The text report of `--mode grpo`."""
    lines = [
        f"grpo | {r['config']} | {r['topology_string']} ({r['chips']} chips, {r['platform']}) | "
        f"mesh {r['mesh']} | rules {r['rules']}",
        f"train step: batch {r['batch']} x seq {r['seq']}; {r['step_source']}",
        f"  memory per chip (GiB): {r['train_memory_gib']}",
        f"rollout engine on the same arrays: pool {r['pool']['pages']} pages x "
        f"{r['pool']['page_size']} tokens ({r['pool']['max_seqs']} sequences of "
        f"{r['pool']['max_len']}, {r['pool']['dtype']}) = {r['pool_gib']} GiB per chip",
    ]
    for e in r["engine_programs"]:
        lines.append(f"  {e['program']}: {e['memory_gib']} (peak with the train state "
                     f"{e['peak_gib']} GiB)")  # fmt: skip
    lines.append(
        f"memory per chip, both at once: weights {r['weights_gib']} + optimizer state "
        f"{r['optimizer_state_gib']} + pool {r['pool_gib']} ...; train peak "
        f"{r['train_peak_gib']}, rollout peak {r['rollout_peak_gib']} "
        f"({r['rollout_peak_program']}), code {r['code_gib']} -> {r['at_once_gib']} GiB"
        + (f" of {r['hbm_gib']} GiB HBM" if r["hbm_gib"] else "")
        + ("" if r["fits"] else ": DOES NOT FIT")
    )
    return "\n".join(lines)
