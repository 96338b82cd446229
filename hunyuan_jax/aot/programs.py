"""What the AOT tool compiles: the programs train.py and infer.py run, built by their own
public builders for abstract parameters (ShapeDtypeStructs carrying the plan's shardings; no
array is ever allocated).

| mode | program | built by |
|---|---|---|
| train | one optimizer step (forward, backward with the policy's remat, AdamW; state donated; any `objective`: `--set objective=grpo` lowers GRPO's) | `TrainStep(cfg, policy, tcfg, plan).lower(batch, seq, micro)` |
| prefill | one prefill chunk of `seq` tokens written into a `cache_len`-slot KV cache | `Generator(model).lower("prefill", batch=, cache_len=, chunk=)` |
| decode | the decode program as infer.py runs it (`decode_loop='auto'`: one token per call on TPU, the while loop elsewhere) | `Generator(model).lower("decode", ...)` |
| decode-step | one token per call for every row (`decode_loop='host'`), cache donated | `Generator(model, decode_loop="host").lower("decode", ...)` |

The MoE dispatch is never chosen here: the model asks `hunyuan_jax.model.dispatch` (expert-parallel
when the plan shards the experts); the report names what it picked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from hunyuan_jax.decode.generate import Generator
from hunyuan_jax.errors import UsageError
from hunyuan_jax.model import dispatch
from hunyuan_jax.model.config import ModelConfig
from hunyuan_jax.model.lora import base_policy
from hunyuan_jax.model.policy import RuntimePolicy
from hunyuan_jax.model.state import abstract_model
from hunyuan_jax.train.config import TrainConfig
from hunyuan_jax.train.data import check_run
from hunyuan_jax.train.step import TrainStep
from sharding.plan import ShardingPlan

MODES = ("train", "prefill", "decode", "decode-step")
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
    if job.mode not in MODES:
        raise UsageError(f"--mode must be one of {MODES}, got {job.mode!r}")
    return train_program(job) if job.is_train else serving_program(job)


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
    )


def serving_program(job: Job) -> Program:
    """infer.py's programs: the Generator over the abstract model (`policy` as serving uses
    it), lowered for `batch` rows and a `cache_len`-slot KV cache."""
    limit = job.cfg.max_position_embeddings
    cache_len = job.cache_len or min(DEFAULT_CACHE_LEN, limit)
    if cache_len > limit:  # as the server's --max-len: positions past the model's are untrained
        raise UsageError(
            f"--cache-len {cache_len} exceeds the model's max_position_embeddings {limit}"
        )
    if job.mode == "prefill":
        seq = job.seq or min(DEFAULT_SEQ["prefill"], cache_len)
        if seq > cache_len:
            raise UsageError(f"--seq {seq} (the prefill chunk) exceeds --cache-len {cache_len}")
    else:
        seq = 1
    loop = "host" if job.mode == "decode-step" else "auto"
    try:
        gen = Generator(
            abstract_model(job.cfg, job.policy, job.plan),
            cache_dtype=job.cache_dtype,
            prefill_chunk=seq,
            decode_loop=loop,
        )
    except ValueError as e:  # e.g. an unknown cache dtype
        raise UsageError(f"--cache-dtype: {e}") from None
    multiple = gen.batch_multiple()
    batch = job.batch or multiple
    if batch % multiple:
        raise UsageError(
            f"--batch {batch} is not a multiple of the {multiple} devices the cache batch is "
            f"sharded over ({job.plan.describe()}); the Generator pads batches to that multiple"
        )
    program = "prefill" if job.mode == "prefill" else "decode"
    phase = "prefill" if program == "prefill" else "decode"
    moe = describe_dispatch(phase, job, batch * seq)
    if program == "prefill":
        source = f"generate.Generator prefill chunk, MoE {moe}"
    else:
        how = "one token per call" if gen.decode_loop == "host" else "while loop"
        source = f"generate.Generator decode (decode_loop={gen.decode_loop}: {how}), MoE {moe}"
    args = gen.abstract_args(program, batch=batch, cache_len=cache_len, chunk=seq)
    return Program(
        lambda: gen.lower(program, batch=batch, cache_len=cache_len, chunk=seq),
        args[0],
        source + f", cache {gen.cache_dtype}",
        batch,
        seq,
        cache_len,
        batch * seq,
    )
