"""The training loop behind train.py: start or resume a run directory, step, log, checkpoint.

    summary = train(cfg, policy, tcfg)      # trains tcfg.run_dir up to tcfg.end_step

A run directory that holds checkpoints resumes from its newest complete one that verifies
(same losses as an uninterrupted run): a step whose arrays do not match their checksums, or
cannot be read, is moved to `checkpoints/corrupt-<step>` with one log line and the next older
one is tried; if none verifies the run stops (CheckpointError) saying what to delete.
Otherwise the weights are random or come from `tcfg.init_from` (any format
`hunyuan_jax.checkpoints.loading` knows, restored into the plan's shardings). The step itself is
`train_step.TrainStep`; data is `train_data.make_loader` (DPO: `dpo.make_dpo_loader` and the
reference log-probabilities, `dpo.attach_reference`; GRPO: the rollout source the entry point
passes, `engine.rollout.make_grpo_source`, whose batches are made from the current state);
metrics `metrics.MetricsLog`.
Each checkpoint records the health of the steps before it (`health`); a run stopped on a
non-finite loss names the last finite step and the newest healthy checkpoint, and what to do.
`profile_steps=(a, b)` writes a jax.profiler trace of steps a..b (1-based, inclusive, after
compilation) to <run>/profile, which TensorBoard's profile plugin / XProf opens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from hunyuan_jax.checkpoints import health, loading, lora_base
from hunyuan_jax.checkpoints.loading import open_checkpoint
from hunyuan_jax.checkpoints.lora_base import run_policy
from hunyuan_jax.checkpoints.runs import Checkpointer, read_run_config, write_run_config
from hunyuan_jax.data.corpus import check_batch, check_seq_len, gather_states, to_global
from hunyuan_jax.errors import CheckpointError, ConfigError, NonFiniteLoss
from hunyuan_jax.model.config import LoraConfig, ModelConfig
from hunyuan_jax.model.policy import RuntimePolicy
from hunyuan_jax.model.state import abstract_model, init_model
from hunyuan_jax.train.config import TrainConfig
from hunyuan_jax.train.data import make_loader as make_text_loader
from hunyuan_jax.train.dpo import attach_reference, make_dpo_loader
from hunyuan_jax.train.metrics import MetricsLog, peak_flops_per_device, progress_line, to_record
from hunyuan_jax.train.optim import active_params, group_sizes
from hunyuan_jax.train.run_lock import lock_run
from hunyuan_jax.train.step import TrainState, TrainStep
from sharding.plan import ShardingPlan


def train(
    mcfg: ModelConfig,
    policy: RuntimePolicy,
    tcfg: TrainConfig,
    *,
    log: Callable[[str], Any] = print,
    profile_steps: tuple[int, int] | None = None,
    plan: ShardingPlan | None = None,
    make_grpo_source: Callable | None = None,
) -> dict:
    """Trains (or resumes) the run in tcfg.run_dir up to tcfg.end_step. Returns a summary.
    `profile_steps=(a, b)`: a jax.profiler trace of steps a..b in <run>/profile. `plan`: the
    run's ShardingPlan, built by the entry point from `tcfg.mesh` / `tcfg.rules` (train.py
    does; without one it is built here from the same keys). `make_grpo_source`: objective
    'grpo''s batches (`engine.rollout.make_grpo_source`: the engine is below this package)."""
    if jax.process_index() != 0:
        log = lambda *_: None
    run_dir = Path(tcfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # One process per run directory, before anything in it is read or written (orbax's
    # manager removes unfinished checkpoints it finds): exit 4 naming the holder otherwise.
    with lock_run(run_dir, log):
        plan = plan or ShardingPlan.create(tcfg.mesh, tcfg.rules)
        ckpt = Checkpointer(run_dir, tcfg.keep_checkpoints, tcfg.async_checkpointing)
        try:
            return _train(
                mcfg, policy, tcfg, log, run_dir, plan, ckpt, profile_steps, make_grpo_source
            )
        finally:
            ckpt.close()  # pending async saves complete (or the process dies: tmp dirs only)


def _check_resume_config(run_dir: Path, mcfg: ModelConfig, tcfg: TrainConfig) -> None:
    try:
        saved, _, saved_train = read_run_config(run_dir)
    except CheckpointError:
        return
    if LoraConfig.from_value(saved_train.get("lora")) != tcfg.lora:
        raise CheckpointError(
            f"cannot resume {run_dir}: train.lora {tcfg.lora} differs from the run's "
            f"config.yaml ({saved_train.get('lora')}); its checkpoints hold "
            f"{'adapters' if saved_train.get('lora') else 'full parameters'}"
        )
    diff = [f for f in saved.__dataclass_fields__ if getattr(saved, f) != getattr(mcfg, f)]
    if diff:
        raise CheckpointError(
            f"cannot resume {run_dir}: the model config differs from the run's config.yaml "
            f"in {diff}"
        )


def _initial_state(step: TrainStep, mcfg, policy, tcfg, plan, log) -> TrainState:
    if tcfg.lora is not None:  # the frozen base (init_from or random) plus fresh adapters
        model = lora_base.training_model(tcfg.run_dir, mcfg, policy, tcfg, plan, False, log)
    elif tcfg.init_from:
        t0 = time.time()
        model = loading.load_params(loading.open_checkpoint(tcfg.init_from), policy, plan)
        log(f"[init] weights from {tcfg.init_from} ({time.time() - t0:.1f}s)")
    else:
        model = init_model(mcfg, policy, plan, tcfg.seed)
    return step.init_state(model)


def _train(mcfg, policy, tcfg, log, run_dir, plan, ckpt, profile_steps=None, grpo_source=None):
    # preference pairs (+ their reference log-probs, below), rollouts, or packed text
    make_loader = make_dpo_loader if tcfg.objective == "dpo" else make_text_loader
    if tcfg.objective == "grpo":
        if grpo_source is None:
            raise ConfigError("objective 'grpo' needs the engine's rollout source (train.py)")
        make_loader = grpo_source
    if tcfg.init_from:  # the checkpoint's architecture, also when resuming such a run
        mcfg = open_checkpoint(tcfg.init_from).cfg
    resume_step = ckpt.latest_step()
    if resume_step is not None:
        _check_resume_config(run_dir, mcfg, tcfg)
    if tcfg.lora is not None:  # the frozen base as stored when it is int8 / fp8 (QLoRA)
        policy = run_policy(run_dir, policy, tcfg, resume_step is not None)
    check_seq_len(tcfg.seq_len, mcfg.max_position_embeddings, tcfg.allow_long_sequences)
    _, loader = make_loader(tcfg, mcfg, run_dir, log)
    step = TrainStep(mcfg, policy, tcfg, plan)
    if step.remat_choice is not None:  # remat: auto (train/remat_choice.py)
        log(f"remat: {step.remat_choice.note}")
    step.check_batch_layout(tcfg.batch_size, tcfg.micro_batches)

    if resume_step is not None:
        resume_step, state = _resumed_state(step, loader, ckpt, mcfg, policy, tcfg, plan, log)
    else:
        state = _initial_state(step, mcfg, policy, tcfg, plan, log)
    if tcfg.objective == "dpo":  # computed from the initial weights once, read back on resume
        attach_reference(loader, step, state.params, tcfg, run_dir, resume_step is not None, log)
    rollouts = tcfg.objective == "grpo"
    if rollouts:  # full fine-tuning's reference: the initial weights, a second copy
        ref = None
        if tcfg.lora is None and tcfg.grpo.beta > 0:
            ref = jax.tree.map(jnp.copy, state.params)
            if resume_step is not None:
                ref = _initial_state(step, mcfg, policy, tcfg, plan, log).params
        loader.bind(step, ref)
    write_run_config(run_dir, mcfg, policy, tcfg)
    if policy.param_dtype != "float32":
        log(
            f"[train] warning: param_dtype={policy.param_dtype}: master weights and AdamW state "
            f"are kept in that dtype (float32 is the intended policy)"
        )

    start, end = int(resume_step or 0), tcfg.end_step
    sizes, n_active = _count_params(step, state, mcfg, policy, plan, log)
    metrics_log = MetricsLog(run_dir, start)
    history = health.History.from_metrics(metrics_log.path, start, tcfg.save_every)
    if start >= end:
        log(f"[train] nothing to do: at step {start}, end step {end}")
        metrics_log.close()
        return {"start_step": start, "end_step": start, "losses": []}

    peak = peak_flops_per_device(tcfg.peak_flops_per_device)
    flops_per_token = 6.0 * n_active
    losses, last_saved = [], start
    compiled, t_compile = None, None
    profiler = _StepProfiler(profile_steps, run_dir / "profile", start, end, log)
    t_log, tokens_since, data_s = time.time(), 0, 0.0
    for i in range(start, end):
        t_data = time.time()
        local = loader.batch_for(state) if rollouts else next(loader)
        data_s += time.time() - t_data
        _check_loss_tokens(local, i + 1)
        batch = to_global(local, step.batch_sharding, tcfg.batch_size)
        if compiled is None:
            t0 = time.time()
            compiled = step.compile(state, batch)
            t_compile = time.time() - t0
            log(
                f"[train] step compiled in {t_compile:.1f}s; steps {start} -> {end}, "
                f"{tcfg.tokens_per_step:,} tokens per step"
            )
            t_log, data_s = time.time(), 0.0
        done = i + 1
        profiler.before(done)
        state, metrics = compiled(state, batch)
        m = jax.device_get(metrics)
        profiler.after(done, state)
        if rollouts:
            m = {**m, **loader.metrics}
        rec = to_record(done, m)
        # GRPO's loss is centred near 0 and may be negative: its health is the gradient norm's
        history.add(done, 0.0 if rollouts else m["loss"], m["grad_norm"], m["ok"])
        if not m["ok"]:
            msg = (
                f"non-finite loss or gradient at step {done} (loss={float(m['loss'])}, "
                f"grad_norm={float(m['grad_norm'])})"
            )
            if tcfg.on_nonfinite == "stop":
                profiler.stop()
                metrics_log.write(rec)
                metrics_log.close()
                raise NonFiniteLoss(
                    health.stop_report(msg, history.last_finite(), ckpt.kept_health(), run_dir)
                )
            log(f"[train] {msg}: batch skipped (parameters unchanged)")
        losses.append(float(m["loss"]))
        tokens_since += tcfg.tokens_per_step
        if done % tcfg.log_every == 0 or done == end:
            tps = tokens_since / max(time.time() - t_log, 1e-9)
            mfu = flops_per_token * tps / (peak * jax.device_count()) if peak else None
            rec.update(tokens_per_s=tps, mfu=mfu)
            if rollouts:  # the train step's own rate, rollouts (data) excluded
                busy = max(time.time() - t_log - data_s, 1e-9)
                rec["grpo/train_tokens_per_s"] = tokens_since / busy
            log(progress_line(done, m, tps, mfu))
            t_log, tokens_since, data_s = time.time(), 0, 0.0
        metrics_log.write(rec)
        if done % tcfg.save_every == 0 or done == end:
            h = history.assess(done, last_saved)
            ckpt.save(done, state.params, state.opt_state, gather_states(loader.state()), h)
            if not h["healthy"]:
                log(f"[ckpt] warning: checkpoint {health.describe(done, h)}")
            last_saved = done
    profiler.stop()
    metrics_log.close()
    log(f"[train] done at step {end}; checkpoints {ckpt.all_steps()} in {ckpt.directory}")
    return {
        "start_step": start,
        "end_step": end,
        "losses": losses,
        "compile_s": t_compile,
        "params": sum(sizes.values()),
        "active_params": n_active,
    }


def _resumed_state(step: TrainStep, loader, ckpt, mcfg, policy, tcfg, plan, log):
    """(step, TrainState) of the run's newest checkpoint that verifies, the data iterator
    restored to it (a LoRA run's frozen base bound first, its digest checked)."""
    run_dir = Path(tcfg.run_dir)
    if tcfg.lora is not None:  # the frozen base the adapters belong to (digest checked)
        step.bind_frozen(lora_base.training_model(run_dir, mcfg, policy, tcfg, plan, True, log))
    t0 = time.time()
    resume_step, params, opt_state, data_states = _restore_verified(ckpt, step, run_dir, log)
    state = TrainState(
        params,
        opt_state,
        jax.device_put(jnp.asarray(resume_step, jnp.int32), step.shardings.step),
    )
    if str(jax.process_index()) not in data_states:
        raise CheckpointError(
            f"checkpoint {resume_step} holds data-iterator states of processes "
            f"{sorted(data_states)}; this is process {jax.process_index()} of "
            f"{jax.process_count()} (resume with the same host count)"
        )
    loader.restore(data_states[str(jax.process_index())])
    log(
        f"[ckpt] resumed from step {resume_step} ({time.time() - t0:.1f}s, checksums "
        f"verified); data at {loader.state()}"
    )
    return resume_step, state


def _count_params(step: TrainStep, state: TrainState, mcfg, policy, plan, log):
    """(parameter counts per group, active parameters per token), logged once. LoRA: the state
    is the adapters; the MFU counts the (frozen) model's float parameters."""
    sizes = group_sizes(state.params)
    counted = state.params
    if step.frozen is not None:
        counted = nnx.state(abstract_model(mcfg, policy.replace(weights="auto")))
    n_active = active_params(mcfg, counted)
    scales = {k: round(v, 4) for k, v in step.optimizer.scales.items()}
    what = f"{sum(sizes.values()):,} params ({n_active:,} active per token)"
    if step.frozen is not None:  # what trains (the adapters) apart from what runs (the base)
        base = sum(group_sizes(counted).values())
        what = (
            f"{sum(sizes.values()):,} trainable LoRA params; frozen base {base:,} params "
            f"({n_active:,} active per token)"
        )
    log(f"[model] {what}; lr factors {scales}; {plan.describe()}")
    return sizes, n_active


class _StepProfiler:
    """A jax.profiler trace (process 0) of steps a..b into `out`; a range outside this run's
    steps (start, end] is said in one log line and traces what overlaps."""

    def __init__(self, steps, out: Path, start: int, end: int, log):
        self.range, self.out, self.log, self.active = None, out, log, False
        if steps is None or jax.process_index() != 0:
            return
        a, b = max(steps[0], start + 1), min(steps[1], end)
        if a > b:
            log(f"[profile] steps {steps[0]}:{steps[1]} are outside this run's {start + 1}:{end}")
            return
        self.range = (a, b)

    def before(self, step: int) -> None:
        if self.range and step == self.range[0]:
            self.out.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.out))
            self.active = True

    def after(self, step: int, state) -> None:
        if self.active and step == self.range[1]:
            jax.block_until_ready(state)
            self.stop()
            self.log(
                f"[profile] steps {self.range[0]}:{step} traced to {self.out} "
                f"(tensorboard --logdir {self.out.parent}, Profile tab; or XProf)"
            )

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def _any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process (every process gets the same answer)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


def _restore_verified(ckpt, step: TrainStep, run_dir: Path, log):
    """(step, params, opt_state, data states) of the newest checkpoint that restores and
    verifies; newer ones that fail are moved to checkpoints/corrupt-<step>, each with a log
    line. CheckpointError (what to delete) when none verifies."""
    target = step.restore_target()
    failed = []
    for s in reversed(ckpt.all_steps()):
        err = None
        try:
            params, opt_state, data = ckpt.restore(s, target.params, target.opt_state)
        except CheckpointError as e:
            err = e
        if _any_process(err is not None):
            failed.append((s, err or "failed on another process"))
            continue
        if ckpt.record(s) is None:
            log(f"[ckpt] checkpoint {s} has no integrity record (older code): not verified")
        for bad, why in failed:
            moved = ckpt.set_aside(bad)
            log(
                f"[ckpt] checkpoint {bad} fails verification ({why}); moved to {moved}, "
                f"resuming from step {s}, the newest checkpoint that verifies"
            )
        return s, params, opt_state, data
    listing = "; ".join(f"step {s}: {why}" for s, why in failed)
    raise CheckpointError(
        f"no checkpoint of {run_dir} verifies ({listing}); delete {ckpt.directory} to start "
        f"over (or put back good copies of those steps)"
    )


def _check_loss_tokens(local_batch: dict, step: int) -> None:
    """A step with no loss tokens in the whole (global) batch is an error, not a step."""
    if jax.process_count() == 1:
        check_batch(local_batch, step)
        return
    local = np.asarray([float(np.sum(local_batch["loss_mask"]))], np.float64)
    total = float(np.sum(multihost_utils.process_allgather(local)))
    if total == 0:
        check_batch({"loss_mask": np.zeros_like(local_batch["loss_mask"])}, step)
