"""Creating the model's parameter state: abstract (shapes only), random, or from a Hugging Face
checkpoint; on one device or directly in its sharded layout over a mesh.

Sharded creation runs the initialiser under `jax.jit` with the rules' output shardings, so each
device only ever materialises its own shards: no host holds the full tree.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hunyuan_jax.config import ModelConfig
from hunyuan_jax.hf_checkpoint import HFCheckpoint, load_numpy_params
from hunyuan_jax.model import HunyuanForCausalLM


def abstract_model(cfg: ModelConfig, rules=None) -> HunyuanForCausalLM:
    """The model with ShapeDtypeStructs instead of arrays (no memory, no compute)."""
    return nnx.eval_shape(lambda: HunyuanForCausalLM(cfg, rngs=nnx.Rngs(0), rules=rules))


def flat_shapes(model: nnx.Module) -> dict[tuple, tuple[int, ...]]:
    """{parameter path: shape}, e.g. ('groups', 'layers', 0, 'attn', 'q_proj'): (G, D, H, Dh)."""
    return {path: tuple(var.shape) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def param_count(model: nnx.Module) -> int:
    return sum(int(np.prod(s)) for s in flat_shapes(model).values())


def init_model(cfg: ModelConfig, seed: int = 0, mesh=None, rules=None) -> HunyuanForCausalLM:
    """Random parameters; with a mesh, created already sharded by `rules`."""
    graphdef, abstract_state = nnx.split(abstract_model(cfg, rules))

    def create(key):
        return nnx.state(HunyuanForCausalLM(cfg, rngs=nnx.Rngs(key), rules=rules))

    out_shardings = None
    if mesh is not None:
        from sharding.rules import state_shardings

        out_shardings = state_shardings(abstract_state, rules, mesh)
    state = jax.jit(create, out_shardings=out_shardings)(jax.random.key(seed))
    return nnx.merge(graphdef, state)


def model_from_arrays(
    cfg: ModelConfig, arrays: dict[tuple, np.ndarray], mesh=None, rules=None
) -> HunyuanForCausalLM:
    """A model whose parameters are `arrays` ({path: array}); placed by `rules` on `mesh`."""
    graphdef, abstract_state = nnx.split(abstract_model(cfg, rules))
    flat = nnx.to_flat_state(abstract_state)
    shardings = None
    if mesh is not None:
        from sharding.rules import state_shardings

        shardings = dict(nnx.to_flat_state(state_shardings(abstract_state, rules, mesh)))
    for path, var in flat:
        if path not in arrays:
            raise KeyError(f"no array for parameter {'.'.join(map(str, path))}")
        arr = arrays[path]
        if tuple(arr.shape) != tuple(var.shape):
            raise ValueError(
                f"parameter {'.'.join(map(str, path))}: array shape "
                f"{tuple(arr.shape)} != model shape {tuple(var.shape)}"
            )
        value = (
            jnp.asarray(arr, var.dtype)
            if shardings is None
            else jax.device_put(arr.astype(var.dtype), shardings[path].get_value())
        )
        var.set_value(value)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_hf_model(
    directory: str | Path, cfg: ModelConfig | None = None, mesh=None, rules=None, **overrides
) -> tuple[ModelConfig, HunyuanForCausalLM]:
    """A HF checkpoint directory (its config.json unless `cfg` is given), loaded in memory."""
    cfg = cfg or ModelConfig.from_hf(directory)
    if overrides:
        cfg = cfg.replace(**overrides)
    shapes = flat_shapes(abstract_model(cfg))
    arrays = load_numpy_params(cfg, HFCheckpoint(directory), shapes, jnp.dtype(cfg.param_dtype))
    return cfg, model_from_arrays(cfg, arrays, mesh, rules)
