"""An FP8 release's weight scales, in one place: which tensors have them, what they are called,
how a weight is dequantised with its scale and how a scale fits our quantized layout.

The AutoFP8 / vLLM "fp8" format (`quantization_config.quant_method: fp8` in config.json):
float8 (e4m3) `*.weight` tensors, each with a float32 `*.weight_scale`, per tensor (one value)
or per output channel (`out` values, shape [out] or [out, 1]); side tensors with static
activation and KV-cache scales (`*.input_scale`, `*.k_scale`, ...) hold no parameter of ours and
are dropped. A weight is dequantised as `weight.astype(float32) * weight_scale` (`dequantize`);
read as stored, its scale becomes the channelwise scale of `hunyuan_jax.model.quantize`
(`channel_scale`, placed in our tree by `hf_tensors.hf_scale`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from hunyuan_jax.errors import CheckpointError

FP8_DTYPES = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
WEIGHT_SCALE = ".weight_scale"
# Quantisation side tensors of the format; weight scales are consumed by dequantisation,
# activation and KV-cache scales are dropped.
SIDE_SUFFIXES = (
    WEIGHT_SCALE,
    ".input_scale",
    ".output_scale",
    ".k_scale",
    ".v_scale",
    ".kv_scale",
)


def is_fp8_release(hf_config: Mapping) -> bool:
    """Whether a Hugging Face config.json describes an FP8 release."""
    quant = hf_config.get("quantization_config") or {}
    return str(quant.get("quant_method", "")).lower() == "fp8"


def is_fp8(dtype) -> bool:
    return np.dtype(dtype) in FP8_DTYPES


def scale_key(key: str) -> str:
    """`x.weight` -> `x.weight_scale` (the AutoFP8 naming)."""
    return key + "_scale"


def is_side_tensor(key: str) -> bool:
    """A quantisation side tensor (a weight, activation or KV-cache scale), not a parameter."""
    return key.endswith(SIDE_SUFFIXES)


def scale_problem(key: str, infos: Mapping) -> str | None:
    """What is wrong with tensor `key` of an FP8 release (`infos`: key -> `TensorInfo`), or
    None: a weight scale needs its FP8 weight, an FP8 weight its scale."""
    info = infos[key]
    if key.endswith(WEIGHT_SCALE):
        w = key[: -len("_scale")]
        if w not in infos or not is_fp8(infos[w].dtype):
            return f"{key!r} in {info.file}: a weight scale without an FP8 weight {w!r}"
    elif not is_side_tensor(key) and is_fp8(info.dtype) and scale_key(key) not in infos:
        return f"FP8 tensor {key!r} in {info.file} has no {scale_key(key)!r}"
    return None


def row_scale(scale, weight_shape, key: str = "tensor") -> np.ndarray:
    """A weight scale as float32 broadcastable against its HF weight [out, ...]: one value, or
    one per output channel (shape [out, 1, ...]); CheckpointError for any other size."""
    scale = np.asarray(scale, np.float32)
    if scale.size == 1:
        return scale.reshape(())
    if len(weight_shape) >= 1 and scale.size == weight_shape[0]:
        return scale.reshape((-1,) + (1,) * (len(weight_shape) - 1))
    raise CheckpointError(
        f"{key}: weight_scale of shape {scale.shape} does not fit weight {tuple(weight_shape)} "
        f"(expected per-tensor or per-output-channel)"
    )


def dequantize(
    weight: np.ndarray,
    scale,
    dtype=ml_dtypes.bfloat16,
    key: str = "tensor",
    block_elems: int = 1 << 24,
) -> np.ndarray:
    """FP8 weight [out, ...] times its scale (`row_scale`), in float32, rounded to `dtype`;
    done in row blocks to bound memory."""
    s = row_scale(scale, weight.shape, key)
    if weight.ndim == 0:
        return (weight.astype(np.float32) * s).astype(dtype)
    out = np.empty(weight.shape, dtype)
    rows = max(1, block_elems // max(1, math.prod(weight.shape[1:])))
    for r in range(0, weight.shape[0], rows):
        f = s[r : r + rows] if s.ndim else s
        out[r : r + rows] = (weight[r : r + rows].astype(np.float32) * f).astype(dtype)
    return out


def channel_scale(scale, shape, key: str = "tensor") -> np.ndarray:
    """A weight scale as the float32 array `shape` of our channelwise scale (1 on the
    contracted dims, the output channels whole): a per-tensor scale is broadcast, so both scale
    layouts give the one layout of `hunyuan_jax.model.quantize`."""
    scale = np.asarray(scale, np.float32)
    if scale.size == 1:
        return np.full(shape, scale.reshape(()), np.float32)
    if scale.size == math.prod(shape):
        return np.ascontiguousarray(scale.reshape(shape))
    raise CheckpointError(
        f"{key}: weight_scale of shape {scale.shape} fits neither per-tensor (1 value) nor "
        f"per-output-channel ({math.prod(shape)} values) scaling of its weight"
    )
