"""What the AOT tool compiles: the programs train.py, infer.py and the server run, built by their
own public builders for abstract parameters (ShapeDtypeStructs carrying the plan's shardings; no
array is ever allocated).

| mode | program | built by |
|---|---|---|
| train | one optimizer step (forward, backward with the policy's remat, AdamW; state donated; any `objective`: `--set objective=grpo` lowers GRPO's) | `TrainStep(cfg, policy, tcfg, plan).lower(batch, seq, micro)` (here) |
| prefill | the engine's step over one prompt chunk of `seq` tokens, a pool of `batch` x `cache_len` tokens | `EngineCore(...).lower("step", seq)` (`hunyuan_jax.aot.serve`) |
| decode | the engine's step for `batch` sequences, one token each | `EngineCore(...).lower("step", bucket)` (`hunyuan_jax.aot.serve`) |
| serve | every program of the engine, the pool sized to the chip | `EngineCore(...).lower` per program (`hunyuan_jax.aot.serve`) |

infer.py, the server and RL rollouts all run the engine (`hunyuan_jax.engine`): the serving
modes lower its programs, never another decode loop.

The MoE dispatch is never chosen here: the model asks `hunyuan_jax.model.dispatch` (expert-parallel
when the plan shards the experts); the report names what it picked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from hunyuan_jax.errors import UsageError
from hunyuan_jax.model import dispatch
from hunyuan_jax.model.config import ModelConfig
from hunyuan_jax.model.lora import base_policy
from hunyuan_jax.model.policy import RuntimePolicy
from hunyuan_jax.train.config import TrainConfig
from hunyuan_jax.train.data import check_run
from hunyuan_jax.train.step import TrainStep
from sharding.plan import ShardingPlan

MODES = ("train", "prefill", "decode", "serve")
SERVING = ("prefill", "decode", "serve")  # the engine's programs (hunyuan_jax.aot.serve)
DEFAULT_SEQ = {"train": 4096, "prefill": 512}
DEFAULT_CACHE_LEN = 32768


@dataclasses.dataclass(frozen=True)
class Job:
    """One compile request: the mode, the three configs, the plan and the sizes (batch None:
    the smallest batch the program's layout allows)."""

    mode: str
    cfg: ModelConfig
    policy: RuntimePolicy
    plan: ShardingPlan
    tcfg: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    batch: int | None = None
    seq: int | None = None
    cache_len: int | None = None
    micro: int = 1
    cache_dtype: str | None = None

    def replace(self, **changes) -> Job:
        return dataclasses.replace(self, **changes)

    @property
    def is_train(self) -> bool:
        return self.mode == "train"


@dataclasses.dataclass(frozen=True)
class Program:
    """A program ready to lower: `lower()` -> jax.stages.Lowered, the abstract parameters it
    takes (with shardings), where it comes from, and its resolved sizes."""

    lower: Callable[[], Any]
    params: Any
    source: str
    batch: int
    seq: int  # train: sequence length; prefill: chunk; decode: 1 (one new token per row)
    cache_len: int | None  # None for train
    tokens: int  # tokens processed per step, whole slice
    step: Any = None  # train: the TrainStep (its state bytes: `remat_choice`'s pre-filter)

    @property
    def context(self) -> int:
        """Keys each query attends to (the FLOP model's attention length)."""
        return self.seq if self.cache_len is None else self.cache_len


def describe_dispatch(phase: str, job: Job, num_tokens: int) -> str:
    """The MoE dispatch `hunyuan_jax.model.dispatch` picks for this phase and plan, by name."""
    fn = dispatch.experts_fn_for(phase, job.cfg, job.policy, job.plan, num_tokens)
    name = fn.__qualname__.split(".<locals>")[0]
    return f"{fn.__module__.removeprefix('hunyuan_jax.')}.{name}"


def build(job: Job) -> Program:
    """The train step's program (the serving modes: `hunyuan_jax.aot.serve`)."""
    if not job.is_train:
        raise UsageError(f"--mode {job.mode}: the engine's programs (hunyuan_jax.aot.serve)")
    return train_program(job)


def train_program(job: Job) -> Program:
    """train.py's step: `TrainStep(...).lower(batch, seq, micro)` (batch [micro, rows, seq],
    rows over the plan's batch axes; default: one row per batch shard and micro-batch)."""
    seq = job.seq or min(DEFAULT_SEQ["train"], job.cfg.max_position_embeddings)
    micro = job.micro
    batch = job.batch
    tcfg = job.tcfg.replace(seq_len=seq)
    check_run(job.cfg, job.policy, tcfg, job.plan)  # train.py's checks: seq_len, mesh vs model
    if batch is None:
        batch = TrainStep(job.cfg, job.policy, job.tcfg, job.plan).batch_shards * micro
    tcfg = tcfg.replace(batch_size=batch, micro_batches=micro)
    step = TrainStep(job.cfg, job.policy, tcfg, job.plan)
    try:
        step.check_batch_layout(batch, micro)
    except ValueError as e:
        raise UsageError(f"--batch {batch} --micro {micro}: {e}") from None
    rows = batch // micro
    # GRPO's objective runs the inference (dropless) dispatch unless grpo.dropless is false
    grpo = tcfg.objective == "grpo"
    phase = "prefill" if grpo and tcfg.grpo.dropless else "train"
    source = (
        f"train_step.TrainStep (train.py's step{', objective grpo' if grpo else ''}), MoE "
        f"{describe_dispatch(phase, job, rows * seq)}"
        + (f" ({job.policy.train_dispatch})" if job.plan.shards("exp") and phase == "train" else "")
    )
    if tcfg.lora is not None:  # what trains and how the frozen base is held
        source += (
            f"; LoRA rank {tcfg.lora.rank} on {list(tcfg.lora.targets)}, frozen base "
            f"{base_policy(job.policy).weights}"
        )
    return Program(
        lambda: step.lower(batch, seq, micro),
        step.restore_target().params,
        source,
        batch,
        seq,
        None,
        batch * seq,
        step,
    )
