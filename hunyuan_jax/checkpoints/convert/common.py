"""What both directions of the converter share: the dtypes it writes, the fast tree <-> HF tensor
transforms (tiled transpose + cast), safetensors writing, the usual HF key order, the tokenizer /
remote-code files carried along, the progress bar and the log line.

The transforms are `hf_mapping.to_tree_slice` / `to_hf_tensor` made fast (checked equal to them
in tests/test_convert.py); `hf_mapping` stays the one table between HF keys and our tree.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm import tqdm

from hunyuan_jax.checkpoints import converted as fmt
from hunyuan_jax.checkpoints import hf_mapping
from hunyuan_jax.checkpoints.shard_files import ST_DTYPE_NAMES
from hunyuan_jax.errors import CheckpointError, UsageError

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
FLOAT_DTYPES = {np.dtype(d) for d in (np.float64, np.float32, np.float16, ml_dtypes.bfloat16)}
HF_INDEX = "model.safetensors.index.json"


def np_dtype(name: str) -> np.dtype:
    """The numpy dtype of a dtype name the converter writes; UsageError for any other."""
    if name not in DTYPES:
        raise UsageError(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return np.dtype(DTYPES[name])


def default_log(msg: str) -> None:
    print(f"[convert] {msg}", file=sys.stderr, flush=True)


def own_peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM) for the manifest's stats and the final log
    line; 0 where /proc is missing. Not `ru_maxrss`: Linux carries a parent's high-water mark
    into a child across fork + exec, so a converter started by a large process would report
    the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ----------------------------------------------------------------------------- safetensors
def safetensors_header(tensors: list[tuple[str, np.dtype, tuple]]) -> tuple[bytes, int]:
    """(8-byte length + JSON header padded to 8 bytes, data bytes) for tensors in order."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for key, dtype, shape in tensors:
        n = math.prod(shape) * np.dtype(dtype).itemsize
        header[key] = {
            "dtype": ST_DTYPE_NAMES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [off, off + n],
        }
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, off


def write_safetensors(path: str | Path, tensors, produce) -> int:
    """Stream a safetensors file: `tensors` [(key, dtype, shape)], `produce(key)` -> array
    called one tensor at a time in that order. Written to `<path>.tmp` and renamed, so `path`
    is complete or absent. Returns the data size."""
    head, size = safetensors_header(tensors)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            for key, dtype, shape in tensors:
                arr = produce(key)
                if arr.dtype != np.dtype(dtype) or tuple(arr.shape) != tuple(shape):
                    raise CheckpointError(
                        f"{key}: produced {arr.dtype} {arr.shape}, header says "
                        f"{np.dtype(dtype)} {tuple(shape)}"
                    )
                f.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return size


def _natural_key(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def hf_order(key: str):
    """Sort key of the usual HF order: embed, layers 0..L-1, norm, lm_head."""
    m = re.match(r"model\.layers\.(\d+)\.(.*)", key)
    if m:
        return (1, int(m.group(1)), _natural_key(m.group(2)))
    return ({"model.embed_tokens.weight": 0, "model.norm.weight": 2}.get(key, 3), 0, [key])


def hf_tensors(cfg, leaves: dict) -> dict[str, tuple]:
    """{HF key: (leaf, mapping entry, stacked index, HF shape)} of every HF tensor of `cfg`,
    for `leaves` from `converted.param_leaves` (a quantized weight's leaf is its
    values; `converted.scale_leaf` finds its scales)."""
    out = {}
    for entry in hf_mapping.mapping_table(cfg):
        leaf = fmt.weight_leaf(leaves, entry.path)
        for index, key in hf_mapping.hf_slices(entry, cfg):
            out[key] = (leaf, entry, index, hf_mapping.hf_shape(entry, leaf.shape))
    return out


# ----------------------------------------------------------------------------- files, progress
def carried_files(*dirs) -> dict[str, Path]:
    """Tokenizer and remote-code files to carry along: {name: source path}."""
    out = {}
    for d in dirs:
        if d is None:
            continue
        d = Path(d)
        for name in fmt.TOKENIZER_FILES:
            if (d / name).is_file() and name not in out:
                out[name] = d / name
        for p in sorted(d.glob("*.py")):
            out.setdefault(p.name, p)
    return out


def progress_bar(total: int, desc: str, enabled: bool):
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        disable=not enabled,
        dynamic_ncols=True,
        smoothing=0.1,
        file=sys.stderr,
    )
