"""`--mode serve`: exactly the serving engine's programs (`EngineCore.programs`: `step[T]` for
each token bucket T and `score[budget]`), lowered by the engine itself (`EngineCore(...,
compile=False).lower`) on the abstract model for a slice, with the page pool sized to the chip.

Pool sizing (unless `--num-pages` fixes it): the pool gets what is left of the chip's usable
HBM after the weights, the largest program's temporaries and a margin. The largest program is
`score[budget]` (step[budget] plus the LM head over every token of the stream, so its
temporaries bound every other program's). Its memory grows about linearly with the pool's
pages, total(P) = a + b P, where b should be one page's bytes (the pool is updated in place:
`paged.pool_head_dim` stores it lane-padded on TPU: XLA:TPU copied a pool whose head dim is
not a multiple of 128 lanes at every K/V write, 5 pool-sized temporaries per step before), but
b is measured, not assumed (a layout change of the pool would show as b > 1 page). So:
  1. probe 1: score[budget] compiled with a pool of one max_len sequence (P1 = pages_per_seq +
     1); probe 2: with P2 = P1 + max(P1, (the naive size - P1) / 32), where the naive size
     assumes b = one page (so probe 2 fits even at b = 32 pages);
  2. b = (total(P2) - total(P1)) / (P2 - P1) (at least one page); the estimate P = P1 +
     (usable HBM - margin - total(P1)) / b;
  3. score[budget] compiled at P and on (`aot.pool_size.largest_pool`: along the line, then,
     once a size does not fit, a bisection of the bracket to 1 %): XLA schedules with fewer
     temporaries when the HBM gets tight (measured on the A52B: 1.7 GiB fewer at the estimate
     than at the small probes), so the linear estimate alone leaves HBM unused;
  4. num_pages = the most pages probed whose total <= usable HBM - margin, at most
     2^31 / page_size (the engine's slots are int32);
  5. every program is compiled with that pool and must fit (its total <= usable HBM). XLA
     lays out and schedules each program on its own, so another program may need more than
     the probed one at the same size: then the pool shrinks by that program's excess over
     usable HBM - margin (at b per page) and every program is compiled again (`FIT_ROUNDS`;
     the report's `refits`).
The margin (`--pool-margin-gib`, default 0.5) is for what one compile does not show: the code
of the other executables (all stay loaded) and allocator fragmentation.

Step-time model per step program (`flops.step_time_model`, with this traffic model):
- decode (the buckets up to the one holding max_seqs tokens): min(T, max_seqs) sequences, one
  token each, every one at max_len (the longest: most keys). Keys per token: max_len; cache
  read: each sequence's pages once.
- prefill (the larger buckets T): one chunk of T prompt tokens of a max_len prompt, keys per
  token max_len / 2 (the mean over the prompt's chunks). Cache read: the sequence's pages once
  per block of 32 queries: the Pallas kernel's query block (from a CPU host its untuned
  default, and most of its tuned table's v6e entries) and the xla path's `block_q` (a block
  of one row's tokens reads that row's pages once: `paged.attend`).
FLOPs: matmuls 2 x weights per token (the LM head only for the rows sampled, or every token in
`score`) plus attention 4 x layers x heads x head_dim x keys; HBM: weights once + the cache read.
`score` gets its memory and collectives only (it runs for echo / prompt-logprob requests).
The text report details the decode step of max_seqs sequences and the largest step (prefill).
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import shutil
import sys
import time
from typing import Any

import jax
from jax import dtypes

from hunyuan_jax.aot import flops as F
from hunyuan_jax.aot.compiler import GiB, Memory, compile_program, read_dump
from hunyuan_jax.aot.pool_size import largest_pool, pool_rule, progress
from hunyuan_jax.aot.programs import DEFAULT_CACHE_LEN, DEFAULT_SEQ, Job, Program, describe_dispatch
from hunyuan_jax.aot.report import comm_summary, optimized_hlo, plan_fields
from hunyuan_jax.aot.topology import Chip
from hunyuan_jax.engine.core import EngineCore
from hunyuan_jax.errors import DoesNotFit, UsageError
from hunyuan_jax.model import dispatch
from hunyuan_jax.model.kernels import paged
from hunyuan_jax.model.state import abstract_model

PAGE_SIZE = 16
MAX_SEQS = 8
TOKEN_BUDGET = 4096
MARGIN_GIB = 0.5
QUERY_BLOCK = 32  # queries per block: the Pallas kernel's and the xla path's (the module doc)
_MAX_SLOTS = 2**31  # the engine's slots (page * page_size + offset) are int32
FIT_ROUNDS = 3  # compiles of every program: one, and up to two more with a smaller pool
DUMP_PREFIX = "serve-"  # --dump DIR: each program's XLA dump in DIR/serve-<program>_<tokens>


@dataclasses.dataclass(frozen=True)
class ServeSizes:
    """The engine's sizes (EngineCore's arguments) and the pool rule's margin."""

    max_seqs: int = MAX_SEQS
    max_len: int | None = None  # default: min(DEFAULT_CACHE_LEN, max_position_embeddings)
    page_size: int = PAGE_SIZE
    token_budget: int = TOKEN_BUDGET
    num_pages: int | None = None  # None: sized to the chip
    margin_gib: float = MARGIN_GIB
    pool_bracket: tuple[int, int] | None = None  # (fits, did not fit): the search's seed


def chip_bytes(tree) -> int:
    """Bytes per chip of abstract arrays carrying shardings (the largest shard); int4 at half a
    byte a value, as the chip holds it (numpy's itemsize says 1)."""
    bits = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding else leaf.shape
        bits += math.prod(shape) * dtypes.itemsize_bits(leaf.dtype)
    return bits // 8


class _Engine:
    """One EngineCore (compile=False) on the abstract model and what it holds per chip."""

    def __init__(self, job: Job, model, sizes: ServeSizes, max_len: int, num_pages: int):
        try:
            self.core = EngineCore(
                model,
                max_seqs=sizes.max_seqs,
                max_len=max_len,
                page_size=sizes.page_size,
                num_pages=num_pages,
                token_budget=sizes.token_budget,
                cache_dtype=job.cache_dtype,
                compile=False,
            )
        except ValueError as e:  # sizes or cache dtype the engine refuses
            raise UsageError(f"engine: {e}") from None
        params, pool = self.core.abstract_args(self.core.buckets[0])[:2]
        self.weight_bytes = chip_bytes(params)
        self.pool_bytes = chip_bytes(pool)
        self.pool = pool

    @property
    def page_bytes(self) -> float:
        """Bytes per chip of one page (the pool's bytes per chip over its pages)."""
        return self.pool_bytes / self.core.num_pages

    def compile(self, name: str, tokens: int, hlo_dir: str | None, dump_name: str = ""):
        """(compiled or DoesNotFit, lower s, compile s, optimized HLO text); XLA's dump of it
        goes to hlo_dir/serve-<dump_name or name_tokens>."""
        dump_name = DUMP_PREFIX + (dump_name or f"{name}_{tokens}")
        started = time.time()
        program = Program(lambda: self.core.lower(name, tokens), None, "", tokens, 1, None, tokens)
        try:
            compiled, t_lower, t_compile = compile_program(program)
        except DoesNotFit as e:
            _stash_dump(hlo_dir, started, dump_name)
            return e, 0.0, 0.0, ""
        hlo = optimized_hlo(compiled, hlo_dir, started)
        _stash_dump(hlo_dir, started, dump_name)
        return compiled, t_lower, t_compile, hlo


def _stash_dump(hlo_dir: str | None, since: float, name: str) -> None:
    """Move what XLA dumped for one program into hlo_dir/name, so that the next program's
    `read_dump` sees only its own modules (and --dump keeps one folder per program)."""
    if not hlo_dir:
        return
    target = os.path.join(hlo_dir, name)
    os.makedirs(target, exist_ok=True)
    for path in glob.glob(os.path.join(hlo_dir, "*")):
        base = os.path.basename(path)
        if not base.startswith(DUMP_PREFIX) and os.path.getmtime(path) >= since - 1:
            shutil.move(path, os.path.join(target, base))


def _clear_dumps(hlo_dir: str | None, programs: list[dict]) -> None:
    """Drop the dumps of a round of programs that is compiled again."""
    for p in programs if hlo_dir else ():
        shutil.rmtree(os.path.join(hlo_dir, p["dump"]), ignore_errors=True)


def _largest_buffers(hlo_dir: str | None, name: str) -> list[str]:
    if not hlo_dir or not os.path.isdir(os.path.join(hlo_dir, name)):
        return []
    return read_dump(os.path.join(hlo_dir, name), 0.0)[1]


def size_pool(
    job: Job, model, sizes: ServeSizes, max_len: int, hbm_gib: float | None, hlo_dir: str | None
) -> dict[str, Any]:
    """The pool rule of the module doc: {'num_pages', and how it was found}."""
    pages_per_seq = math.ceil(max_len / sizes.page_size)
    cap = _MAX_SLOTS // sizes.page_size
    if sizes.num_pages is not None:
        return {"num_pages": sizes.num_pages, "rule": "given (--num-pages)"}
    if hbm_gib is None:
        raise UsageError("--mode serve sizes the pool to the chip's HBM: give --num-pages "
                         "(or --hbm-gib) on a platform without a known chip")  # fmt: skip
    target = (hbm_gib - sizes.margin_gib) * GiB
    if sizes.pool_bracket:
        return _seeded(job, model, sizes, max_len, hbm_gib, hlo_dir, target, cap)
    first = _probe(job, model, sizes, max_len, pages_per_seq + 1, hbm_gib, hlo_dir)
    page = first["pool_bytes"] / first["pages"]  # per chip
    naive = first["pages"] + int((target - first["total"]) // page)
    second_pages = first["pages"] + max(first["pages"], (naive - first["pages"]) // 32)
    second = _probe(job, model, sizes, max_len, second_pages, hbm_gib, hlo_dir)
    slope = (second["total"] - first["total"]) / (second["pages"] - first["pages"])
    slope = max(slope, page)  # a page costs at least itself
    measure = lambda pages: _probe(job, model, sizes, max_len, pages, hbm_gib, hlo_dir, True)
    probes, search = largest_pool(measure, [first, second], target, slope, page, cap)
    how = "two probes for the cost of a page, then at the estimate and bisecting"
    return pool_rule(first, probes, search, sizes.margin_gib, hbm_gib, page, slope, cap, how)


def _seeded(job, model, sizes, max_len, hbm_gib, hlo_dir, target, cap) -> dict[str, Any]:
    """`--pool-bracket LO,HI`: LO compiled (it must fit), HI taken as refused, then bisected
    (`pool_size` doc). The program's bytes per page are not measured: one page's own bytes
    (the least a page adds; a refit then shrinks the pool by the most pages)."""
    lo, hi = sizes.pool_bracket
    if hi > cap:
        raise UsageError(f"--pool-bracket: {hi} pages exceed the engine's {cap} (int32 slots)")
    first = _probe(job, model, sizes, max_len, lo, hbm_gib, hlo_dir, True)
    print(progress(first, target, "--pool-bracket's lower end"), file=sys.stderr)
    if first["total"] is None or first["total"] > target:
        total = "refused" if first["total"] is None else f"{first['total'] / GiB:.2f} GiB"
        raise UsageError(f"--pool-bracket: its lower end, {lo} pages, does not fit ({total}; "
                         f"target {target / GiB:.2f} GiB): give a smaller one")  # fmt: skip
    given = {"program": first["program"], "pages": hi, "total": None, "given": "not compiled"}
    page = first["pool_bytes"] / first["pages"]
    measure = lambda pages: _probe(job, model, sizes, max_len, pages, hbm_gib, hlo_dir, True)
    probes, search = largest_pool(measure, [first, given], target, page, page, cap, refine=0)
    how = f"bisecting --pool-bracket {lo},{hi}: {lo} compiled, {hi} taken as refused"
    return pool_rule(first, probes, search, sizes.margin_gib, hbm_gib, page, page, cap, how)


def _probe(
    job, model, sizes, max_len, num_pages, hbm_gib, hlo_dir, oom_ok: bool = False
) -> dict[str, Any]:
    """Compile the engine's largest program, score[budget], with a pool of num_pages (total
    None for the compiler's out-of-memory verdict when `oom_ok`)."""
    eng = _Engine(job, model, sizes, max_len, num_pages)
    name, tokens = eng.core.programs[-1]
    compiled, t_lower, t_compile, _ = eng.compile(name, tokens, hlo_dir, f"probe-{num_pages}")
    if isinstance(compiled, DoesNotFit) and oom_ok:
        return {"program": f"{name}[{tokens}]", "pages": num_pages, "total": None}
    if isinstance(compiled, DoesNotFit):
        raise DoesNotFit(
            f"the engine's largest program {name}[{tokens}] does not fit with a pool of "
            f"{num_pages} pages: {compiled}",
            compiled.required_gib,
            compiled.available_gib or hbm_gib,
        )
    mem = Memory.of(compiled)
    return {
        "program": f"{name}[{tokens}]",
        "pages": num_pages,
        "total": mem.total,
        "pool_bytes": eng.pool_bytes,
        "temp": mem.temp,
        "compile_s": round(t_lower + t_compile, 1),
    }


def _scenario(core: EngineCore, name: str, tokens: int, impl: str, phase: str | None):
    """The step-time model's assumptions for one program (see the module doc); `phase` given
    (--mode prefill / decode) or, for `serve`, read from the bucket."""
    if name == "score":
        return {}
    if (phase or _phase(core, tokens)) == "decode":
        seqs = min(tokens, core.max_seqs)
        keys, reads = core.max_len, seqs * core.max_len
        what = f"decode: {seqs} sequences x 1 token, each at {core.max_len} keys"
    else:
        keys = core.max_len // 2
        reads = math.ceil(tokens / QUERY_BLOCK) * keys
        what = (
            f"prefill: one {tokens}-token chunk of a {core.max_len}-token prompt, {keys} keys "
            f"per token (mean), its pages read once per {QUERY_BLOCK}-query block ({impl})"
        )
    return {"scenario": what, "keys_per_token": keys, "cache_tokens_read": reads}


def _flops(job: Job, core: EngineCore, name: str, tokens: int, keys: int) -> dict[str, float]:
    cfg = job.cfg
    n = F.active_matmul_params(cfg)
    head = n["lm_head"]
    rows = core.max_seqs + (tokens if name == "score" else 0)
    attn = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * keys
    total = tokens * (2 * (n["total"] - head) + attn) + rows * 2 * head
    chips = job.plan.num_devices
    return {
        "analytic_model_per_chip": total / chips,
        "analytic_hardware_per_chip": total / chips,
        "tokens_per_step": tokens,
        "active_matmul_params": n["total"],
    }


def _phase(core: EngineCore, tokens: int) -> str:
    return "decode" if tokens <= core.bucket_for(core.max_seqs) else "prefill"


def one_program_sizes(job: Job) -> ServeSizes:
    """--mode prefill / decode: the engine for `--batch` sequences of `--cache-len` tokens (the
    pool holds exactly those, no sizing to the chip) whose one program is compiled: prefill
    `step[seq]` (one prompt chunk; batch default 1), decode the step of `batch` sequences, one
    token each (batch default MAX_SEQS)."""
    limit = job.cfg.max_position_embeddings
    cache_len = job.cache_len or min(DEFAULT_CACHE_LEN, limit)
    if cache_len > limit:  # as the server's --max-len: positions past the model's are untrained
        raise UsageError(
            f"--cache-len {cache_len} exceeds the model's max_position_embeddings {limit}"
        )
    batch = job.batch or (1 if job.mode == "prefill" else MAX_SEQS)
    tokens = batch
    if job.mode == "prefill":
        tokens = job.seq or min(DEFAULT_SEQ["prefill"], cache_len)
        if tokens > cache_len:
            raise UsageError(f"--seq {tokens} (the prefill chunk) exceeds --cache-len {cache_len}")
    pages = batch * math.ceil(cache_len / PAGE_SIZE) + 1  # and the scratch page
    return ServeSizes(batch, cache_len, PAGE_SIZE, tokens, pages)


def measure_serve(
    job: Job,
    sizes: ServeSizes,
    header: dict[str, Any],
    *,
    chip: Chip | None,
    hbm_gib: float | None,
    hlo_dir: str | None = None,
    efficiency: float = 1.0,
) -> dict[str, Any]:
    """Size the pool, compile the engine's programs (`--mode serve`: every one; prefill: the
    step of the token budget; decode: the step of max_seqs tokens), and report (JSON-able)."""
    limit = job.cfg.max_position_embeddings
    max_len = sizes.max_len or min(DEFAULT_CACHE_LEN, limit)
    if not 2 <= max_len <= limit:
        raise UsageError(f"--max-len must be in [2, {limit}] (the model's context), got {max_len}")
    model = abstract_model(job.cfg, job.policy, job.plan)
    pool_rule = size_pool(job, model, sizes, max_len, hbm_gib, hlo_dir)
    phase = None if job.mode == "serve" else job.mode
    if phase:
        pool_rule["rule"] = f"{sizes.max_seqs} sequences of {max_len} (--batch x --cache-len)"
    pages, refits = pool_rule["num_pages"], []
    for attempt in range(FIT_ROUNDS):
        eng = _Engine(job, model, sizes, max_len, pages)
        impl = dispatch.paged_attention_impl_for(job.policy, job.plan, eng.pool)
        core = eng.core
        only = {"prefill": core.token_budget, "decode": core.bucket_for(core.max_seqs)}
        programs = [
            _program(job, eng, name, tokens, impl, chip, hbm_gib, hlo_dir, efficiency, phase)
            for name, tokens in core.programs
            if not phase or (name, tokens) == ("step", only[phase])
        ]
        misfits = [p for p in programs if not p["fits"]]
        if not misfits or sizes.num_pages is not None or attempt == FIT_ROUNDS - 1:
            break
        # Another program than the probed one needs more at this size (XLA lays out and
        # copies the pool per program): shrink the pool by its excess and compile them again.
        need = max(p.get("required_gib") or hbm_gib for p in misfits)
        excess = (need - hbm_gib + sizes.margin_gib) * GiB
        shrink = max(1, math.ceil(excess / pool_rule["program_bytes_per_page"]))
        refits.append(
            {"pages": pages, "misfits": [p["program"] for p in misfits], "need_gib": need}
        )
        pages = max(2, pages - shrink)
        _clear_dumps(hlo_dir, programs)
    if refits:
        pool_rule = {**pool_rule, "num_pages": pages, "refits": refits}
    core, plan = eng.core, job.plan
    why = paged.pallas_unsupported(eng.pool, plan) if impl == "xla" else None
    per_token = eng.page_bytes / core.page_size
    report: dict[str, Any] = dict(header)
    report.update(
        mode=job.mode,
        **plan_fields(plan),
        batch=core.max_seqs,
        seq=core.token_budget,
        cache_len=core.max_len,
        policy=dataclasses.asdict(job.policy),
        param_dtype=job.policy.param_dtype,
        compute_dtype=job.policy.compute_dtype,
        hbm_gib=hbm_gib,
        step_source=(
            f"engine.core.EngineCore programs {', '.join(p['program'] for p in programs)}"
            f"; paged attention {impl}"
            + (f" ({why})" if why else "")
            + f"; MoE decode {describe_dispatch('decode', job, core.max_seqs)}, prefill "
            f"{describe_dispatch('prefill', job, core.token_budget)}"
        ),
        engine={
            "max_seqs": core.max_seqs,
            "max_len": core.max_len,
            "page_size": core.page_size,
            "token_budget": core.token_budget,
            "buckets": list(core.buckets),
            "cache_dtype": core.cache_dtype,
            "attention": impl,
        },
        pool={
            **pool_rule,
            "pages": core.num_pages - 1,  # the scratch page excluded
            "tokens": core.pool_tokens,
            "max_len_sequences": core.pool_tokens / core.max_len,
            "gib_per_chip": eng.pool_bytes / GiB,
            "bytes_per_token_per_chip": per_token,
        },
        weights_gib_per_chip=eng.weight_bytes / GiB,
    )
    report["programs"] = programs
    report["fits"] = all(p["fits"] for p in programs)
    if not report["fits"]:
        worst = max(programs, key=lambda p: p.get("required_gib") or 0)
        report.update(required_gib=worst.get("required_gib"), available_gib=hbm_gib)
    if hlo_dir:
        biggest = max(programs, key=lambda p: p.get("memory_gib", {}).get("temporaries", 0))
        report["largest_buffers"] = _largest_buffers(hlo_dir, biggest["dump"])
    return report


def _program(job, eng: _Engine, name, tokens, impl, chip, hbm_gib, hlo_dir, efficiency, phase):
    core, chips = eng.core, job.plan.num_devices
    entry: dict[str, Any] = {
        "program": f"{name}[{tokens}]",
        "name": name,
        "tokens": tokens,
        "phase": phase or _phase(core, tokens),
        "detail": name == "step"
        and (phase or tokens in (core.bucket_for(core.max_seqs), core.token_budget)),
        "dump": f"{DUMP_PREFIX}{name}_{tokens}",
    }
    compiled, t_lower, t_compile, hlo = eng.compile(name, tokens, hlo_dir)
    if isinstance(compiled, DoesNotFit):
        entry.update(
            fits=False,
            required_gib=compiled.required_gib,
            available_gib=compiled.available_gib or hbm_gib,
            error=str(compiled),
        )
        return entry
    mem = Memory.of(compiled)
    gib = mem.gib()
    gib.update(
        weights=round(eng.weight_bytes / GiB, 3),
        pool=round(eng.pool_bytes / GiB, 3),
        other=round((mem.total - mem.temp - eng.weight_bytes - eng.pool_bytes) / GiB, 3),
    )
    entry.update(memory_gib=gib, lower_s=round(t_lower, 1), compile_s=round(t_compile, 1))
    entry["fits"] = hbm_gib is None or mem.total / GiB <= hbm_gib
    if not entry["fits"]:
        entry.update(required_gib=mem.total / GiB, available_gib=hbm_gib)
    entry["comm"] = comm_summary(hlo, chips, chip) if hlo else {"error": "no optimized HLO"}
    entry["pool_collectives"] = _pool_collectives(hlo, eng)
    raw = F.compiled_cost(compiled)
    scenario = _scenario(core, name, tokens, impl, phase)
    if not scenario:
        entry["flops"] = {"compiled_raw_per_chip": raw["flops"]}
        return entry
    entry.update(scenario)
    flops = _flops(job, core, name, tokens, scenario["keys_per_token"])
    flops["compiled_raw_per_chip"] = raw["flops"]
    entry["flops"] = flops
    hbm = eng.weight_bytes + scenario["cache_tokens_read"] * eng.page_bytes / core.page_size
    entry["hbm_bytes_per_chip"] = hbm
    pseudo = {"flops": flops, "mode": "serve", "comm": entry["comm"], "chips": chips}
    mfu = F.step_time_model(pseudo, chip, None, efficiency, hbm_bytes=hbm)
    limits = F.model_limits(job.cfg, chip, mfu)
    if limits:
        mfu = {k: v for k, v in mfu.items() if k not in ("mfu", "tokens_per_s_per_chip")}
        mfu.update(applies=False, limits=limits)
    entry["mfu"] = mfu
    return entry


def _pool_collectives(hlo: str, eng: _Engine) -> list[str]:
    """Collectives of the optimized HLO whose result has the pool's page dims [pages,
    page_size, ...]: a gather (or any other move) of the page pool. Expected: none."""
    if not hlo:
        return []
    size, groups = eng.core.page_size, eng.core.cfg.num_groups
    pages = (eng.core.num_pages, groups * eng.core.num_pages)  # one group's, the whole pool
    marks = [m for p in pages for m in (f"[{p},{size},", f",{p},{size},")]
    ops = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
    out = []
    for line in hlo.splitlines():
        if any(f" {op}(" in line or f" {op}-start(" in line for op in ops):
            if any(m in line.split("=", 1)[-1].split("(", 1)[0] for m in marks):
                out.append(line.strip()[:160])
    return out
