"""The one table between Hugging Face Hunyuan-Large state-dict keys and our parameter tree.

Our tree stores each weight stacked: `[groups, ...]` for per-layer weights (layer i lives at
group i // f, member i % f of `groups.layers`, f = cla_share_factor) and `[groups, experts, ...]`
for routed experts. Linear weights are `[in..., out...]` (JAX order); PyTorch stores
`[out, in]`. One `TensorMap` says how a tree leaf is filled from HF tensors, and
`hf_slices` / `to_tree_slice` / `to_hf_tensor` are the only conversions; the in-memory loader,
the streaming converter and the exporter all use them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np

from hunyuan_jax.checkpoints import fp8_scales
from hunyuan_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TensorMap:
    path: tuple  # path of the leaf in the nnx.State, e.g. ("groups", "layers", 0, "attn", "q_proj")
    hf_key: str  # template with {layer} and/or {expert}
    in_ndim: int = 1  # leading dims of the per-slice tree shape that form PyTorch's "in" side
    transpose: bool = True  # PyTorch linear weights are [out, in]
    member: int | None = None  # layer offset inside a group; None = not a per-layer weight
    per_expert: bool = False

    @property
    def name(self) -> str:
        return ".".join(str(p) for p in self.path)


def mapping_table(cfg: ModelConfig) -> list[TensorMap]:
    """Every parameter of the model, in tree order of appearance."""
    table = [TensorMap(("embed",), "model.embed_tokens.weight", transpose=False)]
    for j in range(cfg.cla_share_factor):
        layer = ("groups", "layers", j)
        hf = "model.layers.{layer}."
        t = lambda path, key, **kw: TensorMap(layer + path, hf + key, member=j, **kw)
        table += [
            t(("input_norm", "weight"), "input_layernorm.weight", transpose=False),
            t(("attn", "q_proj"), "self_attn.q_proj.weight"),
        ]
        if j == 0:
            table += [
                t(("attn", "k_proj"), "self_attn.k_proj.weight"),
                t(("attn", "v_proj"), "self_attn.v_proj.weight"),
            ]
        table += [t(("attn", "o_proj"), "self_attn.o_proj.weight", in_ndim=2)]
        if cfg.use_qk_norm:
            table += [
                t(
                    ("attn", "query_norm", "weight"),
                    "self_attn.query_layernorm.weight",
                    transpose=False,
                ),
                t(
                    ("attn", "key_norm", "weight"),
                    "self_attn.key_layernorm.weight",
                    transpose=False,
                ),
            ]
        table += [
            t(("post_attn_norm", "weight"), "post_attention_layernorm.weight", transpose=False),
            t(("moe", "router"), "mlp.gate.wg.weight"),
        ]
        if cfg.num_shared_experts:
            table += [
                t(("moe", "shared", p), f"mlp.shared_mlp.{p}.weight")
                for p in ("gate_proj", "up_proj", "down_proj")
            ]
        table += [
            t(("moe", p), "mlp.experts.{expert}." + p + ".weight", per_expert=True)
            for p in ("gate_proj", "up_proj", "down_proj")
        ]
    table.append(TensorMap(("final_norm", "weight"), "model.norm.weight", transpose=False))
    if not cfg.tie_word_embeddings:
        table.append(TensorMap(("lm_head",), "lm_head.weight"))
    return table


def slice_shape(entry: TensorMap, tree_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one HF tensor's slice of the tree leaf (drop group / expert dims)."""
    lead = (entry.member is not None) + entry.per_expert
    return tuple(tree_shape[lead:])


def hf_shape(entry: TensorMap, tree_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of one HF tensor feeding this leaf."""
    s = slice_shape(entry, tree_shape)
    if not entry.transpose:
        return s
    return (math.prod(s[entry.in_ndim :]), math.prod(s[: entry.in_ndim]))


def hf_slices(entry: TensorMap, cfg: ModelConfig) -> Iterator[tuple[tuple[int, ...], str]]:
    """(index into the tree leaf, HF key) for every HF tensor that fills this leaf."""
    f = cfg.cla_share_factor
    groups = range(cfg.num_groups) if entry.member is not None else [None]
    experts = range(cfg.num_experts) if entry.per_expert else [None]
    for g in groups:
        for e in experts:
            index = tuple(i for i in (g, e) if i is not None)
            layer = None if g is None else g * f + entry.member
            yield index, entry.hf_key.format(layer=layer, expert=e)


def to_tree_slice(entry: TensorMap, tensor: np.ndarray, tree_shape: tuple[int, ...]) -> np.ndarray:
    """PyTorch-layout tensor -> the slice of the tree leaf it fills."""
    if entry.transpose:
        tensor = tensor.T
    return tensor.reshape(slice_shape(entry, tree_shape))


def to_hf_tensor(entry: TensorMap, tree_slice: np.ndarray) -> np.ndarray:
    """A slice of a tree leaf -> the PyTorch-layout tensor (inverse of to_tree_slice)."""
    if not entry.transpose:
        return tree_slice
    s = tree_slice.shape
    return np.ascontiguousarray(
        tree_slice.reshape(math.prod(s[: entry.in_ndim]), math.prod(s[entry.in_ndim :])).T
    )


def ignorable_hf_key(key: str, cfg: ModelConfig) -> bool:
    """Keys a checkpoint may carry that hold no parameter of ours (an FP8 release's scales are
    consumed with their weight when it is read, or dropped: `fp8_scales`)."""
    if key.endswith("rotary_emb.inv_freq"):
        return True
    if fp8_scales.is_side_tensor(key):
        return True
    return key == "lm_head.weight" and cfg.tie_word_embeddings
