"""Communication in the step-time model: the collectives of a compiled program, from its
optimized HLO text (`compiled.as_text()`), as bytes each chip sends per step and the time they
take at the chip's ICI bandwidth.

Every all-gather, all-reduce, reduce-scatter, all-to-all and collective-permute (and their
async `-start` forms; `-done` moves nothing) is counted once per execution: the computations
are walked from ENTRY through the call graph, a while body runs `known_trip_count` times (the
annotation XLA's trip-count analysis writes into the while's backend_config, else the bound of
a `compare(i, constant(N)), direction=LT` condition; a loop whose count neither gives is
counted once and listed in `unknown_trip_counts`), both branches of a conditional are counted
(an upper bound), and async wrappers / fusions / calls run as often as their caller.

Bytes a chip sends for one op over a group of n chips (ring algorithms, the bandwidth-optimal
lower bound on what crosses its links):

| op | from the op's per-chip result R | bytes sent |
|---|---|---|
| all-gather | R = the gathered array | R (n-1)/n |
| reduce-scatter | R = the chip's shard of the sum | R (n-1) |
| all-reduce | R = the reduced array | 2 R (n-1)/n |
| all-to-all | R = the exchanged array | R (n-1)/n |
| collective-permute | R = the array sent | R |

The time model divides the total by the chip's ICI bandwidth (all its links busy, both
directions counted once: the Cloud TPU "inter-chip interconnect bandwidth" per chip). That is
optimistic: a collective over one mesh axis that maps to one torus dimension uses 2 of the
chip's 4 (2D torus) or 6 (3D torus) links, so `ici_time_one_axis_s` (= the same bytes over 2
links) is given as the pessimistic end. Latency, overlap with compute and DCN (multi-slice)
are not modelled.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

OPS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_BYTES = {
    "pred": 1,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "f8e4m3": 1,
    "f8e4m3fnuz": 1,
    "f8e5m2fnuz": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLEES = re.compile(
    r"\b(calls|to_apply|body|condition|branch_computations|true_computation|"
    r"false_computation)=(\{[^}]*\}|%?[\w.\-]+)"
)
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')


def array_bytes(type_text: str) -> list[float]:
    """Bytes of each array in an HLO type ('f32[4,8]{1,0}' or a tuple of them), in order."""
    out = []
    for dtype, dims in _ARRAY.findall(type_text):
        if dtype not in _BYTES:
            continue
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        out.append(n * _BYTES[dtype])
    return out


def _split_type(rest: str) -> tuple[str, str]:
    """'TYPE opcode(...)...' -> (TYPE, the text from the opcode on); TYPE may be a tuple."""
    rest = rest.strip()
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].strip()
    head, _, tail = rest.partition(" ")
    return head, tail.strip()


def _top_level(type_text: str) -> list[str]:
    """The top-level elements of a tuple type ('(a, (b, c))' -> ['a', '(b, c)'])."""
    t = type_text.strip()
    if not t.startswith("("):
        return [t]
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(t):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if (ch == "," and depth == 1) or (depth == 0 and i == len(t) - 1):
            parts.append(t[start:i].strip())
            start = i + 1
    return [p for p in parts if p]


def group_size(attrs: str, num_devices: int) -> int:
    """Chips in one replica group of a collective (its `replica_groups`)."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:  # mesh['a'=8,'b'=2] {'a'}: the product of the named axes
        sizes = dict(re.findall(r"'([^']+)'\s*=\s*(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)))
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
    if m:  # iota form [groups, size]<=[...]
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
    if m:
        return len([x for x in m.group(1).split(",") if x.strip()])
    return num_devices  # replica_groups={} or absent: every device


def _op_bytes(op: str, start: bool, type_text: str, n: int) -> float:
    """Bytes one chip sends for one execution of the op (see the table above)."""
    parts = _top_level(type_text)
    if start and op == "all-gather" and len(parts) >= 2:
        result = sum(array_bytes(parts[len(parts) // 2 :][0]))  # (operands, outputs)
    elif start and op == "collective-permute":
        result = sum(array_bytes(parts[0])[:1])  # (operand, output, contexts)
    else:
        result = sum(array_bytes(type_text))
    if op == "collective-permute":
        return result
    if n <= 1:
        return 0.0
    factor = {"all-gather": (n - 1) / n, "reduce-scatter": n - 1, "all-reduce": 2 * (n - 1) / n}
    return result * factor.get(op, (n - 1) / n)


def parse_computations(hlo: str) -> tuple[str | None, dict[str, list[str]]]:
    """(ENTRY name, {computation: its instruction lines}) of an HLO module's text."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
        else:
            comps[current].append(line)
    return entry, comps


def _trip_count(line: str, comps: dict[str, list[str]], condition: str | None) -> int | None:
    m = _TRIP.search(line)
    if m:
        return int(m.group(1))
    if condition and condition in comps:  # i < N with a constant N
        consts = {}
        for ins in comps[condition]:
            c = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*s32\[\]\S*\s+constant\((\d+)\)", ins)
            if c:
                consts[c.group(1)] = int(c.group(2))
        for ins in comps[condition]:
            if " compare(" in ins and "direction=LT" in ins:
                args = re.search(r"compare\(([^)]*)\)", ins).group(1)
                names = [a.strip().lstrip("%").split(" ")[-1].lstrip("%") for a in args.split(",")]
                if len(names) == 2 and names[1] in consts:
                    return consts[names[1]]
    return None


def collective_bytes(hlo: str, num_devices: int) -> dict:
    """Per-chip bytes sent per step by every collective of an optimized HLO module.

    Returns {'total_bytes', 'by_op': {op: {'count', 'bytes'}}, 'by_group': {n: bytes},
    'rows': [(bytes per step, op, result type, group, executions)...] largest first,
    'largest': the first 8 rows,
    'unknown_trip_counts': [while names], 'loops': {while name: trip count}}."""
    entry, comps = parse_computations(hlo)
    if entry is None:
        return {
            "error": "no optimized HLO text (XLA:TPU cannot print this executable; run the "
            "tool as its own process, or with --dump DIR)"
        }
    runs: dict[str, float] = defaultdict(float)
    unknown, loops = [], {}

    def visit(comp: str, times: float, depth: int = 0) -> None:
        if comp not in comps or depth > 64:
            return
        runs[comp] += times
        for line in comps[comp]:
            callees = _CALLEES.findall(line)
            if not callees:
                continue
            named = {k: re.findall(r"%?([\w.\-]+)", v.strip("{}")) for k, v in callees}
            if " while(" in line:
                cond = (named.get("condition") or [None])[0]
                n = _trip_count(line, comps, cond)
                name = _INSTR.match(line).group(1)
                if n is None:
                    unknown.append(name)
                loops[name] = n
                for body in named.get("body", []):
                    visit(body, times * (n if n is not None else 1), depth + 1)
                continue
            for key, names in named.items():
                if key == "to_apply" and not re.search(r"\b(call|async-start)\(", line):
                    continue  # reductions' scalar computations
                for callee in names:
                    visit(callee, times, depth + 1)

    visit(entry, 1.0)
    by_op: dict[str, dict[str, float]] = {op: {"count": 0, "bytes": 0.0} for op in OPS}
    by_group: dict[int, float] = defaultdict(float)
    rows = []
    op_re = re.compile(r"^(" + "|".join(OPS) + r")(-start)?\(")
    for comp, times in runs.items():
        for line in comps[comp]:
            m = _INSTR.match(line)
            if not m:
                continue
            type_text, rest = _split_type(m.group(2))
            o = op_re.match(rest)
            if not o:
                continue
            op, start = o.group(1), bool(o.group(2))
            n = group_size(rest, num_devices)
            sent = _op_bytes(op, start, type_text, n) * times
            by_op[op]["count"] += times
            by_op[op]["bytes"] += sent
            by_group[n] += sent
            rows.append((sent, op, type_text[:80], n, times))
    rows.sort(key=lambda r: -r[0])
    return {
        "total_bytes": sum(v["bytes"] for v in by_op.values()),
        "by_op": {k: v for k, v in by_op.items() if v["count"]},
        "by_group": dict(sorted(by_group.items())),
        "largest": rows[:8],
        "rows": rows,
        "unknown_trip_counts": unknown,
        "loops": loops,
    }


def comm_model(hlo: str, num_devices: int, chip) -> dict:
    """`collective_bytes` plus the time at the chip's ICI bandwidth (None without a chip)."""
    out = collective_bytes(hlo, num_devices)
    if "error" not in out and chip is not None and getattr(chip, "ici_bytes_per_s", None):
        out["ici_bytes_per_s"] = chip.ici_bytes_per_s
        out["ici_time_s"] = out["total_bytes"] / chip.ici_bytes_per_s
        out["ici_time_one_axis_s"] = out["ici_time_s"] * chip.ici_links / 2
    return out
