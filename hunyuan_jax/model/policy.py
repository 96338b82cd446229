"""How a run uses the architecture: the runtime policy.

`ModelConfig` (config.py) is what a checkpoint says: shapes, RoPE, CLA, experts. Everything
else about a run lives here, in one frozen dataclass read from the `runtime:` section of a YAML
file (or built by an entry point): parameter and compute dtypes, rematerialisation, layer scan,
the attention kernel, dropout, training-time routing capacity and the expert-parallel dispatch
of training, and how the matmul weights are stored (`weights`). Loaders take a policy instead of
`**overrides`, and the same checkpoint can be run under any policy: only `weights` changes what
the parameter tree holds (quantized values + scales in place of a float matmul weight), never
the architecture.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from hunyuan_jax.errors import ConfigError
from hunyuan_jax.model.config import check_types, dataclass_from_dict

DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "save_dots", "save_attn_out", "save", "auto")
# The named checkpoint points of a decoder layer (`checkpoint_name` in transformer.py, layers.py,
# moe.py): the outputs of its matmuls and of attention. `remat: save` keeps those listed in
# `remat_save` for the backward pass and recomputes the rest (`hunyuan_jax.aot.flops` counts
# what that recomputes).
REMAT_NAMES = (
    "q_proj",  # q = x W_q, before RoPE
    "kv_proj",  # k, v = x W_k, x W_v (the first layer of each CLA group)
    "attn_out",  # the attention output (with the flash / splash kernel's residuals)
    "o_proj",  # attention output projection
    "mlp_gate",  # shared expert: x W_gate
    "mlp_up",  # shared expert: x W_up
    "mlp_down",  # shared expert: h W_down
    "moe_gate",  # routed experts: grouped x W_gate
    "moe_up",  # routed experts: grouped x W_up
    "moe_down",  # routed experts: grouped h W_down
)
ATTENTION = ("auto", "xla", "flash", "splash")
TRAIN_DISPATCH = ("all_to_all", "gather")
WEIGHTS = ("auto", "bf16", "int8", "fp8", "int4", "int4-experts")
INT4_GROUP_SIZE = 128  # int4 values per scale along the contraction (default)


@dataclasses.dataclass(frozen=True)
class RuntimePolicy:
    """Numerics, memory and kernel choices of a run (never changes the architecture).

    param_dtype: dtype the parameters are stored in (float32 master weights for training).
    compute_dtype: dtype of activations and of the weights as used (cast on use).
    remat: per layer group: none | full | save_dots | save_attn_out | save (keep the named
      points in `remat_save`, recompute the rest) | auto (training: the most saved rung of
      `hunyuan_jax.train.remat_choice.LADDER` whose step fits the chip, chosen per slice and
      sequence length by the train step's builder and the AOT tool; full remat off TPU).
    remat_save: with remat 'save': comma-separated names from REMAT_NAMES, e.g.
      "q_proj,kv_proj,attn_out,o_proj,moe_gate,moe_up,moe_down,mlp_down".
    scan_layers: run the layer groups with `lax.scan` (compile time independent of depth).
    attention: auto | xla | flash | splash (see `hunyuan_jax.model.kernels.attention`).
    attention_dropout / hidden_dropout: training only (the SFT recipe uses 0.1 / 0.2).
    capacity_factor: training-time expert capacity (inference is always dropless).
    train_dispatch: expert-parallel dispatch in training when the plan shards the experts.
    loss_chunk: training cross entropy over this many tokens of the sequence at a time (the
      [B, S, vocab] logits never exist whole); 0 = the whole sequence at once.
    weights: how the matmul weights (attention q/k/v/o, shared and routed experts' gate/up/
      down) are stored for this run: auto (as the checkpoint stores them; float in param_dtype
      for a fresh model), bf16, int8 (per output channel), fp8 (e4m3, per output channel),
      int4 (one scale per `int4_group_size` values along the contraction) or int4-experts (the
      routed experts int4, attention and the shared expert int8); the router, norms and
      embedding stay float (`hunyuan_jax.model.quantize`). The one field that
      changes the stored form of parameters (values + scales instead of a float array); the
      model code does not branch on it (`hunyuan_jax.model.qops` dispatches on what is stored).
    int4_group_size: the target of int4 values sharing one scale, consecutive along the
      contraction: each weight takes the largest group <= it that splits its contraction into
      whole groups on every shard up to 16 (`quantize.int4_group`); used when quantizing to
      int4 (a stored int4 checkpoint keeps the groups it was written with).
    """

    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    remat: str = "full"
    remat_save: str = ""
    scan_layers: bool = True
    attention: str = "auto"
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    capacity_factor: float = 1.0
    train_dispatch: str = "all_to_all"
    loss_chunk: int = 0
    weights: str = "auto"
    int4_group_size: int = INT4_GROUP_SIZE

    def __post_init__(self):
        check_types(self, "runtime")
        for key in ("param_dtype", "compute_dtype"):
            _one_of(key, getattr(self, key), DTYPES)
        _one_of("remat", self.remat, REMAT)
        unknown = [n for n in self.saved_names() if n not in REMAT_NAMES]
        if unknown:
            raise ConfigError(
                f"runtime key 'remat_save' names {unknown}; the checkpoint points are "
                f"{list(REMAT_NAMES)}"
            )
        if (self.remat == "save") != bool(self.saved_names()):
            raise ConfigError(
                "runtime key 'remat_save' lists the points to keep with remat 'save' "
                f"(and only then); got remat {self.remat!r}, remat_save {self.remat_save!r}"
            )
        _one_of("attention", self.attention, ATTENTION)
        _one_of("train_dispatch", self.train_dispatch, TRAIN_DISPATCH)
        _one_of("weights", self.weights, WEIGHTS)
        for key in ("attention_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(
                    f"runtime key {key!r} must be in [0, 1), got {getattr(self, key)}"
                )
        if self.attention_dropout and self.attention not in ("auto", "xla"):
            raise ConfigError(
                f"runtime key 'attention_dropout' ({self.attention_dropout}) needs attention "
                f"'auto' or 'xla': the {self.attention!r} kernel has no dropout"
            )
        if self.int4_group_size <= 0:
            raise ConfigError(
                f"runtime key 'int4_group_size' must be positive, got {self.int4_group_size}"
            )
        if self.loss_chunk < 0:
            raise ConfigError(f"runtime key 'loss_chunk' must be >= 0, got {self.loss_chunk}")
        if self.capacity_factor <= 0:
            raise ConfigError(
                f"runtime key 'capacity_factor' must be positive, got {self.capacity_factor}"
            )

    def saved_names(self) -> tuple[str, ...]:
        """The checkpoint points `remat: save` keeps (`remat_save`, split)."""
        return tuple(n.strip() for n in self.remat_save.split(",") if n.strip())

    def replace(self, **changes) -> RuntimePolicy:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown runtime key(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, source: str = "runtime") -> RuntimePolicy:
        return dataclass_from_dict(cls, {} if d is None else d, source, "runtime")

    @classmethod
    def inference(cls, dtype: str = "bfloat16", **changes) -> RuntimePolicy:
        """Serving: parameters and compute in one dtype, no remat, no dropout."""
        return cls(param_dtype=dtype, compute_dtype=dtype, remat="none", **changes)

    def for_inference(self, dtype: str | None = None) -> RuntimePolicy:
        """This policy as decoding uses it: no remat (nothing to save for a backward pass),
        no dropout; `dtype` sets the compute dtype (the stored weights are cast on use)."""
        changes: dict[str, Any] = dict(
            remat="none", remat_save="", attention_dropout=0.0, hidden_dropout=0.0
        )
        if dtype is not None:
            changes["compute_dtype"] = dtype
        return self.replace(**changes)


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"runtime key {key!r} must be one of {choices}, got {value!r}")
