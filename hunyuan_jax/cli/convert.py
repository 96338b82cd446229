"""The converter's command line::

    python -m hunyuan_jax.cli.convert hf-to-jax --hf-dir D --out O [--dtype bfloat16]
        [--quantize int8|fp8|int4|int4-experts [--int4-group-size G]] [--tokenizer-dir T]
        [--compression zstd|none]
        [--checksum crc32c|none] [--chunk-mb 4] [--workers 2] [--max-inflight-gb 1]
        [--overwrite] [--no-progress] [--debug]
    python -m hunyuan_jax.cli.convert jax-to-hf --ckpt C --out D [--dtype bfloat16] [--step N]
        [--max-shard-gb 5] [--config F [--tree-prefix P]] [--overwrite] [--no-progress]
        [--debug]
    python -m hunyuan_jax.cli.convert verify --ckpt C [--step N] [--debug]
    python -m hunyuan_jax.cli.convert merge-lora --run RUN --out O [--base B] [--step N]
        [--dtype float32|bfloat16] [--mesh M --rules R] [--overwrite]
        [--allow-base-mismatch] [--debug]

`--ckpt` is a converted checkpoint, a train.py run directory (its latest complete step, or
`--step N`), or a bare orbax params directory with `--config`. What each direction does:
`hunyuan_jax/checkpoints/convert/hf_to_jax.py` and `jax_to_hf.py` (`--quantize` stores the matmul weights
as int8 / fp8 / int4 values + scales, int4 in groups of `--int4-group-size` along the contraction; jax-to-hf of such a checkpoint dequantizes them, to bfloat16 by
default); the output layout: `hunyuan_jax/checkpoints/converted.py`. `verify` reads a converted
checkpoint or a run's checkpoints in full against their checksums
(`hunyuan_jax/checkpoints/convert/verify.py`) and names the first bad array and file (exit 4). `merge-lora`
folds a LoRA run's adapters into its base and writes a run directory that jax-to-hf exports
(`hunyuan_jax/checkpoints/convert/merge_lora.py`).

Exit status (`hunyuan_jax.errors`): 0 success (also a rerun on a complete conversion, which
does nothing); 2 bad command line (argparse, a flag that does not fit the source) or bad
config; 4 checkpoint problem (missing / truncated / corrupt shard, wrong shape, missing or
unknown tensor, an `--out` that must not be written into, an interrupted conversion given to
jax-to-hf, an I/O error such as a full disk or a permission denied); 130 interrupted; 1 a bug
(with its traceback). Expected errors print one line, `python -m hunyuan_jax.cli.convert: error:
...`, naming the file / tensor at fault; `--debug` shows the traceback instead. An
interrupted hf-to-jax resumes when rerun; an interrupted jax-to-hf leaves no partial output.
"""

from __future__ import annotations

import argparse
import sys

from hunyuan_jax.checkpoints.convert import hf_to_jax, jax_to_hf
from hunyuan_jax.checkpoints.convert.common import DTYPES
from hunyuan_jax.checkpoints.convert.merge_lora import merge_lora
from hunyuan_jax.checkpoints.convert.verify import verify
from hunyuan_jax.cli_help import HelpFormatter
from hunyuan_jax.errors import CheckpointError, HunyuanError, add_debug_flag, run_cli
from hunyuan_jax.model.policy import INT4_GROUP_SIZE
from sharding.plan import ShardingPlan

PROG = "python -m hunyuan_jax.cli.convert"


def build_parser() -> argparse.ArgumentParser:
    fmt = {"formatter_class": HelpFormatter}  # --help prints every default
    ap = argparse.ArgumentParser(prog=PROG, description="Checkpoint conversion HF <-> JAX.", **fmt)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-jax", help="HF checkpoint -> orbax/tensorstore params", **fmt)
    a.add_argument("--hf-dir", required=True, help="HF checkpoint directory (index + shards)")
    a.add_argument("--out", required=True, help="output directory")
    a.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="stored param dtype (default: the source's; bfloat16 for FP8)",
    )
    a.add_argument(
        "--quantize",
        choices=("int8", "fp8", "int4", "int4-experts"),
        default=None,
        help="store the matmul weights quantized (values + float32 scales: int8 / fp8 per "
        "output channel, int4 per group along the contraction; int4-experts: the routed "
        "experts int4, the others int8); an FP8 source's e4m3 weights and scales are kept as "
        "they are with fp8",
    )
    a.add_argument(
        "--int4-group-size",
        type=int,
        default=None,
        help=f"int4 values per scale along the contraction, a target (default "
        f"{INT4_GROUP_SIZE}): each weight takes the largest group <= it that leaves whole "
        "groups on every shard of its contraction up to 16 (recorded per weight)",
    )
    a.add_argument(
        "--tokenizer-dir",
        default=None,
        help="also carry the tokenizer files from here (hy.tiktoken, ...)",
    )
    a.add_argument("--compression", choices=("zstd", "none"), default="zstd")
    a.add_argument(
        "--checksum",
        choices=("crc32c", "none"),
        default="crc32c",
        help="crc32c of every chunk, checked on every read (none: only to measure its cost)",
    )
    a.add_argument(
        "--chunk-mb",
        type=float,
        default=4.0,
        help="inner chunk size, the unit of partial reads at restore",
    )
    a.add_argument(
        "--workers",
        type=int,
        default=2,
        help="threads reading + transposing tensors, and tensorstore writes in flight",
    )
    a.add_argument(
        "--max-inflight-gb",
        type=float,
        default=1.0,
        help="tensors in flight at once, in GB (a larger single tensor goes alone); "
        "peak RAM ~ start-up + 3 x max(this, largest tensor)",
    )
    a.add_argument("--overwrite", action="store_true", help="replace a previous conversion")
    a.add_argument("--no-progress", action="store_true")
    add_debug_flag(a)
    b = sub.add_parser("jax-to-hf", help="converted / trained params -> HF safetensors", **fmt)
    b.add_argument(
        "--ckpt",
        required=True,
        help="converted checkpoint, train.py run directory, or bare orbax params dir (+ --config)",
    )
    b.add_argument("--out", required=True)
    b.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="exported dtype (default: the stored one)",
    )
    b.add_argument(
        "--step", type=int, default=None, help="run directory: export this step (default latest)"
    )
    b.add_argument("--max-shard-gb", type=float, default=5.0)
    b.add_argument(
        "--config",
        default=None,
        help="architecture of a bare orbax params dir (HF config.json, our YAML, a checkpoint dir)",
    )
    b.add_argument(
        "--tree-prefix",
        default="",
        help="name prefix of the params inside a bare orbax checkpoint, e.g. 'params.'",
    )
    b.add_argument("--overwrite", action="store_true", help="replace an existing HF checkpoint")
    b.add_argument("--no-progress", action="store_true")
    add_debug_flag(b)
    m = sub.add_parser(
        "merge-lora", help="fold a LoRA run's adapters into its base (a run directory out)", **fmt
    )
    m.add_argument("--run", required=True, help="the LoRA run directory (train.py, train.lora)")
    m.add_argument("--out", required=True, help="output run directory (jax-to-hf exports it)")
    m.add_argument("--base", default=None, help="the base (default: the one the run records)")
    m.add_argument("--step", type=int, default=None, help="adapters of this step (default latest)")
    m.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    m.add_argument("--mesh", default=None, help="device mesh for the merge, e.g. fsdp=8")
    m.add_argument("--rules", default="fsdp", help="sharding rules preset for --mesh")
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    m.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="merge even into a base other than the one the adapters were trained on "
        "(its digest in lora_base.json is then not checked)",
    )
    add_debug_flag(m)
    c = sub.add_parser("verify", help="read a checkpoint in full and check its checksums", **fmt)
    c.add_argument(
        "--ckpt", required=True, help="converted checkpoint, train.py run directory, or HF dir"
    )
    c.add_argument(
        "--step", type=int, default=None, help="run directory: only this step (default all)"
    )
    add_debug_flag(c)
    return ap


def _run(args) -> int:
    try:
        if args.cmd == "hf-to-jax":
            hf_to_jax(
                args.hf_dir,
                args.out,
                args.dtype,
                tokenizer_dir=args.tokenizer_dir,
                compression=args.compression,
                checksum=args.checksum,
                chunk_mb=args.chunk_mb,
                overwrite=args.overwrite,
                progress=not args.no_progress,
                workers=args.workers,
                max_inflight_bytes=int(args.max_inflight_gb * 2**30),
                quantize=args.quantize,
                group_size=args.int4_group_size,
            )
        elif args.cmd == "merge-lora":
            plan = ShardingPlan.from_flags(args.mesh, args.rules) if args.mesh else None
            merge_lora(
                args.run,
                args.out,
                base=args.base,
                step=args.step,
                dtype=args.dtype,
                plan=plan,
                overwrite=args.overwrite,
                allow_base_mismatch=args.allow_base_mismatch,
            )
        elif args.cmd == "verify":
            verify(args.ckpt, args.step)
        else:
            jax_to_hf(
                args.ckpt,
                args.out,
                args.dtype,
                step=args.step,
                max_shard_bytes=int(args.max_shard_gb * 1e9),
                config=args.config,
                tree_prefix=args.tree_prefix,
                overwrite=args.overwrite,
                progress=not args.no_progress,
            )
    except HunyuanError:
        raise
    except OSError as e:  # disk full, permission denied, ...: the checkpoint cannot be written
        raise CheckpointError(f"{e.filename or ''}: {e.strerror or e}".lstrip(": ")) from e
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: _run(args), debug=args.debug)


def entry() -> int:
    """`hunyuan-convert`, `python -m hunyuan_jax.cli.convert` (no start-up re-exec: not a hot loop)."""
    return main()


if __name__ == "__main__":
    sys.exit(entry())
