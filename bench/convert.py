"""Benchmark of the streaming HF -> JAX converter: throughput (MB/s) and peak RSS for synthetic
bf16 checkpoints of two (or more) sizes that differ only in their number of layers.

    python -m bench.convert                       # 1 GB and 2 GB, zstd (the default)
    python -m bench.convert --sizes-gb 2,4 --compression none --export
    python -m bench.convert --sizes-gb 2 --checksum both   # the cost of the crc32c checksums
    # A52B tensor shapes (embed 1.65 GB, experts 234 MB), 2 experts, 2 and 4 layers:
    python -m bench.convert --sizes-gb 3,6 --hidden 6400 --intermediate 18304 --experts 2 \
        --vocab 129024 --heads 80 --kv-heads 8

Each conversion runs in a fresh subprocess (`python -m hunyuan_jax.cli.convert hf-to-jax`); its
peak RSS is the process's own VmHWM (reported in the manifest; not ru_maxrss from wait4, which
Linux seeds with the parent's high-water mark across fork + exec). The synthetic checkpoint was just
written, so it is read from the page cache: the numbers are the converter's CPU-side rate, not
a cold disk's. Prints one line per size and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers.rss import run_measuring_peak_rss
from tests.helpers.synthetic import synthetic_config, write_synthetic_hf

ROOT = Path(__file__).resolve().parents[1]


def bytes_per_layer(
    hidden: int, intermediate: int, experts: int, kv_frac: float = 0.25, itemsize: int = 2
) -> float:
    kv = int(hidden * kv_frac)  # num_kv_heads * head_dim
    attn = 2 * hidden * hidden + kv * hidden  # q, o; k+v (2 x kv) on every other layer
    mlp = 3 * hidden * intermediate * (experts + 1) + hidden * experts
    return (attn + mlp + 4 * hidden) * itemsize


def run_measured(cmd: list[str], env=None) -> tuple[int, int, float, str]:
    """(return code, peak RSS bytes of that child, seconds, stderr)."""
    code, peak, seconds, err = run_measuring_peak_rss(cmd, env)
    if code:
        print(err, file=sys.stderr)
    return code, peak, seconds, err


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-gb", default="1,2")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=None, help="default hidden // 128")
    ap.add_argument("--kv-heads", type=int, default=None, help="default hidden // 512")
    ap.add_argument("--compression", choices=("zstd", "none"), default="zstd")
    ap.add_argument(
        "--checksum",
        choices=("crc32c", "none", "both"),
        default="crc32c",
        help="both: convert each size with and without checksums, alternating",
    )
    ap.add_argument("--repeat", type=int, default=1, help="conversions per size and checksum")
    ap.add_argument("--export", action="store_true", help="also time jax-to-hf")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    heads = args.heads or max(1, args.hidden // 128)
    kv_heads = args.kv_heads or max(1, args.hidden // 512)
    per_layer = bytes_per_layer(args.hidden, args.intermediate, args.experts, kv_heads / heads)
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    rows = []
    try:
        for gb in (float(s) for s in args.sizes_gb.split(",")):
            layers = max(2, 2 * round(gb * 1e9 / per_layer / 2))
            hf = work / f"hf_{layers}"
            out = work / f"jax_{layers}"
            cfg = synthetic_config(
                layers, args.hidden, args.intermediate, args.experts, args.vocab, heads, kv_heads
            )
            t = time.time()
            size = write_synthetic_hf(hf, cfg, "bfloat16", shard_bytes=1 << 30)
            gen = time.time() - t
            largest = 2 * max(args.vocab * args.hidden, args.hidden * args.intermediate)
            modes = ("crc32c", "none") if args.checksum == "both" else (args.checksum,)
            modes = modes * args.repeat
            for checksum in modes:
                row = _convert_once(args, hf, out, work, env, size, layers, largest, checksum)
                if row is None:
                    return 1
                rows.append(row)
                print(
                    f"{size / 1e9:.2f} GB ({layers} layers, largest tensor {largest / 1e6:.0f} MB,"
                    f" generated in {gen:.0f} s), checksum {checksum}: {row['seconds']:.1f} s "
                    f"wall = {row['mb_s']:.0f} MB/s ({row['inner_mb_s']:.0f} MB/s after "
                    f"start-up), peak RSS {row['peak_rss_mb']:.0f} MB, output "
                    f"{row['out_gb']:.2f} GB ({args.compression})"
                    + (
                        f"; export {row['export_mb_s']:.0f} MB/s, peak RSS "
                        f"{row['export_rss_mb']:.0f} MB"
                        if args.export
                        else ""
                    ),
                    flush=True,
                )
            shutil.rmtree(hf)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(
        "\n| size GB | layers | checksum | wall s | MB/s | MB/s (steady) | peak RSS MB |"
        + (" export MB/s |" if args.export else "")
    )
    print("|---|---|---|---|---|---|---|" + ("---|" if args.export else ""))
    for r in rows:
        print(
            f"| {r['size_gb']:.2f} | {r['layers']} | {r['checksum']} | {r['seconds']:.1f} | "
            f"{r['mb_s']:.0f} | {r['inner_mb_s']:.0f} | {r['peak_rss_mb']:.0f} |"
            + (f" {r['export_mb_s']:.0f} |" if args.export else "")
        )
    return 0


def _convert_once(args, hf, out, work, env, size, layers, largest, checksum) -> dict | None:
    """One conversion of `hf` into `out` (removed afterwards), optionally exported back."""
    shutil.rmtree(out, ignore_errors=True)
    rc, rss, secs, _ = run_measured(
        [
            sys.executable,
            "-m",
            "hunyuan_jax.cli.convert",
            "hf-to-jax",
            "--hf-dir",
            str(hf),
            "--out",
            str(out),
            "--compression",
            args.compression,
            "--checksum",
            checksum,
            "--no-progress",
        ],
        env,
    )
    if rc:
        return None
    man = json.loads((out / "manifest.json").read_text())
    rss = max(rss, int(man["stats"]["peak_rss_mb"] * 1e6))
    row = dict(
        size_gb=size / 1e9,
        layers=layers,
        checksum=checksum,
        largest_mb=largest / 1e6,
        seconds=secs,
        mb_s=size / 1e6 / secs,
        inner_mb_s=man["stats"]["mb_per_s"],
        peak_rss_mb=rss / 1e6,
        out_gb=sum(f.stat().st_size for f in (out / "params").rglob("*") if f.is_file()) / 1e9,
    )
    if args.export:
        back = work / f"back_{layers}"
        rc, xrss, xsecs, xerr = run_measured(
            [
                sys.executable,
                "-m",
                "hunyuan_jax.cli.convert",
                "jax-to-hf",
                "--ckpt",
                str(out),
                "--out",
                str(back),
                "--no-progress",
            ],
            env,
        )
        m = re.search(r"peak RSS (\d+) MB", xerr)
        xrss = max(xrss, int(m.group(1)) * 10**6 if m else 0)
        if rc:
            return None
        row.update(export_mb_s=size / 1e6 / xsecs, export_rss_mb=xrss / 1e6)
        shutil.rmtree(back)
    shutil.rmtree(out)
    return row


if __name__ == "__main__":
    sys.exit(main())
