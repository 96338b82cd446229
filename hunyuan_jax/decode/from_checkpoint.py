"""A checkpoint loaded for decoding (`load` -> `Loaded`): the model (with a LoRA run's
adapters beside it when asked), its tokenizer, sampling defaults and EOS ids; what infer.py,
the server and the smoke run call. The weights come from the one loader
(`hunyuan_jax.checkpoints.loading`), adapters from `hunyuan_jax.checkpoints.lora_base`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from hunyuan_jax.checkpoints import lora_base
from hunyuan_jax.checkpoints.loading import (
    Checkpoint,
    check_tokenizer,
    find_tokenizer,
    load_params,
    open_checkpoint,
)
from hunyuan_jax.data.tokenizer import load_tokenizer
from hunyuan_jax.decode.sampling import SamplingConfig, eos_ids_from_generation_config
from hunyuan_jax.errors import ConfigError
from hunyuan_jax.model.config import ModelConfig, read_hf_config
from hunyuan_jax.model.policy import RuntimePolicy


def generation_defaults(*dirs: Path) -> tuple[SamplingConfig, list[int] | None]:
    """(sampling defaults, EOS ids) from the first generation_config.json in `dirs`; greedy
    and None without one."""
    for d in dirs:
        g = Path(d) / "generation_config.json"
        if g.is_file():
            return SamplingConfig.from_generation_config(g), eos_ids_from_generation_config(g)
    return SamplingConfig(), None


# ----------------------------------------------------------------------------- for decoding
@dataclasses.dataclass
class Loaded:
    """A checkpoint loaded for decoding: the model and what decoding it needs."""

    checkpoint: Checkpoint
    model: Any  # HunyuanForCausalLM
    tokenizer: Any | None  # hunyuan_jax.data.tokenizer.Tokenizer, if one was found
    sampling: SamplingConfig  # defaults (generation_config.json, else greedy)
    eos_ids: list[int]  # generation_config.json, else the tokenizer's, else config.json's

    @property
    def cfg(self) -> ModelConfig:
        return self.checkpoint.cfg

    @property
    def format(self) -> str:
        return self.checkpoint.format


def load(
    path: str | Path | None,
    *,
    dtype: str = "auto",
    weights: str | None = None,
    int4_group_size: int | None = None,
    policy: RuntimePolicy | None = None,
    plan=None,
    tokenizer: str | Path | None = None,
    adapter: str | Path | None = None,
    allow_base_mismatch: bool = False,
    log=print,
) -> Loaded:
    """Loads a checkpoint directory for decoding, whatever format it is in.

    dtype: see `Checkpoint.inference_policy` (ignored when `policy` is given).
    weights: 'auto' | 'bf16' | 'int8' | 'fp8' | 'int4' | 'int4-experts', how the matmul weights
    are held (sets `policy.weights`; None keeps the policy's, 'auto' by default: as the
    checkpoint stores them). int4_group_size: int4 values per scale when quantizing to int4
    (sets `policy.int4_group_size`; None keeps the policy's).
    tokenizer: a tokenizer file or directory; by default one is looked for in the checkpoint
    directory and its `tokenizer/`; generation_config.json there sets the sampling defaults.
    adapter: a LoRA run directory whose adapters (latest step) are loaded beside the weights,
    unmerged (`lora_base.load_adapted`); `path` None takes the base the run records
    (`lora_base.json`). The base must be the one the adapters were trained on (its digest,
    `lora_base.check_base`: CheckpointError otherwise) unless `allow_base_mismatch`.
    """
    if adapter is not None and path is None:
        path = lora_base.recorded_base(adapter)
    ckpt = open_checkpoint(path)
    policy = policy or ckpt.inference_policy(dtype)
    if weights is not None:
        policy = policy.replace(weights=weights)
    if int4_group_size is not None:
        policy = policy.replace(int4_group_size=int4_group_size)
    dirs = list(ckpt.search_dirs)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        t = Path(tokenizer)
        dirs = [t if t.is_dir() else t.parent] + dirs
    else:
        tok = find_tokenizer(ckpt.path)
        if tok is None and adapter is not None:
            tok = find_tokenizer(Path(adapter))
    if tok is not None:
        check_tokenizer(tok, ckpt.cfg)  # before the (possibly long) weight loading
    if adapter is not None:
        model, _ = lora_base.load_adapted(
            ckpt, policy, adapter, plan, allow_base_mismatch=allow_base_mismatch, log=log
        )
    else:
        model = load_params(ckpt, policy, plan)
    sampling, eos = generation_defaults(*([ckpt.path] + dirs))
    if eos is None and tok is not None:
        eos = tok.eos_ids
    if eos is None:
        eos = _config_eos(ckpt.path)
    eos = [e for e in eos if 0 <= e < ckpt.cfg.vocab_size]
    return Loaded(ckpt, model, tok, sampling, eos)


def _config_eos(d: Path) -> list[int]:
    try:
        e = read_hf_config(d).get("eos_token_id")
    except ConfigError:  # missing or broken: no EOS ids from it
        return []
    if e is None:
        return []
    return [int(x) for x in (e if isinstance(e, list) else [e])]
