"""The architecture: one frozen dataclass, what a checkpoint says about the model (shapes,
RoPE, CLA, experts), loaded from our YAML files or a Hugging Face `config.json` of
Hunyuan-Large and validated with errors that name the file and key at fault.

How a run uses the architecture (dtypes, remat, kernels, dropout, capacity) is the runtime
policy (`hunyuan_jax.model.policy.RuntimePolicy`), never a field here. Reading YAML files as a whole
(model + runtime + train sections) is `hunyuan_jax.train.config.load_configs`; recognising any
checkpoint directory is `hunyuan_jax.checkpoints.loading`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from hunyuan_jax.errors import ConfigError

# Keys that were once model keys and are now runtime keys: a clear error instead of "unknown".
RUNTIME_KEYS = (
    "param_dtype",
    "compute_dtype",
    "remat",
    "scan_layers",
    "attention",
    "attention_dropout",
    "hidden_dropout",
    "capacity_factor",
)


class ConfigTypeError(ConfigError, TypeError):
    """A config value of the wrong type."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The Hunyuan-Large architecture (what a checkpoint's config.json says)."""

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

    def __post_init__(self):
        check_types(self, "config")
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
                raise ConfigError(f"config key {key!r} must be positive, got {getattr(self, key)}")
        if self.num_shared_experts not in (0, 1):
            raise ConfigError(
                f"config key 'num_shared_experts' must be 0 or 1, got {self.num_shared_experts}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"config key 'num_heads' ({self.num_heads}) must be divisible by "
                f"'num_kv_heads' ({self.num_kv_heads})"
            )
        if self.num_layers % self.cla_share_factor:
            raise ConfigError(
                f"config key 'num_layers' ({self.num_layers}) must be divisible by "
                f"'cla_share_factor' ({self.cla_share_factor})"
            )
        if self.moe_top_k > self.num_experts:
            raise ConfigError(
                f"config key 'moe_top_k' ({self.moe_top_k}) exceeds "
                f"'num_experts' ({self.num_experts})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"config key 'head_dim' must be even for RoPE, got {self.head_dim}")
        if self.rope_alpha <= 0 or self.rope_theta <= 0:
            raise ConfigError("config keys 'rope_theta' and 'rope_alpha' must be positive")
        if self.rms_norm_eps <= 0:  # 0: an all-zero row divides by zero
            raise ConfigError(
                f"config key 'rms_norm_eps' must be positive, got {self.rms_norm_eps}"
            )
        if self.initializer_range < 0:
            raise ConfigError(
                f"config key 'initializer_range' must be >= 0, got {self.initializer_range}"
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
            raise ConfigError(f"unknown config key(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    # Loading ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> ModelConfig:
        moved = sorted(set(d) & set(RUNTIME_KEYS))
        if moved:
            raise ConfigError(
                f"{source}: {moved} are runtime keys, not architecture: move them from the "
                f"'model:' section to the 'runtime:' section"
            )
        return dataclass_from_dict(cls, d, source, "config")

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        """A YAML file: either the model keys at top level or under a `model:` section."""
        data = read_yaml(path)
        data = data.get("model", data)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the 'model:' section must be a mapping")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_hf(cls, path: str | Path) -> ModelConfig:
        """A Hugging Face Hunyuan-Large `config.json` (file or checkpoint directory)."""
        path = hf_config_path(path)
        return cls.from_dict(hf_to_fields(read_hf_config(path), str(path)), source=str(path))

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
            "attention_bias": False,
            "attention_dropout": 0.0,
            "capacity_factor": 1.0,
            "moe_drop_tokens": False,
            "moe_random_routing_dropped_token": False,
        }


# ----------------------------------------------------------------------------- file readers
class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a mapping with the same key twice (at any level) is a
    `ConstructorError` at the second one's line instead of silently keeping the last value
    (YAML requires keys to be unique; `lr: 3e-3` ... `lr: 3e+3` is a typo, not an override).
    Merge keys (`<<: *base`) still override what they merge."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key!r} (first on line {first.line + 1})",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str):
    """`yaml.safe_load` refusing duplicate mapping keys (`UniqueKeyLoader`)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader: no arbitrary objects


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping; ConfigError naming the file (and line) when it is missing or broken."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level, got {type(data).__name__}")
    return data


HF_CONFIG = "config.json"


def hf_config_path(path: str | Path) -> Path:
    """A Hugging Face `config.json`: the file itself, or the one in a checkpoint directory."""
    path = Path(path)
    return path / HF_CONFIG if path.is_dir() else path


def read_hf_config(path: str | Path) -> dict:
    """The one reader of a checkpoint's Hugging Face `config.json` (the file, or a checkpoint
    directory holding it), as the JSON object it is: ConfigError naming the file (and line)
    when it is missing, unreadable, not JSON or not an object (`read_json`)."""
    return read_json(hf_config_path(path))


def read_json(path: str | Path) -> dict:
    """A JSON object; ConfigError naming the file (and line) when it is missing or broken."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def dataclass_from_dict(cls, d: Mapping[str, Any], source: str, what: str):
    """cls(**d), refusing keys the dataclass does not have (naming them and the known ones)."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: the {what} section must be a mapping, got {d!r}")
    fields = dataclasses.fields(cls)
    known = {f.name for f in fields}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown {what} key(s) {unknown}; known keys: {sorted(known)}")
    missing = [
        f.name
        for f in fields
        if f.name not in d
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: missing required {what} key(s) {missing}")
    bad = nonfinite_keys(d)
    if bad:
        key, value = bad[0]
        raise ConfigError(f"{source}: {what} key {key!r} must be a finite number, got {value}")
    try:
        return cls(**d)
    except ConfigError as e:
        if str(e).startswith(source):
            raise
        raise type(e)(f"{source}: {e}") from None
    except (TypeError, ValueError) as e:  # a value a field's own checks did not foresee
        raise ConfigTypeError(f"{source}: bad {what} value: {e}") from None


def nonfinite_keys(value, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted key, value) of every NaN / infinite float in a config mapping, nested mappings
    and lists included: no config value has a meaning for them (`--set lr=nan`)."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [(prefix, value)]
    if isinstance(value, Mapping):
        items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(value)]
    else:
        return []
    return [bad for k, v in items for bad in nonfinite_keys(v, k)]


def hf_to_fields(hf: Mapping[str, Any], source: str = "config.json") -> dict:
    """Translate Hugging Face Hunyuan field spellings into ModelConfig fields. Run-policy
    fields of config.json (attention_dropout, capacity_factor) are not architecture and are
    not read."""

    def need(key):
        if key not in hf:
            raise ConfigError(f"{source}: missing required key {key!r}")
        return hf[key]

    def number(key, kind, default=None, value=None):
        """hf[key] as `kind`: a finite number, integral for int (JSON's NaN / Infinity and
        2.5 layers are refused, not truncated or carried into the model)."""
        if value is None:
            value = need(key) if default is None else hf.get(key, default)
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise TypeError
            if isinstance(value, int):  # exact (float() would round above 2**53)
                return value if kind is int else float(value)
            out = float(value)
            if not math.isfinite(out) or (kind is int and not out.is_integer()):
                raise ValueError
            return int(out) if kind is int else out
        except (TypeError, ValueError, OverflowError):
            what = "an integer" if kind is int else "a finite number"
            raise ConfigError(f"{source}: key {key!r} must be {what}, got {value!r}") from None

    def flag(key, default):
        value = hf.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):  # bool("false") is True
            raise ConfigError(f"{source}: key {key!r} must be true or false, got {value!r}")
        return value

    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act {hf['hidden_act']!r} unsupported (only 'silu')")
    if hf.get("attention_bias", False):
        raise ConfigError(f"{source}: attention_bias=true is not part of Hunyuan-Large")
    scaling = hf.get("rope_scaling") or {}
    if not isinstance(scaling, Mapping):
        raise ConfigError(f"{source}: rope_scaling must be an object, got {scaling!r}")
    if scaling and scaling.get("type", "dynamic") != "dynamic":
        raise ConfigError(f"{source}: rope_scaling.type {scaling.get('type')!r} unsupported")
    if scaling and "alpha" not in scaling:
        raise ConfigError(f"{source}: rope_scaling has no 'alpha' (NTK-alpha is required)")
    if scaling and number("rope_scaling.factor", float, value=scaling.get("factor", 1.0)) != 1:
        raise ConfigError(f"{source}: rope_scaling.factor != 1 is not supported")
    use_cla = flag("use_cla", False)
    num_heads = number("num_attention_heads", int)
    hidden = number("hidden_size", int)

    def per_layer(key, default):  # some releases store one value per layer
        value = hf.get(key, default)
        if isinstance(value, list):
            if not value or len({repr(v) for v in value}) != 1:
                raise ConfigError(f"{source}: per-layer {key} {value} unsupported")
            value = value[0]
        return number(key, int, value=value)

    top_k = per_layer("moe_topk", 1)
    use_mixed = hf.get("use_mixed_mlp_moe")
    shared = per_layer("num_shared_expert", 1 if use_mixed else 0)
    if not flag("use_mixed_mlp_moe", shared > 0):
        shared = 0
    kv_heads = hf.get("num_key_value_heads")
    head_dim = hf.get("head_dim")
    return dict(
        vocab_size=number("vocab_size", int),
        hidden_size=hidden,
        intermediate_size=number("intermediate_size", int),
        num_layers=number("num_hidden_layers", int),
        num_heads=num_heads,
        num_kv_heads=number("num_key_value_heads", int, value=kv_heads) if kv_heads else num_heads,
        num_experts=number("num_experts", int),
        num_shared_experts=shared,
        moe_top_k=top_k,
        cla_share_factor=number("cla_share_factor", int, 1) if use_cla else 1,
        use_qk_norm=flag("use_qk_norm", False),
        rope_theta=number("rope_theta", float, 10000.0),
        rope_alpha=(
            number("rope_scaling.alpha", float, value=scaling.get("alpha")) if scaling else 1.0
        ),
        max_position_embeddings=number("max_position_embeddings", int, 4096),
        rms_norm_eps=number("rms_norm_eps", float, 1e-5),
        tie_word_embeddings=flag("tie_word_embeddings", True),
        initializer_range=number("initializer_range", float, 0.02),
        head_dim=(
            number("head_dim", int, value=head_dim) if head_dim else hidden // max(num_heads, 1)
        ),
    )


def check_types(cfg, what: str) -> None:
    """Type-check a config dataclass's fields against their annotations (ints accepted and
    converted where a float is expected); ConfigTypeError naming the key. A NaN or infinite
    float is a ConfigError wherever it appears: no config key has a meaning for it."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{what} key {f.name!r} must be a finite number, got {value}")
        allowed = typing.get_args(hint) or (hint,)
        allowed = tuple(a for a in allowed if isinstance(a, type))
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(cfg, f.name, float(value))
            continue
        if isinstance(value, bool) and bool not in allowed:
            raise ConfigTypeError(f"{what} key {f.name!r} must be {hint}, got bool {value!r}")
        if not isinstance(value, allowed):
            raise ConfigTypeError(
                f"{what} key {f.name!r} must be {hint}, got {type(value).__name__} {value!r}"
            )


# ----------------------------------------------------------------------------- LoRA
# LoRA targets: attention projections by name; the shared expert's and the routed experts'
# gate / up / down as 'shared' and 'experts' (`hunyuan_jax.model.lora`).
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
TARGETS = ATTENTION + ("shared", "experts")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The `lora:` mapping of a train config's `train:` section."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # in training, on the input of each adapter path (x A B)
    targets: tuple[str, ...] = ATTENTION

    def __post_init__(self):
        if isinstance(self.targets, str):  # `targets: q_proj` is one target, not its letters
            object.__setattr__(self, "targets", (self.targets,))
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"train key 'lora.rank' must be a positive int, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ConfigError(f"train key 'lora.alpha' must be a number, got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"train key 'lora.dropout' must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ConfigError(
                f"train key 'lora.targets' must be a non-empty list of {list(TARGETS)}, "
                f"got {list(self.targets)}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_value(cls, value: Any) -> LoraConfig | None:
        """The `lora:` value as written in YAML: null / false (off), true (the defaults), a
        mapping of the fields above, or a LoraConfig."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"train key 'lora' must be a mapping, true or null, got {value!r}")
        return dataclass_from_dict(cls, value, "train", "lora")
