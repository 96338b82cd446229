"""The training loop behind train.py: start or resume a run directory, step, log, checkpoint.

    summary = train(cfg, policy, tcfg)      # trains tcfg.run_dir up to tcfg.end_step

A run directory that holds checkpoints resumes from its last complete one (same losses as an
uninterrupted run); otherwise the weights are random or come from `tcfg.init_from` (any format
`hunyuan_jax.loading` knows, restored into the plan's shardings). The step itself is
`train_step.TrainStep`; data is `train_data.make_loader`; metrics `metrics.MetricsLog`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from hunyuan_jax.config import ModelConfig
from hunyuan_jax.errors import CheckpointError, NonFiniteLoss
from hunyuan_jax.metrics import MetricsLog, peak_flops_per_device, progress_line, to_record
from hunyuan_jax.optim import active_params, group_sizes
from hunyuan_jax.policy import RuntimePolicy
from hunyuan_jax.train_config import TrainConfig
from hunyuan_jax.train_step import TrainState, TrainStep
from sharding.plan import ShardingPlan


def train(
    mcfg: ModelConfig,
    policy: RuntimePolicy,
    tcfg: TrainConfig,
    *,
    log: Callable[[str], Any] = print,
) -> dict:
    """Trains (or resumes) the run in tcfg.run_dir up to tcfg.end_step. Returns a summary."""
    from hunyuan_jax.checkpointing import Checkpointer

    if jax.process_index() != 0:
        log = lambda *_: None
    run_dir = Path(tcfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = ShardingPlan.create(tcfg.mesh, tcfg.rules)
    ckpt = Checkpointer(run_dir, tcfg.keep_checkpoints, tcfg.async_checkpointing)
    try:
        return _train(mcfg, policy, tcfg, log, run_dir, plan, ckpt)
    finally:
        ckpt.close()  # pending async saves complete (or the process dies: tmp dirs only)


def _check_resume_config(run_dir: Path, mcfg: ModelConfig) -> None:
    from hunyuan_jax.checkpointing import read_run_config

    try:
        saved, _, _ = read_run_config(run_dir)
    except CheckpointError:
        return
    diff = [f for f in saved.__dataclass_fields__ if getattr(saved, f) != getattr(mcfg, f)]
    if diff:
        raise CheckpointError(
            f"cannot resume {run_dir}: the model config differs from the run's config.yaml "
            f"in {diff}"
        )


def _initial_state(step: TrainStep, mcfg, policy, tcfg, plan, log) -> TrainState:
    from hunyuan_jax.state import init_model

    if tcfg.init_from:
        from hunyuan_jax import loading

        t0 = time.time()
        model = loading.load_params(loading.open_checkpoint(tcfg.init_from), policy, plan)
        log(f"[init] weights from {tcfg.init_from} ({time.time() - t0:.1f}s)")
    else:
        model = init_model(mcfg, policy, plan, tcfg.seed)
    return step.init_state(model)


def _train(mcfg, policy, tcfg, log, run_dir, plan, ckpt) -> dict:
    from hunyuan_jax.checkpointing import write_run_config
    from hunyuan_jax.data import check_seq_len, gather_states, to_global
    from hunyuan_jax.train_data import make_loader

    resume_step = ckpt.latest_step()
    if resume_step is not None:
        _check_resume_config(run_dir, mcfg)
    elif tcfg.init_from:  # the checkpoint's architecture from here on
        from hunyuan_jax.loading import open_checkpoint

        mcfg = open_checkpoint(tcfg.init_from).cfg
    check_seq_len(tcfg.seq_len, mcfg.max_position_embeddings, tcfg.allow_long_sequences)
    _, loader = make_loader(tcfg, mcfg, run_dir, log)
    step = TrainStep(mcfg, policy, tcfg, plan)
    step.check_batch_layout(tcfg.batch_size, tcfg.micro_batches)

    if resume_step is not None:
        t0 = time.time()
        target = step.restore_target()
        params, opt_state, data_states = ckpt.restore(resume_step, target.params, target.opt_state)
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
            f"[ckpt] resumed from step {resume_step} ({time.time() - t0:.1f}s); data at "
            f"{loader.state()}"
        )
    else:
        state = _initial_state(step, mcfg, policy, tcfg, plan, log)
    write_run_config(run_dir, mcfg, policy, tcfg)
    if policy.param_dtype != "float32":
        log(
            f"[train] warning: param_dtype={policy.param_dtype}: master weights and AdamW state "
            f"are kept in that dtype (float32 is the intended policy)"
        )

    start, end = int(resume_step or 0), tcfg.end_step
    sizes = group_sizes(state.params)
    n_active = active_params(mcfg, state.params)
    scales = {k: round(v, 4) for k, v in step.optimizer.scales.items()}
    log(
        f"[model] {sum(sizes.values()):,} params ({n_active:,} active per token); lr factors "
        f"{scales}; {plan.describe()}"
    )
    metrics_log = MetricsLog(run_dir, start)
    if start >= end:
        log(f"[train] nothing to do: at step {start}, end step {end}")
        metrics_log.close()
        return {"start_step": start, "end_step": start, "losses": []}

    peak = peak_flops_per_device(tcfg.peak_flops_per_device)
    flops_per_token = 6.0 * n_active
    losses, last_good = [], resume_step
    compiled, t_compile = None, None
    t_log, tokens_since = time.time(), 0
    for i in range(start, end):
        local = next(loader)
        _check_loss_tokens(local, i + 1)
        batch = to_global(local, step.batch_sharding, tcfg.batch_size)
        if compiled is None:
            t0 = time.time()
            compiled = step.jitted.lower(state, batch).compile()
            t_compile = time.time() - t0
            log(
                f"[train] step compiled in {t_compile:.1f}s; steps {start} -> {end}, "
                f"{tcfg.tokens_per_step:,} tokens per step"
            )
            t_log = time.time()
        state, metrics = compiled(state, batch)
        m = jax.device_get(metrics)
        done = i + 1
        rec = to_record(done, m)
        if not m["ok"]:
            msg = (
                f"non-finite loss or gradient at step {done} (loss={float(m['loss'])}, "
                f"grad_norm={float(m['grad_norm'])})"
            )
            if tcfg.on_nonfinite == "stop":
                metrics_log.write(rec)
                metrics_log.close()
                where = (
                    f"the last good checkpoint is step {last_good} in {ckpt.directory}"
                    if last_good is not None
                    else "no checkpoint was saved"
                )
                raise NonFiniteLoss(f"{msg}: stopping without saving; {where}")
            log(f"[train] {msg}: batch skipped (parameters unchanged)")
        losses.append(float(m["loss"]))
        tokens_since += tcfg.tokens_per_step
        if done % tcfg.log_every == 0 or done == end:
            tps = tokens_since / max(time.time() - t_log, 1e-9)
            mfu = flops_per_token * tps / (peak * jax.device_count()) if peak else None
            rec.update(tokens_per_s=tps, mfu=mfu)
            log(progress_line(done, m, tps, mfu))
            t_log, tokens_since = time.time(), 0
        metrics_log.write(rec)
        if done % tcfg.save_every == 0 or done == end:
            ckpt.save(done, state.params, state.opt_state, gather_states(loader.state()))
            last_good = done
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


def _check_loss_tokens(local_batch: dict, step: int) -> None:
    """A step with no loss tokens in the whole (global) batch is an error, not a step."""
    from hunyuan_jax.data import check_batch

    if jax.process_count() == 1:
        check_batch(local_batch, step)
        return
    import numpy as np
    from jax.experimental import multihost_utils

    local = np.asarray([float(np.sum(local_batch["loss_mask"]))], np.float64)
    total = float(np.sum(multihost_utils.process_allgather(local)))
    if total == 0:
        check_batch({"loss_mask": np.zeros_like(local_batch["loss_mask"])}, step)
