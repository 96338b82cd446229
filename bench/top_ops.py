"""Where the time of a profiled program goes, op by op: the XLA ops of a jax.profiler trace
(`train.py --profile-steps A:B` writes one to <run>/profile), summed over their executions and
ranked, with each op's JAX name (e.g. `transpose(jvp())/while/body/.../ecd,edf->ecf`) and
shape when the optimised HLO is given, and a breakdown by kind (matmuls, weight-slice copies,
layout copies, selects, ...). This is how docs/performance.md's tables were made.

    XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text" \\
        python train.py --config configs/small.yaml --profile-steps 3:3 --set steps=3
    python -m bench.top_ops runs/small/profile --hlo /tmp/hlo --top 30

Reading the trace needs `xprof` (the `profile` extra, TensorBoard's profile plugin; not a core
dependency); without it this says so and exits 2.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

_META = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*?op_name=\"([^\"]*)\"")


def op_events(trace_dir: Path) -> list[dict]:
    """The XLA op executions (trace events that name an `hlo_op`) of the traces in trace_dir."""
    from xprof.convert import raw_to_tool_data

    paths = sorted(str(p) for p in Path(trace_dir).rglob("*.xplane.pb"))
    if not paths:
        raise SystemExit(f"top_ops: no *.xplane.pb under {trace_dir}")
    data, _ = raw_to_tool_data.xspace_to_tool_data(paths, "trace_viewer", {})
    events = json.loads(data)["traceEvents"]
    return [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]


def hlo_names(hlo: Path | None) -> dict[tuple[str, str], tuple[str, str]]:
    """{(module, op): (shape, JAX op_name)} from optimised HLO text (a file, or a --xla_dump_to
    directory's *after_optimizations.txt)."""
    if hlo is None:
        return {}
    files = [hlo] if hlo.is_file() else sorted(hlo.glob("*after_optimizations.txt"))
    out = {}
    for f in files:
        module = ""
        for line in f.read_text().splitlines():
            if line.startswith("HloModule "):
                module = line.split()[1].rstrip(",")
                continue
            mm = _META.match(line)
            if mm:
                out[(module, mm.group(1))] = (mm.group(2), mm.group(3))
    return out


def kind(op: str, name: str) -> str:
    """A coarse class of an op from its HLO name and JAX op_name."""
    if op.startswith(("ynn_fusion", "dot", "xnn_fusion")) or "dot_general" in name:
        return "matmul"
    if "dynamic-slice" in op or "dynamic_slice" in name:
        return "weight slice copy (scan / expert index)"
    if "dynamic-update-slice" in op or "dynamic_update" in name:
        return "dynamic-update-slice (scan outputs / grads)"
    if "select" in op or "select_n" in name:
        return "select (masks, where)"
    if op.startswith("copy") or "transpose" in name:
        return "layout copy / transpose"
    if "scatter" in op or "gather" in op:
        return "gather / scatter"
    if op.startswith(("reduce", "wrapped_reduce")) or "reduce" in name:
        return "reduction"
    return "other elementwise / fusion"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace_dir", type=Path, help="a jax.profiler trace directory")
    ap.add_argument("--hlo", type=Path, default=None, help="optimised HLO text file or dump dir")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    try:
        events = op_events(args.trace_dir)
    except ImportError:
        print("top_ops: needs xprof (pip install xprof), not installed", file=sys.stderr)
        return 2
    names = hlo_names(args.hlo)
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        key = (e["args"].get("hlo_module", ""), e["args"]["hlo_op"])
        total[key] += e.get("dur", 0.0)
        count[key] += 1
    grand = sum(total.values()) or 1.0
    print(f"{len(events)} op executions, {grand / 1e3:.1f} ms of op time (all threads)\n")
    print("| ms | % | runs | program | op | shape | JAX op |\n|---|---|---|---|---|---|---|")
    for key, us in total.most_common(args.top):
        shape, name = names.get(key, ("", ""))
        print(
            f"| {us / 1e3:.1f} | {100 * us / grand:.1f} | {count[key]} | {key[0]} | {key[1]} | "
            f"{shape} | "
            f"{name[-90:]} |"
        )
    kinds = collections.Counter()  # (program, kind)
    for key, us in total.items():
        _, name = names.get(key, ("", ""))
        kinds[(key[0], kind(key[1], name))] += us
    print("\n| program | kind | ms | % |\n|---|---|---|---|")
    for (prog, k), us in sorted(kinds.items(), key=lambda kv: (kv[0][0], -kv[1])):
        print(f"| {prog} | {k} | {us / 1e3:.1f} | {100 * us / grand:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
