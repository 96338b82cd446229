"""The one loader of checkpoints: what a directory holds, its architecture, its weights under a
runtime policy and a sharding plan, its tokenizer and its generation defaults.

Formats (checked in this order):

| format | recognised by | weights |
|---|---|---|
| `hf` | config.json + safetensors / PyTorch .bin shards (or their index) | read tensor by tensor (`hf_checkpoint`), placed by the plan |
| `converted` | manifest.json (+ params/) from `python -m hunyuan_jax.convert hf-to-jax` | orbax restore straight into the plan's shardings |
| `run` | config.yaml + checkpoints/ (a train.py run directory) | its latest complete step, restored into the plan's shardings |

    ckpt = open_checkpoint(path)                  # cheap: format, architecture, stored dtype
    model = load_params(ckpt, policy, plan)       # the weights, created sharded
    bundle = load(path, dtype="auto", plan=plan)  # + tokenizer, sampling defaults, EOS ids

infer.py, the server, `train.py --init-from`, the converter's export and the AOT tool all go
through here; nothing else recognises checkpoint directories.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from hunyuan_jax.config import ModelConfig, read_json, read_yaml
from hunyuan_jax.errors import CheckpointError, ConfigError
from hunyuan_jax.policy import RuntimePolicy
from hunyuan_jax.sampling import SamplingConfig, eos_ids_from_generation_config

FORMATS = {
    "hf": "Hugging Face layout: config.json + safetensors or PyTorch .bin shards",
    "converted": "python -m hunyuan_jax.convert hf-to-jax output: manifest.json + params/",
    "run": "train.py run directory: config.yaml + checkpoints/<step>/",
}
_HF_WEIGHTS = (
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "model.safetensors",
    "pytorch_model.bin",
)
_SERVE_DTYPES = ("auto", "float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A recognised checkpoint directory (nothing loaded but its config)."""

    path: Path
    format: str  # a key of FORMATS
    cfg: ModelConfig
    stored_dtype: str  # dtype of the stored parameters
    runtime: RuntimePolicy | None = None  # a run directory's own policy

    def inference_policy(self, dtype: str = "auto") -> RuntimePolicy:
        """The policy decoding uses. 'auto': HF / converted keep their stored dtype for
        parameters and compute (float32 stays float32, anything else bfloat16); a run keeps
        its own (float32 master weights, its compute dtype). 'float32' / 'bfloat16': that
        compute dtype (and, for HF / converted, that parameter dtype)."""
        if dtype not in _SERVE_DTYPES:
            raise ConfigError(f"dtype must be one of {_SERVE_DTYPES}, got {dtype!r}")
        if self.runtime is not None:
            return self.runtime.for_inference(None if dtype == "auto" else dtype)
        if dtype == "auto":
            dtype = "float32" if self.stored_dtype == "float32" else "bfloat16"
        return RuntimePolicy.inference(dtype)

    @property
    def search_dirs(self) -> list[Path]:
        """Where its tokenizer and generation_config.json may be."""
        return [self.path, self.path / "tokenizer"]


# ----------------------------------------------------------------------------- detection
def detect_format(path: Path) -> str | None:
    if (path / "config.json").is_file() and any((path / w).is_file() for w in _HF_WEIGHTS):
        return "hf"
    from hunyuan_jax import checkpoint_format

    if checkpoint_format.is_converted(path):
        return "converted"
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        return "run"
    return None


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Recognise a checkpoint directory and read its architecture (no weights)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"a checkpoint is a directory, got the file {path}")
    fmt = detect_format(path)
    if fmt == "hf":
        hf = read_json(path / "config.json")
        return Checkpoint(
            path, fmt, ModelConfig.from_hf(path), str(hf.get("torch_dtype") or "bfloat16")
        )
    if fmt == "converted":
        from hunyuan_jax import checkpoint_format

        cfg, dtype = checkpoint_format.stored_config(path)
        return Checkpoint(path, fmt, cfg, dtype)
    if fmt == "run":
        from hunyuan_jax.checkpointing import read_run_config

        cfg, runtime, _ = read_run_config(path)
        return Checkpoint(path, fmt, cfg, runtime.param_dtype, runtime)
    if _is_orbax_step(path):
        raise CheckpointError(
            f"{path} is an orbax checkpoint directory without its model config: pass the "
            f"train.py run directory (the one holding config.yaml and checkpoints/) or a "
            f"directory written by `python -m hunyuan_jax.convert hf-to-jax`"
        )
    known = "; ".join(f"{k}: {v}" for k, v in FORMATS.items())
    raise CheckpointError(f"{path} is not a checkpoint directory this program knows ({known})")


def _is_orbax_step(d: Path) -> bool:
    """orbax writes `_CHECKPOINT_METADATA` into each step directory (`DIR` or `DIR/<step>`)."""
    if (d / "_CHECKPOINT_METADATA").is_file() or (d / "_METADATA").is_file():
        return True
    return any(
        (s / "_CHECKPOINT_METADATA").is_file()
        for s in d.iterdir()
        if s.is_dir() and s.name.isdigit()
    )


def read_model_config(path: str | Path) -> ModelConfig:
    """The architecture named by a path: one of our YAML files (its `model:` section), a
    Hugging Face config.json, or any checkpoint directory `open_checkpoint` knows."""
    path = Path(path)
    if path.is_dir():
        return open_checkpoint(path).cfg
    if path.suffix == ".json":
        return ModelConfig.from_hf(path)
    data = read_yaml(path)
    return ModelConfig.from_dict(data.get("model", data), str(path))


# ----------------------------------------------------------------------------- weights
def load_params(ckpt: Checkpoint | str | Path, policy: RuntimePolicy, plan=None):
    """The model of `ckpt` with `policy`, every parameter created in the plan's layout
    (restored shard by shard for orbax formats; read tensor by tensor for HF)."""
    from sharding.plan import ShardingPlan

    if not isinstance(ckpt, Checkpoint):
        ckpt = open_checkpoint(ckpt)
    plan = plan or ShardingPlan.single()
    if ckpt.format == "hf":
        import jax.numpy as jnp

        from hunyuan_jax.hf_checkpoint import HFCheckpoint, load_numpy_params
        from hunyuan_jax.state import abstract_model, flat_shapes, model_from_arrays

        shapes = flat_shapes(abstract_model(ckpt.cfg, policy))
        arrays = load_numpy_params(
            ckpt.cfg, HFCheckpoint(ckpt.path), shapes, jnp.dtype(policy.param_dtype)
        )
        return model_from_arrays(ckpt.cfg, arrays, policy, plan)
    from flax import nnx

    from hunyuan_jax.state import abstract_model

    graphdef, abstract, rest = nnx.split(abstract_model(ckpt.cfg, policy, plan), nnx.Param, ...)
    target = plan.abstract(abstract)
    if ckpt.format == "converted":
        from hunyuan_jax.checkpoint_format import restore_param_state

        state = restore_param_state(ckpt.path, target)
    else:
        from hunyuan_jax.checkpointing import restore_run_params

        _, state = restore_run_params(ckpt.path, target)
    return nnx.merge(graphdef, state, rest)


# ----------------------------------------------------------------------------- tokenizer
def find_tokenizer(*dirs: Path):
    """The first tokenizer found in `dirs` (each dir itself, then its `tokenizer/`), or None.
    A directory with the checksums a training run records (`checksums.json`) is checked
    first: CheckpointError names a damaged file."""
    from hunyuan_jax.checkpointing import TOKENIZER_SUMS, tokenizer_problem
    from hunyuan_jax.tokenizer import load_tokenizer

    for d in dirs:
        d = Path(d)
        for cand in (d, d / "tokenizer"):
            if (cand / TOKENIZER_SUMS).is_file():
                problem = tokenizer_problem(cand)
                if problem is not None:
                    raise CheckpointError(problem)
            if cand.is_dir() and ((cand / "hy.tiktoken").is_file() or any(cand.glob("*.model"))):
                return load_tokenizer(cand)
    return None


def check_tokenizer(tokenizer, cfg: ModelConfig) -> None:
    """A tokenizer whose ids do not all fit the model's embedding is the wrong one."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(
            f"tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary is only "
            f"{cfg.vocab_size}: this tokenizer does not belong to this checkpoint"
        )


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
    tokenizer: Any | None  # hunyuan_jax.tokenizer.Tokenizer, if one was found
    sampling: SamplingConfig  # defaults (generation_config.json, else greedy)
    eos_ids: list[int]  # generation_config.json, else the tokenizer's, else config.json's

    @property
    def cfg(self) -> ModelConfig:
        return self.checkpoint.cfg

    @property
    def format(self) -> str:
        return self.checkpoint.format


def load(
    path: str | Path,
    *,
    dtype: str = "auto",
    policy: RuntimePolicy | None = None,
    plan=None,
    tokenizer: str | Path | None = None,
) -> Loaded:
    """Loads a checkpoint directory for decoding, whatever format it is in.

    dtype: see `Checkpoint.inference_policy` (ignored when `policy` is given).
    tokenizer: a tokenizer file or directory; by default one is looked for in the checkpoint
    directory and its `tokenizer/`; generation_config.json there sets the sampling defaults.
    """
    ckpt = open_checkpoint(path)
    policy = policy or ckpt.inference_policy(dtype)
    dirs = list(ckpt.search_dirs)
    if tokenizer is not None:
        from hunyuan_jax.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
        t = Path(tokenizer)
        dirs = [t if t.is_dir() else t.parent] + dirs
    else:
        tok = find_tokenizer(ckpt.path)
    if tok is not None:
        check_tokenizer(tok, ckpt.cfg)  # before the (possibly long) weight loading
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
        e = json.loads((d / "config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return []
    if e is None:
        return []
    return [int(x) for x in (e if isinstance(e, list) else [e])]
