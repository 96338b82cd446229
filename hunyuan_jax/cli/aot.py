"""The command line of the AOT tool: flags -> (ModelConfig, RuntimePolicy, TrainConfig,
ShardingPlan over the slice's compile-only devices) -> one compile -> report.

    python -m hunyuan_jax.cli.aot --config configs/hunyuan_a52b_instruct.yaml --topology v5p-256 \
        --mode train --mesh fsdp=8,expert=16 --rules fsdp_ep --seq 4096
    python -m hunyuan_jax.cli.aot --config configs/hunyuan_a52b_instruct.yaml --topology v6e-32 \
        --mode decode --batch 8 --cache-len 32768
    python -m hunyuan_jax.cli.aot --config configs/hunyuan_a52b_instruct.yaml --topology v6e-16 \
        --mode serve --weights int8 --max-len 32768 --max-seqs 8 --token-budget 4096

The serving modes compile the programs of the one serving engine (`hunyuan_jax.engine`, which
infer.py, the server and RL rollouts run; `hunyuan_jax.aot.serve`): `--mode serve` every one
(step[T] per token bucket, score[budget]) with the page pool sized to what the chip has left
after the weights, the largest program's temporaries and a margin; `--mode decode` its step
for `--batch` sequences (one token each) and `--mode prefill` its step over one `--seq`-token
prompt chunk, each with a pool of `--batch` sequences of `--cache-len` tokens.

Configs: the architecture from `loading.read_model_config` (our YAML, a Hugging Face
config.json or any checkpoint directory). Training uses the YAML's `runtime:` and `train:`
sections (`train_config.load_configs`), a train.py run directory's own policy, else
`RuntimePolicy()` (fp32 parameters, bf16 compute, full remat); `--param-dtype` overrides the
parameter dtype. Serving uses `RuntimePolicy.inference(--dtype)`; `--weights
int8|fp8|int4|int4-experts|bf16` holds the matmul weights in that form
(`hunyuan_jax.model.quantize`; int4 groups: `--set runtime.int4_group_size=N`). `--set model.K=V`,
`--set runtime.K=V` and (train) `--set K=V` / `--set train.K=V` override keys as train.py's
`--set` does; the dedicated flags win over them.

Exit status (`hunyuan_jax.errors`): 0 fits, 2 usage or configuration error, 6 does not fit
(the compiler's own out-of-memory verdict, or a total above the chip's usable HBM), 4 an
unreadable checkpoint directory, 1 a bug (with its traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

import jax

from hunyuan_jax import errors
from hunyuan_jax.aot import serve as S
from hunyuan_jax.aot import topology as T
from hunyuan_jax.aot.compiler import enable_dump
from hunyuan_jax.aot.grpo import format_grpo, measure_grpo
from hunyuan_jax.aot.programs import DEFAULT_CACHE_LEN, DEFAULT_SEQ, MODES, SERVING, Job
from hunyuan_jax.aot.report import format_report, format_serve, measure
from hunyuan_jax.checkpoints import loading
from hunyuan_jax.cli_help import HelpFormatter
from hunyuan_jax.errors import ConfigError, DoesNotFit, UsageError
from hunyuan_jax.model.config import ModelConfig, read_yaml
from hunyuan_jax.model.policy import WEIGHTS, RuntimePolicy
from hunyuan_jax.model.state import check_fits
from hunyuan_jax.train.config import TrainConfig, load_configs, parse_overrides
from sharding.layout import long_sequence_layout
from sharding.plan import ShardingPlan

PROG = "python -m hunyuan_jax.cli.aot"
SERVE = "serve"
GRPO = "grpo"
_SERVE_FLAGS = ("max_len", "max_seqs", "page_size", "token_budget", "num_pages", "pool_margin_gib")


def _bracket(text: str) -> tuple[int, int]:
    """--pool-bracket LO,HI: two page counts, 2 <= LO < HI."""
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"want LO,HI (two page counts), got {text!r}") from None
    if not 2 <= lo < hi:
        raise argparse.ArgumentTypeError(f"want 2 <= LO < HI, got {text!r}")
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Ahead-of-time compiles for TPU slices you do not have: does the program "
        "fit, and how fast could it be?",
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--config",
        required=True,
        help="model YAML (configs/*.yaml), HF config.json or a checkpoint directory",
    )
    p.add_argument(
        "--topology",
        required=True,
        help="v5p-256 / v6e-32 / v5e-64 / v4-128 (Cloud TPU names: TensorCores on "
        "v4 and v5p, chips on v5e and v6e), a topology like v5p:4x4x8, or "
        "'local' (this host's devices)",
    )
    p.add_argument(
        "--slices", type=int, default=1, help="number of slices (multi-slice; use dcn.* mesh sizes)"
    )
    p.add_argument(
        "--mode",
        choices=(*MODES, GRPO),
        default="train",
        help="the program to compile: train.py's step; the serving engine's prefill step, "
        "decode step, or every program of it (serve); grpo: the GRPO train step and the "
        "rollout engine's programs on the same weights (docs/rl.md)",
    )
    p.add_argument("--mesh", default=None, help="e.g. fsdp=-1,expert=16 (default per mode)")
    p.add_argument(
        "--rules",
        default=None,
        help="sharding preset (default: fsdp_ep for train, serve_ep_tp otherwise)",
    )
    p.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="LOGICAL=AXES",
        help="override one logical axis of the preset, e.g. cache_length=expert or "
        "cache_batch=data+expert (repeatable)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help=f"global batch (sequences); train default: one sequence per batch shard and "
        f"micro-batch; decode: the sequences of the step (default {S.MAX_SEQS}); prefill: the "
        f"sequences the pool holds (default 1)",
    )
    p.add_argument(
        "--seq",
        type=int,
        default=None,
        help=f"train: sequence length (default: {DEFAULT_SEQ['train']} or the model's "
        f"max_position_embeddings if less; more is refused as train.py refuses it); prefill: "
        f"chunk length (default: {DEFAULT_SEQ['prefill']} or --cache-len if less)",
    )
    p.add_argument(
        "--cache-len",
        type=int,
        default=None,
        help=f"prefill / decode: each sequence's length, the keys a decode token attends to "
        f"(default: {DEFAULT_CACHE_LEN} or the model's max_position_embeddings if less; at most "
        f"that)",
    )
    p.add_argument("--micro", type=int, default=1, help="train: micro-batches per step")
    serve = p.add_argument_group("--mode serve (the engine's sizes; hunyuan_jax.aot.serve)")
    serve.add_argument(
        "--max-len",
        type=int,
        default=None,
        help=f"longest sequence, prompt + new tokens (default: {DEFAULT_CACHE_LEN} or the "
        f"model's max_position_embeddings if less)",
    )
    serve.add_argument(
        "--max-seqs",
        type=int,
        default=None,
        help=f"sequences in flight; the decode step's bucket (default {S.MAX_SEQS})",
    )
    serve.add_argument(
        "--page-size",
        type=int,
        default=None,
        help=f"token slots per page (default {S.PAGE_SIZE}: the engine's default and the "
        f"smallest page jax's ragged paged attention kernel is tuned for (its tables and "
        f"get_min_page_size start at 16); a sequence wastes under one page and the prefix "
        f"cache reuses whole pages, so smaller is finer, larger gives the kernel longer "
        f"copies per page)",
    )
    serve.add_argument(
        "--token-budget",
        type=int,
        default=None,
        help=f"stream tokens per step, the largest (prefill) bucket (default "
        f"{S.TOKEN_BUDGET}: enough tokens per step for the A52B's prefill to be "
        f"compute-bound on v6e in the step-time model)",
    )
    serve.add_argument(
        "--num-pages",
        type=int,
        default=None,
        help="pages in the pool, the scratch page included (default: sized to the chip)",
    )
    serve.add_argument(
        "--pool-bracket",
        type=_bracket,
        default=None,
        metavar="LO,HI",
        help="seed the pool search with pages known to fit (LO, compiled to confirm it) and "
        "known not to (HI, e.g. an earlier run's refusal; not compiled): it bisects between "
        "them to 1%% (hunyuan_jax.aot.pool_size)",
    )
    serve.add_argument(
        "--pool-margin-gib",
        type=float,
        default=None,
        help=f"HBM per chip kept free when sizing the pool (default {S.MARGIN_GIB})",
    )
    p.add_argument("--dtype", default="bfloat16", help="serving weights/compute dtype")
    p.add_argument("--param-dtype", default=None, help="train: override the parameter dtype")
    p.add_argument(
        "--weights",
        choices=WEIGHTS,
        default=None,
        help="how the matmul weights are held (runtime.weights): int8 / fp8 values + "
        "per-channel scales, int4 values + one scale per group along the contraction "
        "(target size --set runtime.int4_group_size=N, default 128; each weight's group "
        "is the largest <= it splitting its contraction over up to 16 shards), int4-experts (routed experts int4, "
        "the others int8), bf16, or auto (float in the parameter dtype)",
    )
    p.add_argument(
        "--cache-dtype", default=None, help="KV cache dtype (default: the compute dtype; int8)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model.KEY / runtime.KEY / (train) KEY override, as train.py's --set",
    )
    p.add_argument("--hbm-gib", type=float, default=None, help="override usable HBM per chip")
    p.add_argument(
        "--step-time",
        type=float,
        default=None,
        help="seconds per step for the MFU (default: the roofline model)",
    )
    p.add_argument(
        "--efficiency",
        type=float,
        default=1.0,
        help="fraction of peak FLOP/s in the step-time model",
    )
    p.add_argument(
        "--unrolled-flops",
        action="store_true",
        help="two more compiles (1 and 2 layer groups unrolled) for exact FLOPs",
    )
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument(
        "--dump",
        default=None,
        metavar="DIR",
        help="XLA dump directory (sets XLA_FLAGS=--xla_dump_to=DIR): prints the "
        "largest buffers and checks for bf16 copies of stacked weights",
    )
    errors.add_debug_flag(p)
    return p


# ----------------------------------------------------------------------------- configs
def _is_our_yaml(path: Path) -> bool:
    return path.is_file() and path.suffix in (".yaml", ".yml") and "model" in read_yaml(path)


def resolve_configs(args) -> tuple[ModelConfig, RuntimePolicy, TrainConfig]:
    """(architecture, runtime policy, train config) for the mode, `--set` applied."""
    path = Path(args.config)
    if not path.exists():
        raise ConfigError(f"--config {args.config}: no such file or directory")
    over = parse_overrides(args.set)
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    for section, kind in ((ModelConfig, "model"), (RuntimePolicy, "runtime")):
        for key in set(over["train"]) & {f.name for f in dataclasses.fields(section)}:
            if key not in train_keys:
                raise ConfigError(f"--set {key}=: {key!r} is a {kind} key: --set {kind}.{key}=")
    train = args.mode in ("train", GRPO)
    if not train and over["train"]:
        raise UsageError(f"--set {sorted(over['train'])}: train keys apply to --mode train only")
    if _is_our_yaml(path):
        cfg, policy, tcfg = load_configs(path, args.set)
    else:
        runtime = None
        if path.is_dir():  # a train.py run directory carries its own policy
            ckpt = loading.open_checkpoint(path)
            cfg, runtime = ckpt.cfg, ckpt.runtime
        else:
            cfg = loading.read_model_config(path)
        cfg = cfg.replace(**over["model"])
        policy = (runtime or RuntimePolicy()).replace(**over["runtime"])
        tcfg = TrainConfig.from_dict(over["train"], "--set")
    weights = {} if args.weights is None else {"weights": args.weights}
    if train:
        if args.param_dtype:
            policy = policy.replace(param_dtype=args.param_dtype)
        return cfg, policy.replace(**weights), tcfg
    policy = RuntimePolicy.inference(args.dtype).replace(**over["runtime"], **weights)
    return cfg, policy, TrainConfig()


def _check_flags(args) -> None:
    train = args.mode in ("train", GRPO)
    if args.mode == SERVE:
        for name in ("batch", "seq", "cache_len"):
            if getattr(args, name) is not None:
                flag = "--" + name.replace("_", "-")
                hint = " (the engine's longest sequence: --max-len)" if name == "cache_len" else ""
                raise UsageError(f"{flag} does not apply to --mode serve{hint}")
        if args.pool_margin_gib is not None and args.pool_margin_gib < 0:
            raise UsageError(f"--pool-margin-gib must be >= 0, got {args.pool_margin_gib}")
        if args.pool_bracket and args.num_pages is not None:
            raise UsageError("--pool-bracket seeds the pool search; --num-pages skips it: one")
    elif args.pool_bracket:
        raise UsageError("--pool-bracket: only for --mode serve")
    if args.mode in (SERVE, GRPO):
        for name in ("max_len", "max_seqs", "page_size", "token_budget", "num_pages"):
            value = getattr(args, name)
            if value is not None and value < (2 if name in ("max_len", "num_pages") else 1):
                raise UsageError(f"--{name.replace('_', '-')} must be >= "
                                 f"{2 if name in ('max_len', 'num_pages') else 1}, got {value}")  # fmt: skip
        if args.mode == GRPO and (args.pool_margin_gib is not None or args.cache_len):
            raise UsageError("--pool-margin-gib and --cache-len do not apply to --mode grpo")
    else:
        given = [n for n in _SERVE_FLAGS if getattr(args, n) is not None]
        if given:
            flags = ", ".join("--" + n.replace("_", "-") for n in given)
            raise UsageError(f"{flags}: only for --mode serve and grpo")
    if not train and args.seq is not None and args.mode != "prefill":
        raise UsageError(f"--seq applies to train and prefill, not to --mode {args.mode}")
    if train and args.cache_len is not None:
        raise UsageError("--cache-len applies to prefill and decode, not to --mode train")
    if not train and (args.micro != 1 or args.param_dtype):
        raise UsageError("--micro and --param-dtype apply to --mode train only")
    if not train and (args.unrolled_flops or args.step_time is not None):
        raise UsageError("--unrolled-flops and --step-time apply to --mode train only")
    for name in ("batch", "seq", "cache_len", "micro", "slices"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0 < args.efficiency <= 1:
        raise UsageError(f"--efficiency must be in (0, 1], got {args.efficiency}")
    for name in ("hbm_gib", "step_time"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")


def resolve(args) -> tuple[Job, dict, T.Chip | None, float | None]:
    """(job, report header, chip, usable HBM GiB) from the flags."""

    _check_flags(args)
    cfg, policy, tcfg = resolve_configs(args)
    if args.topology == "local":
        if args.slices != 1:
            raise UsageError("--slices needs a TPU --topology, not 'local'")
        devices, sl = jax.devices(), None
    else:
        sl = T.parse_topology(args.topology, args.slices)
        devices = T.topology_devices(sl)
    slices = sl.num_slices if sl else 1
    mode = "train" if args.mode == GRPO else args.mode  # grpo: the train step's layout
    chips = len(devices) // slices
    mesh, rules, layout_note = args.mesh, args.rules, None
    seq = args.seq or DEFAULT_SEQ["train"]
    if mode == "train" and mesh is None and rules is None:  # a long sequence: split it
        long = long_sequence_layout(cfg, chips, seq, tcfg.cp_min_seq, "--mesh / --rules")
        if long is not None:
            mesh, rules, layout_note = long
    mesh = mesh or T.default_mesh(mode, cfg, chips)
    mesh += f",dcn.data={slices}" if slices > 1 and not args.mesh else ""
    rules = rules or T.default_rules(mode)
    try:  # a mesh that does not fit the devices or the model: ConfigError (sharding/plan.py)
        plan = ShardingPlan.from_flags(mesh, rules, args.rule, devices=devices)
        if mode != "train":  # train: train.py's own checks, in programs.train_program
            check_fits(plan, cfg, policy)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"--mesh {mesh} --rules {rules}: {e}") from None
    chip = T.chip_of(plan.devices)
    job = Job(
        mode,
        cfg,
        policy,
        plan,
        tcfg,
        batch=args.batch,
        seq=args.seq,
        cache_len=args.cache_len,
        micro=args.micro,
        cache_dtype=args.cache_dtype,
    )
    header = {
        "config": args.config,
        "topology": args.topology,
        "topology_string": sl.description if sl else "local",
        "mesh_arg": mesh,
        **({"layout_note": layout_note} if layout_note else {}),
    }
    return job, header, chip, args.hbm_gib or (chip.hbm_gib if chip else None)


# ----------------------------------------------------------------------------- main
def run(args, own_process: bool = False) -> int:
    """One compile and its report. `own_process`: this process runs nothing else (the command
    line), so XLA may dump every module it compiles into a temporary directory."""
    # Before the first compile (XLA reads XLA_FLAGS once per process). The communication model
    # reads the optimized HLO from the dump: a temporary one without --dump when the process is
    # ours (else `compiled.as_text()`, which XLA:TPU cannot do for the A52B train step).
    hlo_dir = args.dump or (tempfile.mkdtemp(prefix="hunyuan-aot-") if own_process else None)
    if hlo_dir:
        enable_dump(hlo_dir)
    job, header, chip, hbm_gib = resolve(args)
    if args.mode in SERVING:
        sizes = serve_sizes(args) if args.mode == SERVE else S.one_program_sizes(job)
        return _run_serve(args, job, sizes, header, chip, hbm_gib, hlo_dir)
    if args.mode == GRPO:
        try:
            report = measure_grpo(job, serve_sizes(args), header, hbm_gib)
        finally:
            if hlo_dir and not args.dump:
                shutil.rmtree(hlo_dir, ignore_errors=True)
        what = "the GRPO train step and the rollout engine together"
        return _emit(args, report, format_grpo(report), f"{what} do not fit")
    try:
        report = measure(
            job,
            header,
            chip=chip,
            hbm_gib=hbm_gib,
            dump=args.dump,
            unrolled=args.unrolled_flops,
            step_time=args.step_time,
            efficiency=args.efficiency,
            hlo_dir=hlo_dir,
        )
    finally:
        if hlo_dir and not args.dump:
            shutil.rmtree(hlo_dir, ignore_errors=True)
    return _emit(args, report, format_report(report), f"the {args.mode} program does not fit")


def _emit(args, report: dict, text: str, what: str) -> int:
    """Prints the report, writes --json, and raises DoesNotFit (exit 6) when it does not fit."""
    print(text, flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1, default=str)
    if not report["fits"]:
        need, have = report.get("required_gib"), report.get("available_gib")
        raise DoesNotFit(
            f"{what} on {args.topology}: "
            + (f"needs {need:.2f} GiB" if need else "needs more")
            + f" of {have} GiB HBM per chip",
            need,
            have,
        )
    return 0


def serve_sizes(args) -> S.ServeSizes:
    given = {n: getattr(args, n) for n in _SERVE_FLAGS if getattr(args, n) is not None}
    if "pool_margin_gib" in given:
        given["margin_gib"] = given.pop("pool_margin_gib")
    if args.pool_bracket:
        given["pool_bracket"] = args.pool_bracket
    return S.ServeSizes(**given)


def _run_serve(args, job, sizes, header, chip, hbm_gib, hlo_dir) -> int:
    try:
        report = S.measure_serve(
            job,
            sizes,
            header,
            chip=chip,
            hbm_gib=hbm_gib,
            hlo_dir=hlo_dir,
            efficiency=args.efficiency,
        )
    finally:
        if hlo_dir and not args.dump:
            shutil.rmtree(hlo_dir, ignore_errors=True)
    bad = [p["program"] for p in report["programs"] if not p["fits"]]
    return _emit(
        args,
        report,
        format_serve(report),
        f"the serving engine's {', '.join(bad)} {'does' if len(bad) == 1 else 'do'} not fit",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    T.quiet_libtpu(args.topology, max(args.slices, 1))  # before libtpu loads
    return errors.run_cli(PROG, lambda: run(args, own_process=argv is None), args.debug)


def entry() -> int:
    """`hunyuan-aot`, `python -m hunyuan_jax.cli.aot` (no start-up re-exec: not a hot loop)."""
    return main()


if __name__ == "__main__":
    sys.exit(entry())
