"""Model configuration: one frozen dataclass, loaded from our YAML files or a Hugging Face
`config.json` of Hunyuan-Large, validated with errors that name the key at fault."""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

_DTYPES = ("float32", "bfloat16", "float16")
_REMAT = ("none", "full", "save_dots", "save_attn_out")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hunyuan-Large architecture plus the numeric policy of this implementation."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # shared MLP and each routed expert
    num_layers: int
    num_heads: int
    num_kv_heads: int
    num_experts: int
    num_shared_experts: int = 1
    moe_top_k: int = 1
    cla_share_factor: int = 2  # 1 = no cross-layer attention
    use_qk_norm: bool = True
    rope_theta: float = 10000.0
    rope_alpha: float = 1.0  # NTK-alpha ("dynamic" rope_scaling alpha)
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    head_dim: int | None = None  # derived: hidden_size // num_heads
    # Training-time routing (used by the train step; inference is always dropless).
    capacity_factor: float = 1.0
    # Dropout in training (the SFT recipe uses 0.1 / 0.2); never applied at inference.
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    # Numeric policy.
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    remat: str = "full"  # none | full | save_dots | save_attn_out
    scan_layers: bool = True

    def __post_init__(self):
        _check_types(self)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_heads, 1))
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "num_experts",
            "moe_top_k",
            "cla_share_factor",
            "head_dim",
            "max_position_embeddings",
        ):
            if getattr(self, key) <= 0:
                raise ValueError(f"config key {key!r} must be positive, got {getattr(self, key)}")
        if self.num_shared_experts not in (0, 1):
            raise ValueError(
                f"config key 'num_shared_experts' must be 0 or 1, got {self.num_shared_experts}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"config key 'num_heads' ({self.num_heads}) must be divisible by "
                f"'num_kv_heads' ({self.num_kv_heads})"
            )
        if self.num_layers % self.cla_share_factor:
            raise ValueError(
                f"config key 'num_layers' ({self.num_layers}) must be divisible by "
                f"'cla_share_factor' ({self.cla_share_factor})"
            )
        if self.moe_top_k > self.num_experts:
            raise ValueError(
                f"config key 'moe_top_k' ({self.moe_top_k}) exceeds "
                f"'num_experts' ({self.num_experts})"
            )
        if self.head_dim % 2:
            raise ValueError(f"config key 'head_dim' must be even for RoPE, got {self.head_dim}")
        for key in ("param_dtype", "compute_dtype"):
            if getattr(self, key) not in _DTYPES:
                raise ValueError(
                    f"config key {key!r} must be one of {_DTYPES}, got {getattr(self, key)!r}"
                )
        if self.remat not in _REMAT:
            raise ValueError(f"config key 'remat' must be one of {_REMAT}, got {self.remat!r}")
        if self.rope_alpha <= 0 or self.rope_theta <= 0:
            raise ValueError("config keys 'rope_theta' and 'rope_alpha' must be positive")
        for key in ("attention_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"config key {key!r} must be in [0, 1), got {getattr(self, key)}")
        if self.capacity_factor <= 0:
            raise ValueError(
                f"config key 'capacity_factor' must be positive, got {self.capacity_factor}"
            )

    # Derived quantities -------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        """Layer groups: one KV-producing layer plus (cla_share_factor - 1) reusing layers."""
        return self.num_layers // self.cla_share_factor

    @property
    def rope_base(self) -> float:
        """NTK-alpha base: theta * alpha ** (d / (d - 2)); independent of sequence length."""
        d = self.head_dim
        return self.rope_theta * self.rope_alpha ** (d / (d - 2))

    def replace(self, **changes) -> ModelConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown config key(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    # Loading ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> ModelConfig:
        return dataclass_from_dict(cls, d, source, "config")

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        """A YAML file: either the model keys at top level or under a `model:` section."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at top level")
        data = data.get("model", data)
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_hf(cls, path: str | Path) -> ModelConfig:
        """A Hugging Face Hunyuan-Large `config.json` (file or checkpoint directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"Hugging Face config not found: {path}")
        return cls.from_dict(
            hf_to_fields(json.loads(path.read_text()), str(path)), source=str(path)
        )

    def to_hf(self) -> dict:
        """The Hugging Face `config.json` fields of this architecture (for export)."""
        return {
            "architectures": ["HunYuanForCausalLM"],
            "model_type": "hunyuan",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "num_experts": self.num_experts,
            "num_shared_expert": self.num_shared_experts,
            "moe_topk": self.moe_top_k,
            "use_mixed_mlp_moe": self.num_shared_experts > 0,
            "use_cla": self.cla_share_factor > 1,
            "cla_share_factor": self.cla_share_factor,
            "use_qk_norm": self.use_qk_norm,
            "rope_theta": self.rope_theta,
            "rope_scaling": {"type": "dynamic", "alpha": self.rope_alpha, "factor": 1.0},
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "hidden_act": "silu",
            "attention_dropout": self.attention_dropout,
            "attention_bias": False,
            "capacity_factor": self.capacity_factor,
            "moe_drop_tokens": False,
            "moe_random_routing_dropped_token": False,
        }


def dataclass_from_dict(cls, d: Mapping[str, Any], source: str, what: str):
    """cls(**d), refusing keys the dataclass does not have (naming them and the known ones)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{source}: unknown {what} key(s) {unknown}; known keys: {sorted(known)}")
    return cls(**d)


def hf_to_fields(hf: Mapping[str, Any], source: str = "config.json") -> dict:
    """Translate Hugging Face Hunyuan field spellings into ModelConfig fields."""

    def need(key):
        if key not in hf:
            raise ValueError(f"{source}: missing required key {key!r}")
        return hf[key]

    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} unsupported (only 'silu')")
    if hf.get("attention_bias", False):
        raise ValueError(f"{source}: attention_bias=true is not part of Hunyuan-Large")
    scaling = hf.get("rope_scaling") or {}
    if scaling and scaling.get("type", "dynamic") != "dynamic":
        raise ValueError(f"{source}: rope_scaling.type {scaling.get('type')!r} unsupported")
    if scaling and "alpha" not in scaling:
        raise ValueError(f"{source}: rope_scaling has no 'alpha' (NTK-alpha is required)")
    if scaling and float(scaling.get("factor", 1.0)) != 1.0:
        raise ValueError(f"{source}: rope_scaling.factor != 1 is not supported")
    use_cla = bool(hf.get("use_cla", False))
    num_heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    top_k = hf.get("moe_topk", 1)
    if isinstance(top_k, list):  # some releases store one value per layer
        if len(set(top_k)) != 1:
            raise ValueError(f"{source}: per-layer moe_topk {top_k} unsupported")
        top_k = top_k[0]
    shared = hf.get("num_shared_expert", 1 if hf.get("use_mixed_mlp_moe", False) else 0)
    if isinstance(shared, list):
        shared = shared[0]
    if not hf.get("use_mixed_mlp_moe", shared > 0):
        shared = 0
    fields = dict(
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        num_experts=int(need("num_experts")),
        num_shared_experts=int(shared),
        moe_top_k=int(top_k),
        cla_share_factor=int(hf.get("cla_share_factor", 1)) if use_cla else 1,
        use_qk_norm=bool(hf.get("use_qk_norm", False)),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        rope_alpha=float(scaling.get("alpha", 1.0)) if scaling else 1.0,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        head_dim=int(hf.get("head_dim") or hidden // num_heads),
        capacity_factor=float(hf.get("capacity_factor", 1.0)),
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
    )
    return fields


def _check_types(cfg: ModelConfig) -> None:
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        allowed = typing.get_args(hint) or (hint,)
        allowed = tuple(a for a in allowed if isinstance(a, type))
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(cfg, f.name, float(value))
            continue
        if isinstance(value, bool) and bool not in allowed:
            raise TypeError(f"config key {f.name!r} must be {hint}, got bool {value!r}")
        if not isinstance(value, allowed):
            raise TypeError(
                f"config key {f.name!r} must be {hint}, got {type(value).__name__} {value!r}"
            )


def load_config(path: str | Path) -> ModelConfig:
    """A YAML config of ours, or an HF `config.json` / checkpoint directory."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".json":
        return ModelConfig.from_hf(path)
    return ModelConfig.from_yaml(path)
