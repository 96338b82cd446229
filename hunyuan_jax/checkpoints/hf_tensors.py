"""An HF tensor as its slice of our tree, fast, and an FP8 release's weights and scales in our
quantized layout: what the loader and the converter both read HF shards through.

The transforms are `hf_mapping.to_tree_slice` / `to_hf_tensor` made fast (tiled transpose +
cast; checked equal to them in tests/test_convert.py); `hf_mapping` stays the one table between
HF keys and our tree. An FP8 release's `weight_scale` becomes the channelwise scale of
`hunyuan_jax.model.quantize` here (`hf_scale`, `hf_slice`; the scales' format: `fp8_scales`).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from hunyuan_jax.checkpoints import fp8_scales, hf_mapping
from hunyuan_jax.model import quantize

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


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
    """An FP8 release's `weight_scale` as the channelwise float32 scale of the weight's slice
    in our tree (`fp8_scales.channel_scale`): 1 on the HF `in` dims (what the matmul
    contracts), the `out` dims whole."""
    sl = hf_mapping.slice_shape(entry, tree_shape)
    shape = (1,) * entry.in_ndim + tuple(sl[entry.in_ndim :])
    return fp8_scales.channel_scale(scale, shape, key)


def hf_slice(
    entry: hf_mapping.TensorMap,
    tensor: np.ndarray,
    tree_shape,
    form: str,
    scale=None,
    float_dtype=np.float32,
    key: str = "tensor",
    scale_shape=None,
) -> dict[str, np.ndarray]:
    """One HF tensor as its slice of the tree leaf in `form`: {"value": ...} for 'float'
    (`float_dtype`) or 'bf16'; {"qvalue": ..., "scale": ...} (`hunyuan_jax.model.quantize`'s layout,
    scale 1 on the `in` dims) for 'int8' / 'fp8', and for 'int4' (grouped along the `in` dims
    as the scale leaf of shape `scale_shape` is; 'int4-experts': int4 for a routed expert's
    tensor, else int8). `scale`: the tensor's `weight_scale` when it is an FP8 release's float8
    weight. FP8 into 'fp8' keeps the stored values and scale (no float copy); anything else is
    dequantized / read in float32 and quantized."""
    if form in quantize.QUANTIZED:
        form = quantize.weight_form(form, routed=bool(entry.per_expert))
    if scale is not None and form == "fp8" and tensor.dtype == quantize.QTYPES["fp8"]:
        q = to_slice(entry, tensor, tree_shape, tensor.dtype)
        return {"qvalue": q, "scale": hf_scale(entry, scale, tree_shape, key)}
    if scale is not None:
        tensor = fp8_scales.dequantize(tensor, scale, np.float32, key)
    if form not in quantize.QUANTIZED:
        dtype = BFLOAT16 if form == "bf16" else float_dtype
        return {"value": to_slice(entry, tensor, tree_shape, dtype)}
    w = to_slice(entry, tensor, tree_shape, np.float32)
    tiles = None
    if form == "int4":  # the scale leaf's groups: one tile per dim of the slice
        sl = hf_mapping.slice_shape(entry, scale_shape)
        tiles = tuple(d // s for d, s in zip(w.shape, sl))
    q, s = quantize.quantize_numpy(w, tuple(range(entry.in_ndim)), form, tiles)
    return {"qvalue": q, "scale": s}
