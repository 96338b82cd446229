"""Synthetic Hugging Face checkpoints for the converter's tests and bench/convert.py: a config
of Hunyuan-Large's structure at any size (`synthetic_config`), random weights for it written
one tensor at a time (`write_synthetic_hf`), or given tensors as a sharded safetensors
checkpoint (`write_hf`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from hunyuan_jax.checkpoints import converted as fmt
from hunyuan_jax.checkpoints.convert import write_safetensors
from hunyuan_jax.checkpoints.convert.common import HF_INDEX, hf_order, hf_tensors, np_dtype
from hunyuan_jax.model.config import ModelConfig

HY_TINY_CONFIG = (
    Path(__file__).resolve().parents[2]
    / "hunyuan_jax"
    / "assets"
    / "hy_tiny"
    / "hf_st"
    / "config.json"
)


def synthetic_config(
    layers: int,
    hidden: int,
    intermediate: int,
    experts: int = 4,
    vocab: int = 4096,
    heads: int | None = None,
    kv_heads: int | None = None,
    **changes,
) -> dict:
    """An HF config.json of Hunyuan-Large's structure (CLA 2, QK-norm, shared expert: the
    tiny reference's), resized; heads default to hidden // 128, KV heads to hidden // 512."""
    base = json.loads(HY_TINY_CONFIG.read_text())
    return dict(
        base,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads or max(1, hidden // 128),
        num_key_value_heads=kv_heads or max(1, hidden // 512),
        num_experts=experts,
        vocab_size=vocab,
        **changes,
    )


def _shard_groups(tensors, shard_bytes: int):
    shards, cur, size = [], [], 0
    for t in tensors:
        n = math.prod(t[2]) * np.dtype(t[1]).itemsize
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += n
    return shards + [cur] if cur else shards


def _write_shards(directory: Path, shards, produce) -> int:
    weight_map, total = {}, 0
    for i, group in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(directory / name, group, produce)
        weight_map.update({k: name for k, _, _ in group})
    (directory / HF_INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total


def write_synthetic_hf(
    directory: str | Path,
    hf_config: dict,
    dtype: str = "bfloat16",
    shard_bytes: int = 1 << 30,
    seed: int = 0,
) -> int:
    """A random HF safetensors checkpoint for `hf_config`, written one tensor at a time from a
    pool of random bytes (memory: the largest tensor, whatever the size). Returns its size in
    bytes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(dict(hf_config, torch_dtype=dtype)))
    cfg = ModelConfig.from_hf(directory)
    np_type = np_dtype(dtype)
    items = hf_tensors(cfg, fmt.param_leaves(cfg, dtype))
    tensors = sorted(((k, np_type, v[3]) for k, v in items.items()), key=lambda t: hf_order(t[0]))
    shapes = {k: s for k, _, s in tensors}
    rng = np.random.default_rng(seed)
    largest = max(math.prod(s) for s in shapes.values())
    # Finite values (random normal) so that casts behave; a pool reused at random offsets.
    pool = (rng.standard_normal(largest + 4096, np.float32) * 0.02).astype(np_type)

    def produce(key):
        o = int(rng.integers(0, 4096))
        return pool[o : o + math.prod(shapes[key])].reshape(shapes[key])

    return _write_shards(directory, _shard_groups(tensors, shard_bytes), produce)


def write_hf(directory: Path, tensors: dict, config: dict, shards: int = 2) -> Path:
    """A safetensors HF checkpoint of `tensors` in `shards` files plus index and config."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    keys = list(tensors)
    per = -(-len(keys) // shards)
    groups = [
        [(k, tensors[k].dtype, tensors[k].shape) for k in keys[i * per : (i + 1) * per]]
        for i in range(shards)
    ]
    _write_shards(directory, [g for g in groups if g], lambda k: tensors[k])
    return directory
