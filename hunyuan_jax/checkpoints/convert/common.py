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


# ----------------------------------------------------------------------------- transforms
def transpose2d(a: np.ndarray, block: int = 128) -> np.ndarray:
    """Contiguous `a.T` of a 2-D array, copied in cache-sized tiles (numpy's plain transposing
    copy of 2-byte elements runs at a fraction of memory bandwidth)."""
    rows, cols = a.shape
    out = np.empty((cols, rows), a.dtype)
    if rows * cols <= block * block:
        out[...] = a.T
        return out
    for r in range(0, rows, block):
        src = a[r : r + block]
        for c in range(0, cols, block):
            out[c : c + block, r : r + block] = src[:, c : c + block].T
    return out


def to_slice(entry: hf_mapping.TensorMap, tensor: np.ndarray, tree_shape, dtype) -> np.ndarray:
    """`hf_mapping.to_tree_slice(entry, tensor, tree_shape).astype(dtype)`, contiguous, with a
    tiled transpose, casting on the side of the smaller itemsize."""
    shape = hf_mapping.slice_shape(entry, tree_shape)
    dtype = np.dtype(dtype)
    if not entry.transpose:
        return np.ascontiguousarray(tensor.astype(dtype, copy=False)).reshape(shape)
    t = tensor.reshape(tensor.shape[0], -1)
    if dtype.itemsize < t.dtype.itemsize:
        return transpose2d(t.astype(dtype)).reshape(shape)
    return transpose2d(t).astype(dtype, copy=False).reshape(shape)


def to_hf(entry: hf_mapping.TensorMap, tree_slice: np.ndarray, dtype) -> np.ndarray:
    """`hf_mapping.to_hf_tensor(entry, tree_slice).astype(dtype)` with a tiled transpose."""
    dtype = np.dtype(dtype)
    if not entry.transpose:
        return np.ascontiguousarray(tree_slice.astype(dtype, copy=False))
    s = tree_slice.shape
    t = tree_slice.reshape(math.prod(s[: entry.in_ndim]), math.prod(s[entry.in_ndim :]))
    if dtype.itemsize < t.dtype.itemsize:
        return transpose2d(t.astype(dtype))
    return transpose2d(t).astype(dtype, copy=False)


# ----------------------------------------------------------------------------- quantized slices
def hf_scale(entry: hf_mapping.TensorMap, scale, tree_shape, key: str = "tensor") -> np.ndarray:
    """An FP8 release's `weight_scale` (per tensor: one value; per output channel: `out`
    values, shape [out] or [out, 1]) as the channelwise float32 scale of the weight's slice in
    our tree: 1 on the HF `in` dims (what the matmul contracts), the `out` dims whole. A
    per-tensor scale is broadcast, so both scale layouts give the one layout of
    `hunyuan_jax.model.quantize`."""
    sl = hf_mapping.slice_shape(entry, tree_shape)
    shape = (1,) * entry.in_ndim + tuple(sl[entry.in_ndim :])
    scale = np.asarray(scale, np.float32)
    if scale.size == 1:
        return np.full(shape, scale.reshape(()), np.float32)
    if scale.size == math.prod(shape):
        return np.ascontiguousarray(scale.reshape(shape))
    raise CheckpointError(
        f"{key}: weight_scale of shape {scale.shape} fits neither per-tensor (1 value) nor "
        f"per-output-channel ({math.prod(shape)} values) scaling of its weight"
    )


def _row_scale(scale, tensor: np.ndarray, key: str) -> np.ndarray:
    """An FP8 scale broadcastable against the HF tensor [out, in]."""
    scale = np.asarray(scale, np.float32)
    if scale.size == 1:
        return scale.reshape(())
    if tensor.ndim >= 1 and scale.size == tensor.shape[0]:
        return scale.reshape((-1,) + (1,) * (tensor.ndim - 1))
    raise CheckpointError(
        f"{key}: weight_scale of shape {scale.shape} does not fit weight {tensor.shape} "
        f"(expected per-tensor or per-output-channel)"
    )


def hf_slice(
    entry: hf_mapping.TensorMap,
    tensor: np.ndarray,
    tree_shape,
    form: str,
    scale=None,
    float_dtype=np.float32,
    key: str = "tensor",
) -> dict[str, np.ndarray]:
    """One HF tensor as its slice of the tree leaf in `form`: {"value": ...} for 'float'
    (`float_dtype`) or 'bf16'; {"qvalue": ..., "scale": ...} (`hunyuan_jax.model.quantize`'s layout,
    scale 1 on the `in` dims) for 'int8' / 'fp8'. `scale`: the tensor's `weight_scale` when it
    is an FP8 release's float8 weight. FP8 into 'fp8' keeps the stored values and scale (no
    float copy); anything else is dequantized / read in float32 and quantized."""
    from hunyuan_jax.model import quantize

    if scale is not None and form == "fp8" and tensor.dtype == quantize.QTYPES["fp8"]:
        q = to_slice(entry, tensor, tree_shape, tensor.dtype)
        return {"qvalue": q, "scale": hf_scale(entry, scale, tree_shape, key)}
    if scale is not None:
        tensor = quantize.dequantize_numpy(tensor, _row_scale(scale, tensor, key))
    if form not in quantize.QUANTIZED:
        dtype = DTYPES["bfloat16"] if form == "bf16" else float_dtype
        return {"value": to_slice(entry, tensor, tree_shape, dtype)}
    w = to_slice(entry, tensor, tree_shape, np.float32)
    q, s = quantize.quantize_numpy(w, tuple(range(entry.in_ndim)), form)
    return {"qvalue": q, "scale": s}


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
    for `leaves` from `checkpoint_format.param_leaves` (a quantized weight's leaf is its
    values; `checkpoint_format.scale_leaf` finds its scales)."""
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
    from tqdm import tqdm

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
