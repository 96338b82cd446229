"""Training configuration: one frozen dataclass read from the `train:` section of the YAML
file whose `model:` section is the architecture (`ModelConfig`) and whose `runtime:` section is
the runtime policy (`RuntimePolicy`), plus `--set key=value` overrides (`model.*` and
`runtime.*` keys go to those sections). `load_configs` returns all three, validated.

The resolved sections are written to `<run>/config.yaml` (`runs.write_run_config`),
so that a run directory alone is enough to resume training or to decode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from hunyuan_jax.errors import ConfigError
from hunyuan_jax.model.config import (
    LoraConfig,
    ModelConfig,
    check_types,
    dataclass_from_dict,
    load_yaml,
    read_yaml,
)
from hunyuan_jax.model.policy import RuntimePolicy

_NONFINITE = ("stop", "skip")
_DATA_FORMATS = ("auto", "text", "jsonl", "chat")
OBJECTIVES = ("sft", "dpo", "grpo")
_NORMALIZATIONS = ("token", "sequence")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """`train.dpo`: the sigmoid DPO objective (used when `train.objective` is "dpo"; see
    hunyuan_jax/train/dpo.py and docs/dpo.md). loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r -
    ref_r))) + sft_weight * (negative log-likelihood of the chosen response per token)."""

    beta: float = 0.1
    sft_weight: float = 0.0

    def __post_init__(self):
        check_types(self, "train.dpo")
        if self.beta <= 0:
            raise ConfigError(f"train key 'dpo.beta' must be positive, got {self.beta}")
        if self.sft_weight < 0:
            raise ConfigError(f"train key 'dpo.sft_weight' must be >= 0, got {self.sft_weight}")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """`train.grpo`: group-relative policy optimization with rollouts from the serving engine
    (used when `train.objective` is "grpo"; hunyuan_jax/train/grpo.py, rollout.py, docs/rl.md).
    Each rollout samples `group_size` completions of every prompt; `batch_size` rows = prompts
    x group_size. Per completion token: -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A)
    + beta * k3 KL to the reference policy, r = pi / pi_old, A = the group-relative advantage."""

    group_size: int = 8  # G completions per prompt
    max_new_tokens: int = 32  # completion length limit (EOS ends one earlier)
    temperature: float = 1.0  # rollout sampling (1.0: the policy itself)
    top_k: int = 0
    top_p: float = 1.0
    beta: float = 0.04  # KL penalty coefficient (k3 estimator); 0 = none
    epsilon: float = 0.2  # clip range below (and above, unless epsilon_high)
    epsilon_high: float | None = None  # clip range above (DAPO's clip-higher); None = epsilon
    normalization: str = "token"  # "token": mean over the batch's tokens; "sequence": of rows
    std_normalize: bool = True  # A = (r - mean) / (std + 1e-4); false: A = r - mean
    updates_per_rollout: int = 1  # optimizer updates per rollout batch (old log-probs: rollout)
    dropless: bool = True  # train forward with the inference (dropless) MoE dispatch
    # Reward: "exact" (the final answer equals the record's `answer_field`), "regex"
    # (`pattern` found in the completion), "numeric" (the final answer's number within
    # `tolerance` of the field's), or a user function "module:function" (hunyuan_jax/train/
    # rewards.py). The final answer: the last match of `answer_pattern`'s group 1, else the
    # whole completion; stripped.
    reward: str = "exact"
    answer_field: str = "answer"
    pattern: str | None = None
    answer_pattern: str | None = None
    tolerance: float = 1e-6
    page_size: int = 16  # the rollout engine's KV page size (prompt pages shared by a group)
    # Prompts in the tokenizer's chat format (`prompt` = one user message); false: `prompt` is
    # plain text continued as is (base models), `messages` records are refused.
    chat: bool = True

    def __post_init__(self):
        check_types(self, "train.grpo")
        for key in ("group_size", "max_new_tokens", "updates_per_rollout", "page_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(
                    f"train key 'grpo.{key}' must be positive, got {getattr(self, key)}"
                )
        if self.group_size < 2:
            raise ConfigError(
                f"train key 'grpo.group_size' must be >= 2 (advantages are relative to the "
                f"group), got {self.group_size}"
            )
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError(
                f"train keys 'grpo.temperature' > 0, 0 < 'grpo.top_p' <= 1, 'grpo.top_k' >= 0; "
                f"got {self.temperature}, {self.top_p}, {self.top_k}"
            )
        for key in ("beta", "tolerance"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train key 'grpo.{key}' must be >= 0, got {getattr(self, key)}")
        for key in ("epsilon", "epsilon_high"):
            v = getattr(self, key)
            if v is not None and not 0 < v:
                raise ConfigError(f"train key 'grpo.{key}' must be positive, got {v}")
        if self.epsilon >= 1:
            raise ConfigError(f"train key 'grpo.epsilon' must be < 1, got {self.epsilon}")
        if self.normalization not in _NORMALIZATIONS:
            raise ConfigError(
                f"train key 'grpo.normalization' must be one of {_NORMALIZATIONS}, "
                f"got {self.normalization!r}"
            )
        if self.reward == "regex" and not self.pattern:
            raise ConfigError("train key 'grpo.reward' regex needs 'grpo.pattern'")

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything about a training run except the architecture (which is `ModelConfig`)."""

    # Run ------------------------------------------------------------------------------------
    run_dir: str = "runs/default"
    seed: int = 0
    steps: int = 100  # total optimizer steps: the schedule's horizon and where the run ends
    stop_at: int | None = None  # stop (checkpoint and exit) at this step; a rerun resumes
    # Batch: `batch_size` sequences of `seq_len` tokens per optimizer step, split into
    # `micro_batches` equal micro-batches whose gradients are accumulated (lax.scan).
    batch_size: int = 8
    seq_len: int = 128
    # seq_len above the model's max_position_embeddings is an error unless this is true.
    allow_long_sequences: bool = False
    micro_batches: int = 1
    # AdamW with linear warmup then cosine decay from `lr` to `lr * min_lr_ratio`.
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    decay_steps: int | None = None  # default: steps
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    # AdamW moments' dtype: None / "float32" (exact), or "bfloat16" (both moments: half the
    # optimizer state, the difference between 64 and 128 v5p chips for the A52B; SPEC 7).
    opt_state_dtype: str | None = None
    weight_decay: float = 0.1  # never applied to norm weights / 1-D parameters
    grad_clip: float = 1.0  # global-norm clipping; 0 turns it off
    # Expert-specific learning rates (SPEC 3): lr_opt(B) = 2 lr_max / (sqrt(Bn/B) + sqrt(B/Bn));
    # the shared expert uses lr_opt(B), each routed expert lr_opt(B/n), n = experts / top_k.
    # The factors below multiply `lr` for those parameters (attention, router, embeddings and
    # norms use `lr` itself). None derives them: shared 1, routed lr_opt(B/n) / lr_opt(B) with
    # B = batch tokens and Bn = `lr_noise_batch_tokens` (None: B << Bn, i.e. 1/sqrt(n)).
    shared_expert_lr_scale: float | None = None
    routed_expert_lr_scale: float | None = None
    lr_noise_batch_tokens: float | None = None
    # MoE losses (the capacity factor, dropout and dispatch live in the runtime section).
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    # Parallelism: mesh sizes ("data=1,fsdp=-1,expert=1,tensor=1"; -1 = the rest) and the
    # logical-axis rules preset of sharding/rules.py.
    mesh: str = "data=1,fsdp=-1,expert=1,tensor=1"
    rules: str = "fsdp"
    # Sequences longer than this get context parallelism when neither mesh nor rules is set
    # (train.py and the AOT tool: sharding/layout.py, preset fsdp_ep_cp).
    cp_min_seq: int = 32768
    # Data: None = the embedded corpus (Python standard-library sources, no download); else a
    # file, directory or glob of .txt/.md (one document per file) or .jsonl (`text_field`, or
    # chat `messages` for data_format=chat: loss on assistant tokens only).
    data: str | None = None
    data_format: str = "auto"
    text_field: str = "text"
    corpus_max_bytes: int = 4_000_000  # embedded corpus size
    pack: bool = True  # False: one document per row, padded (truncated if longer)
    shuffle: bool = True  # document order reshuffled every epoch (deterministic in seed)
    # Tokenizer, copied into <run>/tokenizer/ (a resumed run reuses it): "auto" = the
    # init_from checkpoint's tokenizer if it has one, else "sentencepiece" = train one on the
    # corpus; otherwise a path to a Hunyuan tiktoken directory / hy.tiktoken file or a
    # SentencePiece .model file.
    tokenizer: str = "auto"
    tokenizer_vocab_size: int | None = None  # default: the model's vocab_size
    tokenizer_train_bytes: int = 2_000_000
    # Checkpoints: <run>/checkpoints/<step>/{params, opt_state, data}.
    save_every: int = 50
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    # Initial weights: None = random; a run directory of ours, a converted checkpoint or a
    # Hugging Face directory (config.json + shards). Ignored when the run resumes.
    init_from: str | None = None
    # Logging: a progress line every `log_every` steps; every step goes to metrics.jsonl.
    log_every: int = 10
    peak_flops_per_device: float | None = None  # FLOP/s for the MFU estimate (None: by chip)
    # A non-finite loss or gradient: "stop" (keep the last good checkpoint) or "skip" the batch.
    on_nonfinite: str = "stop"
    # Objective: "sft" = next-token cross entropy on the loss tokens (pre-training text, or
    # chat data's assistant tokens); "dpo" = preference pairs (`data` is JSONL with prompt or
    # messages, chosen, rejected) and the `dpo` keys below (hunyuan_jax/train/dpo.py, docs/dpo.md).
    objective: str = "sft"
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    # "grpo": RL on prompts (`data` is JSONL with prompt or messages plus the fields the
    # reward reads) with rollouts from the serving engine; the `grpo` keys (docs/rl.md).
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    # LoRA fine-tuning (`hunyuan_jax.model.lora`): null = full fine-tuning; else {rank, alpha,
    # dropout, targets} (true = the defaults: rank 8, alpha 16, q/k/v/o). Only the adapters
    # train (and are checkpointed); the base is frozen in bf16 (int8 with runtime.weights=int8).
    lora: LoraConfig | None = None

    def __post_init__(self):
        if isinstance(self.dpo, Mapping):  # from YAML / --set dpo.beta=...
            object.__setattr__(self, "dpo", _nested(DPOConfig, self.dpo, "dpo"))
        if isinstance(self.grpo, Mapping):  # from YAML / --set grpo.beta=...
            object.__setattr__(self, "grpo", _nested(GRPOConfig, self.grpo, "grpo"))
        object.__setattr__(self, "lora", LoraConfig.from_value(self.lora))
        if self.lora is not None and self.lora.alpha <= 0:  # 0: adapters that never learn
            raise ConfigError(f"train key 'lora.alpha' must be positive, got {self.lora.alpha}")
        check_types(self, "train")
        for key in (
            "steps",
            "batch_size",
            "seq_len",
            "micro_batches",
            "save_every",
            "keep_checkpoints",
            "log_every",
            "corpus_max_bytes",
            "tokenizer_train_bytes",
            "cp_min_seq",
        ):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train key {key!r} must be positive, got {getattr(self, key)}")
        for key in ("warmup_steps", "aux_loss_coef", "z_loss_coef"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train key {key!r} must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.seed < 2**63:  # numpy's Generator refuses negative seeds
            raise ConfigError(f"train key 'seed' must be in [0, 2**63), got {self.seed}")
        for key in ("b1", "b2"):  # Adam's moment decays; 1 never updates, > 1 diverges
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"train key {key!r} must be in [0, 1), got {getattr(self, key)}")
        if self.eps <= 0:  # 0: 0 / 0 for a parameter whose gradient is 0 (an unused expert)
            raise ConfigError(f"train key 'eps' must be positive, got {self.eps}")
        if self.tokenizer_vocab_size is not None and self.tokenizer_vocab_size <= 0:
            raise ConfigError(
                f"train key 'tokenizer_vocab_size' must be positive (or null), "
                f"got {self.tokenizer_vocab_size}"
            )
        if self.batch_size % self.micro_batches:
            raise ConfigError(
                f"train key 'batch_size' ({self.batch_size}) must be divisible by "
                f"'micro_batches' ({self.micro_batches})"
            )
        if self.lr <= 0:
            raise ConfigError(f"train key 'lr' must be positive, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(
                f"train key 'min_lr_ratio' must be in [0, 1], got {self.min_lr_ratio}"
            )
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            raise ConfigError(
                f"train key 'decay_steps' ({self.decay_steps}) must exceed "
                f"'warmup_steps' ({self.warmup_steps})"
            )
        if self.stop_at is not None and not 0 < self.stop_at <= self.steps:
            raise ConfigError(
                f"train key 'stop_at' must be in [1, steps={self.steps}], got {self.stop_at}"
            )
        for key in ("lr_noise_batch_tokens", "peak_flops_per_device"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"train key {key!r} must be positive (or null), got {value}")
        for key in ("shared_expert_lr_scale", "routed_expert_lr_scale"):  # 0 freezes them
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ConfigError(f"train key {key!r} must be >= 0 (or null), got {value}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("train keys 'weight_decay' and 'grad_clip' must be >= 0")
        if self.on_nonfinite not in _NONFINITE:
            raise ConfigError(
                f"train key 'on_nonfinite' must be one of {_NONFINITE}, got {self.on_nonfinite!r}"
            )
        if self.data_format not in _DATA_FORMATS:
            raise ConfigError(
                f"train key 'data_format' must be one of {_DATA_FORMATS}, got {self.data_format!r}"
            )
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"train key 'objective' must be one of {OBJECTIVES}, got {self.objective!r}"
            )
        if self.objective == "dpo" and (self.batch_size // self.micro_batches) % 2:
            raise ConfigError(
                f"train key 'batch_size' ({self.batch_size}) / 'micro_batches' "
                f"({self.micro_batches}) must be even with objective 'dpo' (each preference "
                f"pair is two rows, chosen and rejected, in the same micro-batch)"
            )
        if self.objective == "grpo":
            self._check_grpo()
        if self.opt_state_dtype not in (None, "float32", "bfloat16"):
            raise ConfigError(
                f"train key 'opt_state_dtype' must be null, float32 or bfloat16, "
                f"got {self.opt_state_dtype!r}"
            )

    def _check_grpo(self) -> None:
        g, mu = self.grpo.group_size, self.grpo.updates_per_rollout
        if self.batch_size % g:
            raise ConfigError(
                f"train key 'batch_size' ({self.batch_size}) must be a multiple of "
                f"'grpo.group_size' ({g}) with objective 'grpo' (rows = prompts x group)"
            )
        for key in ("steps", "save_every", "stop_at"):  # a checkpoint is between rollouts
            v = getattr(self, key)
            if v is not None and v % mu:
                raise ConfigError(
                    f"train key {key!r} ({v}) must be a multiple of 'grpo.updates_per_rollout' "
                    f"({mu}): checkpoints are taken between rollout batches"
                )

    @property
    def total_decay_steps(self) -> int:
        return (
            self.decay_steps
            if self.decay_steps is not None
            else max(self.steps, self.warmup_steps + 1)
        )

    @property
    def end_step(self) -> int:
        """The step at which this invocation stops."""
        return self.stop_at if self.stop_at is not None else self.steps

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def replace(self, **changes) -> TrainConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown train key(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "train config") -> TrainConfig:
        return dataclass_from_dict(cls, d, source, "train")


def _nested(cls, d: Mapping[str, Any], name: str):
    """A nested train section (`dpo:`) from its mapping; unknown keys are a ConfigError."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(f"{name}.{k}" for k in set(d) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown train key(s) {unknown}; known: {[f'{name}.{k}' for k in known]}"
        )
    return cls(**d)


SECTIONS = ("model", "runtime", "train")


def parse_overrides(items: Iterable[str]) -> dict[str, dict]:
    """`key=value` strings -> {section: overrides}. Values are parsed as YAML scalars
    (`lr=1e-3`, `data=null`, `pack=false`); `model.key=value` and `runtime.key=value` target
    those sections, anything else (or `train.key`) the train section; `dpo.beta=0.5` sets a key
    of the nested `dpo` section (merged into the YAML's)."""
    out: dict[str, dict] = {s: {} for s in SECTIONS}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = load_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({problem})") from None
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        section, dot, name = key.partition(".")
        if not (dot and section in SECTIONS):
            section, name = "train", key
        head, dot, sub = name.partition(".")
        if dot and section == "train":  # a key of a nested train section: dpo.beta=0.5
            out["train"].setdefault(head, {})[sub] = value
        else:
            out[section][name] = value
    return out


def check_repeated_overrides(
    items: Iterable[str], log: Callable[[str], Any] = print, **flags: Any
) -> None:
    """`--set` items that give one key different values (`lr=3e-3` ... `lr=3e+3`, `lr` and
    `train.lr`, `lora={rank: 8}` and `lora.rank=4`): the later one wins, as with any repeated
    flag (scripts append a user's overrides to their defaults), and each is said in one
    warning line through `log`, never silently. A flag that is a shorthand for a key
    (`--run-dir A`, passed here as `run_dir=A`) and a `--set` of that key with another value
    is a ConfigError: neither comes "later"."""
    seen: dict[tuple, tuple[Any, str]] = {}
    given = [(f"--set {item}", parse_overrides([item])) for item in items]
    flagged = [(f"--{k.replace('_', '-')} {v}", {"train": {k: v}}) for k, v in flags.items()]
    for item, parsed in given + flagged:
        for section, changes in parsed.items():
            for name, value in changes.items():
                if isinstance(value, Mapping) and value:
                    keys = [((section, name, k), v) for k, v in value.items()]
                else:
                    keys = [((section, name), value)]
                for key, v in keys:
                    for other, (ov, oitem) in list(seen.items()):
                        clash = other[: len(key)] == key or key[: len(other)] == other
                        if not clash or (other == key and ov == v):
                            continue
                        what = f"key {'.'.join(key[1:])!r} of the {section} section"
                        if item.startswith("--set"):
                            log(f"[config] warning: {what}: {item!r} overrides {oitem!r}")
                        else:
                            raise ConfigError(f"{what} is set twice: {oitem!r} and {item!r}")
                    seen[key] = (v, item)


def load_configs(
    path: str | Path | None = None, overrides: Iterable[str] = (), **train_changes
) -> tuple[ModelConfig, RuntimePolicy, TrainConfig]:
    """(ModelConfig, RuntimePolicy, TrainConfig) from a YAML file with `model:`, `runtime:` and
    `train:` sections, then `--set` style overrides, then keyword changes to the train
    section. Errors name the file and the key."""
    data: dict = {}
    source = str(path) if path is not None else "config"
    if path is not None:
        data = read_yaml(path)
        if "model" not in data:
            raise ConfigError(f"{path}: expected a mapping with a 'model:' section")
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"{path}: unknown section(s) {unknown}; sections are {SECTIONS}")
    for s in SECTIONS:
        if data.get(s) is not None and not isinstance(data[s], Mapping):
            raise ConfigError(
                f"{source}: the '{s}:' section must be a mapping of keys, got "
                f"{type(data[s]).__name__} {data[s]!r:.60}"
            )
    sections = {s: dict(data.get(s) or {}) for s in SECTIONS}
    for s, changes in parse_overrides(overrides).items():
        for key, value in changes.items():
            old = sections[s].get(key)
            if isinstance(value, dict) and isinstance(old, Mapping):  # nested: merged
                value = {**old, **value}
            sections[s][key] = value
    sections["train"].update(train_changes)
    return (
        ModelConfig.from_dict(sections["model"], source),
        RuntimePolicy.from_dict(sections["runtime"], source),
        TrainConfig.from_dict(sections["train"], source),
    )
