"""Compiling a program and reading what XLA says about it: per-chip memory, the compiler's
out-of-memory verdict (`hunyuan_jax.errors.DoesNotFit`), its dump directory (largest buffers,
optimized HLO) and the check for hoisted casts of stacked weights.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import time

import jax

from hunyuan_jax.aot.programs import Program
from hunyuan_jax.errors import DoesNotFit

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Memory:
    """XLA's per-chip memory of a compiled program, in bytes."""

    argument: int
    output: int
    alias: int
    temp: int
    code: int

    @property
    def total(self) -> int:
        """The peak: arguments + outputs - aliased (donated) + temporaries + code."""
        return self.argument + self.output - self.alias + self.temp + self.code

    @classmethod
    def of(cls, compiled) -> Memory:
        m = compiled.memory_analysis()
        return cls(
            int(m.argument_size_in_bytes),
            int(m.output_size_in_bytes),
            int(m.alias_size_in_bytes),
            int(m.temp_size_in_bytes),
            int(m.generated_code_size_in_bytes),
        )

    def gib(self) -> dict[str, float]:
        values = dict(
            arguments=self.argument,
            outputs=self.output,
            aliased=self.alias,
            temporaries=self.temp,
            code=self.code,
            total=self.total,
        )
        return {k: round(v / GiB, 3) for k, v in values.items()}


_SIZE = r"([\d.]+)\s*([GMK])i?B?"
_OOM_PATTERNS = (
    re.compile(rf"required for [^(]*\({_SIZE}\)\s*exceeds available HBM \({_SIZE}\)"),
    re.compile(rf"Used {_SIZE} of {_SIZE} hbm"),
    re.compile(rf"requires? {_SIZE}.*?(?:available|limit|capacity)\D*?{_SIZE}", re.S),
)
_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "HbmOom", "out of memory")


def parse_oom(text: str) -> tuple[float | None, float | None]:
    """(required GiB, available GiB) from XLA:TPU's out-of-memory message ('G' is GiB)."""
    unit = {"G": 1.0, "M": 1 / 1024, "K": 1 / 2**20}
    for pattern in _OOM_PATTERNS:
        m = pattern.search(text)
        if m:
            return (float(m.group(1)) * unit[m.group(2)], float(m.group(3)) * unit[m.group(4)])
    return None, None


def compile_program(program: Program) -> tuple[jax.stages.Compiled, float, float]:
    """(compiled, lower seconds, compile seconds). The compiler's out-of-memory error becomes
    DoesNotFit with the sizes it names; any other compile error propagates (a bug)."""
    t0 = time.perf_counter()
    lowered = program.lower()
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # XlaRuntimeError RESOURCE_EXHAUSTED
        text = str(e)
        if not any(marker in text for marker in _OOM_MARKERS):
            raise
        need, have = parse_oom(text)
        first = text.strip().splitlines()[0] if text.strip() else repr(e)
        raise DoesNotFit(first[:400], need, have) from None
    return compiled, t1 - t0, time.perf_counter() - t1


def enable_dump(directory: str) -> None:
    """Ask XLA to dump every module (HLO text, memory-usage report) into `directory`. Must run
    before the process's first compile: XLA reads XLA_FLAGS once."""
    os.makedirs(directory, exist_ok=True)
    flags = f" --xla_dump_to={directory} --xla_dump_hlo_as_text"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + flags).strip()


def read_dump(directory: str, since: float, top: int = 12) -> tuple[str, list[str]]:
    """(optimized HLO text, the `top` largest rows of the memory-usage report) of the biggest
    module XLA dumped into `directory` after `since` (our program)."""
    reports = [
        p
        for p in glob.glob(os.path.join(directory, "*memory-usage-report.txt"))
        if os.path.getmtime(p) >= since - 1
    ]
    if not reports:
        return "", []

    def hlo_path(report: str) -> str:
        return report.replace("-memory-usage-report.txt", ".txt")

    report = max(
        reports, key=lambda p: os.path.getsize(hlo_path(p)) if os.path.exists(hlo_path(p)) else 0
    )
    rows = []
    with open(report) as fh:
        for line in fh:
            if len(rows) >= top:
                break
            if re.match(r"\s*[\d.]+[KMG]?i?B\(", line.strip()):
                parts = [x.strip() for x in line.split(";")]
                if len(parts) >= 5:
                    rows.append(f"{parts[1]:>10}  {parts[4][:110]}")
    hlo = ""
    if os.path.exists(hlo_path(report)):
        with open(hlo_path(report)) as fh:
            hlo = fh.read()
    return hlo, rows


def stacked_cast_copies(hlo_text: str, params, dtype: str = "bf16") -> dict[str, list[int]]:
    """Full `dtype` copies of stacked (scanned) parameters made outside the layer loops.

    Inside the layer scan each iteration should cast only its own group's slice. If XLA
    hoists the fp32 -> bf16 cast of the stacked weights out of the loop (SPEC 7), the entry
    computation of the optimized HLO defines a `dtype` array with the stacked per-device shape
    [groups, ...] (a convert, or a fusion / copy producing one): a second copy of those weights
    held across the loops. Only meaningful when the parameters are stored in a wider dtype than
    `dtype` (else the parameters themselves match). Returns {shape: [copies, bytes]}."""
    shapes = {}
    for leaf in jax.tree.leaves(params):
        if leaf.sharding is None or len(leaf.shape) < 3:
            continue
        local = leaf.sharding.shard_shape(leaf.shape)
        shapes[",".join(map(str, local))] = math.prod(local)
    width = {"bf16": 2, "f16": 2, "f32": 4}[dtype]
    entry = re.search(r"^ENTRY .*?^}", hlo_text, re.M | re.S)
    found: dict[str, list[int]] = {}
    if entry is None:
        return found
    definition = rf"^\s*%\S+ = {dtype}\[([\d,]+)\]\S* (?:convert|fusion|copy)\("
    for m in re.finditer(definition, entry.group(0), re.M):
        dims = m.group(1)
        if dims in shapes:
            count, size = found.get(dims, [0, 0])
            found[dims] = [count + 1, size + shapes[dims] * width]
    return found
