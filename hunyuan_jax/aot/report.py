"""The report of one AOT compile: `measure` compiles a job and collects per-chip memory, FLOPs
and the step-time model into a JSON-able dict; `format_report` renders it as text
(`format_serve`: the report of `--mode serve`, one row per engine program, from
`hunyuan_jax.aot.serve.measure_serve`).

A program that does not fit (the compiler's out-of-memory verdict, or a total above the chip's
usable HBM) still gets a report, with `fits: False`; the CLI turns it into exit status 6.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from hunyuan_jax.aot import collectives
from hunyuan_jax.aot import flops as F
from hunyuan_jax.aot.compiler import (
    GiB,
    Memory,
    compile_program,
    read_dump,
    stacked_cast_copies,
)
from hunyuan_jax.aot.programs import Job, build
from hunyuan_jax.aot.topology import Chip
from hunyuan_jax.errors import DoesNotFit
from hunyuan_jax.train import remat_choice

_DTYPE_BITS = {"float32": 32, "bfloat16": 16, "float16": 16}


def measure(
    job: Job,
    header: dict[str, Any],
    *,
    chip: Chip | None,
    hbm_gib: float | None,
    dump: str | None = None,
    unrolled: bool = False,
    step_time: float | None = None,
    efficiency: float = 1.0,
    hlo_dir: str | None = None,
) -> dict[str, Any]:
    """Build, lower and compile `job`; the report dict (`header` first). `dump`: the XLA dump
    directory the user asked for (largest buffers, hoisted-cast check); `hlo_dir`: a dump
    directory to read the optimized HLO from (the communication model), default `dump`."""
    hlo_dir = hlo_dir or dump
    if job.is_train and job.policy.remat == "auto":
        choice = choose_remat(job, hbm_gib)
        header = {**header, "remat_note": choice.note}
        job = job.replace(policy=choice.policy)
        program, outcome, started = choice.result or (build(job), None, time.time())
    else:
        program, outcome, started = build(job), None, time.time()
    job = job.replace(batch=program.batch, seq=program.seq, cache_len=program.cache_len)
    plan = job.plan
    report: dict[str, Any] = dict(header)
    report.update(
        mode=job.mode,
        **plan_fields(plan),
        batch=program.batch,
        seq=program.seq,
        cache_len=program.cache_len,
        micro=job.micro if job.is_train else None,
        policy=dataclasses.asdict(job.policy),
        param_dtype=job.policy.param_dtype,
        compute_dtype=job.policy.compute_dtype,
        remat=job.policy.remat,
        hbm_gib=hbm_gib,
        step_source=program.source,
    )
    try:
        if isinstance(outcome, DoesNotFit):
            raise outcome
        compiled, t_lower, t_compile = outcome or compile_program(program)
    except DoesNotFit as e:
        report.update(
            fits=False,
            required_gib=e.required_gib,
            available_gib=e.available_gib or hbm_gib,
            error=str(e),
        )
        if dump:  # XLA writes its memory report even for a program that does not fit
            report["largest_buffers"] = read_dump(dump, started)[1]
        return report
    report["lower_s"], report["compile_s"] = round(t_lower, 1), round(t_compile, 1)
    mem = Memory.of(compiled)
    report["memory_gib"] = mem.gib()
    report["fits"] = hbm_gib is None or mem.total / GiB <= hbm_gib
    if not report["fits"]:
        report.update(required_gib=mem.total / GiB, available_gib=hbm_gib)
    if dump:
        hlo, usage = read_dump(dump, started)
        report["largest_buffers"] = usage
        # A hoisted cast only exists when the parameters are stored wider than they are used.
        wide = _DTYPE_BITS[job.policy.param_dtype] > _DTYPE_BITS[job.policy.compute_dtype]
        narrow = {"bfloat16": "bf16", "float16": "f16"}.get(job.policy.compute_dtype)
        hoisted = stacked_cast_copies(hlo, program.params, narrow) if wide and narrow else {}
        report["hoisted_cast_gib"] = sum(size for _, size in hoisted.values()) / GiB
        report["hoisted_cast_shapes"] = [
            f"{n} x [{dims}]" for dims, (n, _) in sorted(hoisted.items())
        ]

    chips = plan.num_devices
    ana = F.analytic_flops(
        job.cfg, job.mode, program.batch, program.seq, program.context, job.policy
    )
    raw = F.compiled_cost(compiled)
    flops = {
        "analytic_model_per_chip": ana["model"] / chips,
        "analytic_hardware_per_chip": ana["hardware"] / chips,
        "analytic_recompute_per_chip": ana["recompute"] / chips,
        "recompute": ana["recompute_how"],
        "ceiling": ana["ceiling"],
        "compiled_raw_per_chip": raw["flops"],
        "compiled_raw_note": "XLA cost_analysis: each loop body (layer scan, decode "
        "while-loop) counted once",
        "active_matmul_params": ana["active_params"],
        "tokens_per_step": ana["tokens"],
    }
    bytes_per_chip = raw["bytes_accessed"]
    if unrolled:
        t0 = time.perf_counter()
        u = F.unrolled_flops(job)
        recompute = flops["analytic_hardware_per_chip"] - flops["analytic_model_per_chip"]
        flops["compiled_unrolled_no_remat_per_chip"] = u["flops"]
        flops["compiled_unrolled_per_group"] = u["flops_per_group"]
        flops["analytic_remat_recompute_per_chip"] = recompute
        flops["compiled_unrolled_per_chip"] = u["flops"] + recompute
        flops["unrolled_compile_s"] = round(time.perf_counter() - t0, 1)
        bytes_per_chip = u["bytes_accessed"]
    report["flops"] = flops
    report["bytes_accessed_per_chip"] = bytes_per_chip
    report["comm"] = comm_summary(optimized_hlo(compiled, hlo_dir, started), chips, chip)
    mfu = F.step_time_model(report, chip, step_time, efficiency)
    limits = F.model_limits(job.cfg, chip, mfu)
    if limits:  # the roofline's times stay in the JSON; no MFU or tokens/s is claimed
        mfu = {k: v for k, v in mfu.items() if k not in ("mfu", "tokens_per_s_per_chip")}
        mfu.update(applies=False, limits=limits)
    report["mfu"] = mfu
    return report


def choose_remat(job: Job, hbm_gib: float | None) -> remat_choice.Choice:
    """`remat: auto` (`hunyuan_jax.train.remat_choice`): the ladder's rungs compiled most saved
    first, the pre-filter skipping those that cannot fit; the result of the rung taken is
    (program, its compile or its DoesNotFit) for `measure` to report. Without a usable HBM
    size (`--topology local` without --hbm-gib): full remat."""
    if hbm_gib is None:
        return remat_choice.fixed_choice(
            job.policy, "no usable HBM size (--hbm-gib) to choose against: full remat"
        )
    full = build(job.replace(policy=remat_choice.LADDER[-1].policy(job.policy)))

    def attempt(policy):
        program, started = build(job.replace(policy=policy)), time.time()
        try:
            compiled = compile_program(program)
        except DoesNotFit as e:
            need = e.required_gib * GiB if e.required_gib else None
            return False, need, (program, e, started)
        used = Memory.of(compiled[0]).total
        return used <= hbm_gib * GiB, used, (program, compiled, started)

    return remat_choice.choose(
        job.cfg,
        job.policy,
        state=full.step.state_bytes(),
        tokens=full.batch // job.micro * full.seq,
        devices=job.plan.num_devices,
        hbm_bytes=hbm_gib * GiB,
        attempt=attempt,
    )


def plan_fields(plan) -> dict[str, Any]:
    """What a report says of the slice and its layout (chips, platform, chip kind, mesh, rules)."""
    return {
        "chips": plan.num_devices,
        "platform": plan.platform,
        "device_kind": plan.devices[0].device_kind,
        "mesh": dict(plan.mesh.shape) if plan.mesh is not None else {},
        "rules": plan.label,
    }


def comm_summary(hlo: str, chips: int, chip: Chip | None) -> dict[str, Any]:
    """`collectives.comm_model` as the report keeps it: its largest rows as text, no row list."""
    comm = collectives.comm_model(hlo, chips, chip)
    comm.pop("rows", None)
    comm["largest"] = [
        f"{sent / GiB:.3f} GiB: {op} {shape} over {n} chips x {int(times)}"
        for sent, op, shape, n, times in comm.get("largest", [])
    ]
    return comm


def optimized_hlo(compiled, hlo_dir: str | None, since: float) -> str:
    """The optimized HLO text of the program: from XLA's dump when there is one (the compile
    wrote it), else `compiled.as_text()`. XLA:TPU cannot print some executables itself (jax
    0.10.2: a RET_CHECK on async-update instructions, seen on the A52B train step), so the CLI
    always dumps; without a dump that failure leaves the text empty (no collectives counted)."""
    if hlo_dir:
        text = read_dump(hlo_dir, since)[0]
        if text:
            return text
    try:
        return compiled.as_text()
    except Exception:
        return ""


def _header_lines(r: dict) -> list[str]:
    mesh = {k: v for k, v in r["mesh"].items() if v > 1}
    p = r["policy"]
    sizes = f"batch {r['batch']} x seq {r['seq']}"
    if r.get("micro") and r["micro"] > 1:
        sizes += f" in {r['micro']} micro-batches"
    if r.get("cache_len"):
        sizes += f", cache {r['cache_len']}"
    return [
        f"{r['mode']} | {r['config']} | {r['topology']} ({r['topology_string']}, "
        f"{r['chips']} chips, {r['device_kind']}) | mesh {r['mesh_arg']} {mesh} | "
        f"rules {r['rules']}",
        f"{sizes} | params {p['param_dtype']}, matmul weights {p.get('weights', 'auto')}, "
        f"compute {p['compute_dtype']}, remat "
        f"{p['remat']}, scan {'on' if p['scan_layers'] else 'off'}, attention {p['attention']}",
        f"step: {r.get('step_source', '?')}",
        *([f"layout: {r['layout_note']}"] if r.get("layout_note") else []),
        *([f"remat: {r['remat_note']}"] if r.get("remat_note") else []),
    ]


def _buffer_lines(r: dict) -> list[str]:
    if not r.get("largest_buffers"):
        return []
    return ["largest buffers (XLA memory-usage report):"] + [
        "  " + row for row in r["largest_buffers"]
    ]


def comm_lines(r: dict) -> list[str]:
    c = r.get("comm")
    if not c:
        return []
    if "error" in c:
        return [f"collectives: not counted: {c['error']}"]
    ops = ", ".join(
        f"{op} {v['bytes'] / GiB:.2f} GiB ({int(v['count'])}x)" for op, v in c["by_op"].items()
    )
    line = f"collectives per chip per step: {c['total_bytes'] / GiB:.2f} GiB sent ({ops})"
    if "ici_time_s" in c:
        line += (
            f"; at {c['ici_bytes_per_s'] * 8 / 1e9:.0f} Gbps ICI {c['ici_time_s'] * 1e3:.1f} ms "
            f"(all links) .. {c['ici_time_one_axis_s'] * 1e3:.1f} ms (2 links)"
        )
    if c.get("unknown_trip_counts"):
        line += f"; loops of unknown trip count counted once: {c['unknown_trip_counts']}"
    return [line] + ["  " + row for row in c["largest"][:4]]


def format_report(r: dict) -> str:
    lines = _header_lines(r)
    hbm = r.get("hbm_gib")
    if "memory_gib" not in r:  # the compiler refused it
        need, have = r.get("required_gib"), r.get("available_gib")
        lines.append(
            f"DOES NOT FIT: the compiler needs "
            f"{f'{need:.1f} GiB' if need else 'more than'} of {have} GiB HBM per chip"
        )
        lines.append(f"  ({r.get('error', '')})")
        return "\n".join(lines + _buffer_lines(r))
    m = r["memory_gib"]
    lines.append(
        f"memory per chip (GiB): arguments {m['arguments']:.2f}, outputs "
        f"{m['outputs']:.2f} (aliased {m['aliased']:.2f}), temporaries "
        f"{m['temporaries']:.2f}, code {m['code']:.2f} -> total {m['total']:.2f}"
        + (f" of {hbm:.2f} HBM ({'fits' if r['fits'] else 'DOES NOT FIT'})" if hbm else "")
    )
    lines.append(f"compile: lower {r['lower_s']} s, compile {r['compile_s']} s")
    lines += _buffer_lines(r)
    if r.get("hoisted_cast_shapes"):
        lines.append(
            f"WARNING: XLA keeps bf16 copies of stacked fp32 weights outside the layer "
            f"scan ({r['hoisted_cast_gib']:.2f} GiB per chip: "
            f"{', '.join(r['hoisted_cast_shapes'])}): the cast was hoisted out of the loop"
        )
    f = r["flops"]
    lines.append(
        f"FLOPs per chip per step: analytic model {f['analytic_model_per_chip']:.3e}, "
        f"analytic hardware {f['analytic_hardware_per_chip']:.3e}, compiled raw "
        f"{f['compiled_raw_per_chip']:.3e} (loop bodies counted once)"
        + (
            f", compiled unrolled {f['compiled_unrolled_no_remat_per_chip']:.3e} "
            f"(+ {f['analytic_remat_recompute_per_chip']:.3e} remat recompute = "
            f"{f['compiled_unrolled_per_chip']:.3e})"
            if "compiled_unrolled_per_chip" in f
            else ""
        )
    )
    if r["mode"] == "train":
        lines.append(
            f"FLOP ceiling {f['ceiling']:.1%} (model / hardware FLOPs, the MFU at 100% of "
            f"peak): remat {r['remat']}"
            + (f" keeping {r['policy']['remat_save']}" if r["remat"] == "save" else "")
            + f"; {f['recompute']}"
        )
    lines += comm_lines(r)
    mfu = r.get("mfu", {})
    if "mfu" in mfu:
        lines.append(
            f"step-time model: {mfu['model']} -> {mfu['step_time_s'] * 1e3:.2f} ms "
            f"({mfu['bound']}-bound): MFU {mfu['mfu']:.1%}, "
            f"{mfu['tokens_per_s_per_chip']:.1f} tokens/s/chip"
        )
    elif mfu.get("limits"):
        lines.append(
            f"step-time model: does not apply to this program ({'; '.join(mfu['limits'])}): "
            f"no MFU or tokens/s estimated (roofline {mfu['step_time_s'] * 1e3:.3f} ms, "
            f"{mfu['bound']}-bound; --step-time S gives the MFU of a measured step)"
        )
    elif "note" in mfu:
        lines.append(f"step-time model: {mfu['note']}")
    return "\n".join(lines)


def _gib(x: float | None) -> str:
    return "OOM" if x is None else f"{x:.2f}"


def format_serve(r: dict) -> str:
    """The text of a serving report (`hunyuan_jax.aot.serve.measure_serve`: --mode serve,
    prefill or decode)."""
    mesh = {k: v for k, v in r["mesh"].items() if v > 1}
    pol = r["policy"]
    lines = [
        f"{r['mode']} | {r['config']} | {r['topology']} ({r['topology_string']}, {r['chips']} chips, "
        f"{r['device_kind']}) | mesh {r['mesh_arg']} {mesh} | rules {r['rules']}",
        f"params {pol['param_dtype']}, matmul weights {pol.get('weights', 'auto')}, compute "
        f"{pol['compute_dtype']}, scan {'on' if pol['scan_layers'] else 'off'}",
        f"step: {r['step_source']}",
    ]
    e, pool = r["engine"], r["pool"]
    lines.append(
        f"engine: max_seqs {e['max_seqs']}, max_len {e['max_len']}, page_size "
        f"{e['page_size']}, token budget {e['token_budget']}, buckets {e['buckets']}, cache "
        f"{e['cache_dtype']}, paged attention {e['attention']}"
    )
    if "probe_program" in pool:
        probes = ", ".join(
            f"{p['pages']}: {_gib(p['total'])}" + (f" ({p['given']})" if "given" in p else "")
            for p in pool["probes"]
        )
        sizing = (
            f"sized by compiling {pool['probe_program']} (pages: total GiB) {probes}; "
            f"{pool['program_bytes_per_page'] / 2**10:.0f} KiB per page for a "
            f"{pool['page_bytes_per_chip'] / 2**10:.0f} KiB page (the program holds "
            f"{pool['copies_of_pool']:.2f}x the pool), margin {pool['margin_gib']} GiB"
        )
        search = pool.get("search")
        if search:
            upper = f"{search['hi']} did not" if search["hi"] else "no size failed"
            sizing += f"; {search['lo']} pages fit, {upper} (stopped: {search['stopped']})"
    else:
        sizing = pool["rule"]
    for rf in pool.get("refits", []):
        sizing += (
            f"; at {rf['pages']} pages {', '.join(rf['misfits'])} needed {rf['need_gib']:.2f} GiB: "
            f"shrunk"
        )
    lines.append(
        f"page pool: {pool['pages']} pages x {e['page_size']} = {pool['tokens']} tokens "
        f"({pool['max_len_sequences']:.1f} sequences of {e['max_len']}), "
        f"{pool['gib_per_chip']:.2f} GiB per chip ({pool['bytes_per_token_per_chip']:.0f} "
        f"B/token); {sizing}" + (f"; capped at {pool['capped']}" if pool.get("capped") else "")
    )
    hbm = r.get("hbm_gib")
    lines.append(
        f"{'program':<12} {'weights':>8} {'pool':>7} {'temps':>7} {'other':>7} {'total':>8}"
        f"  fits  compile  collectives/chip  step-time model"
    )
    for p in r["programs"]:
        if "memory_gib" not in p:
            need = p.get("required_gib")
            lines.append(
                f"{p['program']:<12} DOES NOT FIT: needs "
                f"{f'{need:.2f} GiB' if need else 'more'} of {p.get('available_gib')} GiB"
            )
            continue
        m, c, mfu = p["memory_gib"], p.get("comm") or {}, p.get("mfu") or {}
        sent = f"{c['total_bytes'] / GiB:7.3f} GiB" if "total_bytes" in c else "  (n/a)    "
        model = ""
        if "step_time_s" in mfu:
            model = f"{mfu['step_time_s'] * 1e3:8.2f} ms {mfu['bound']}"
            if "tokens_per_s_per_chip" in mfu:
                model += f", {mfu['tokens_per_s_per_chip'] * r['chips']:.0f} tok/s/slice"
            else:
                model += " (model does not apply)"
        lines.append(
            f"{p['program']:<12} {m['weights']:8.2f} {m['pool']:7.2f} {m['temporaries']:7.2f} "
            f"{m['other']:7.2f} {m['total']:8.2f}  {'yes' if p['fits'] else 'NO ':<4} "
            f"{p['lower_s'] + p['compile_s']:6.1f}s  {sent}      {model}"
        )
    lines.append(f"(GiB per chip; usable HBM {hbm} GiB)" if hbm else "(GiB per chip)")
    for p in [p for p in r["programs"] if p.get("detail") and p.get("scenario")]:
        mfu = p.get("mfu") or {}
        lines.append(f"{p['program']} ({p['scenario']}):")
        f = p["flops"]
        lines.append(
            f"  FLOPs per chip: analytic {f['analytic_model_per_chip']:.3e}, compiled raw "
            f"{f['compiled_raw_per_chip']:.3e} (loop bodies once); HBM "
            f"{p['hbm_bytes_per_chip'] / GiB:.2f} GiB (weights + cache read)"
        )
        if mfu.get("model"):
            lines.append(f"  step-time model: {mfu['model']} -> {mfu['step_time_s'] * 1e3:.2f} "
                         f"ms ({mfu['bound']}-bound)"
                         + (f": MFU {mfu['mfu']:.1%}" if "mfu" in mfu else
                            f"; does not apply: {'; '.join(mfu.get('limits', []))}"))  # fmt: skip
        lines += ["  " + x for x in comm_lines(p)]
        if p.get("pool_collectives"):
            lines.append(f"  WARNING: {len(p['pool_collectives'])} collectives move the page pool")
    if r.get("largest_buffers"):
        lines.append("largest buffers of the program with the most temporaries:")
        lines += ["  " + row for row in r["largest_buffers"]]
    return "\n".join(lines)
