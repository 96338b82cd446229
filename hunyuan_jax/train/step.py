"""The one builder of the train step: `TrainStep(cfg, policy, tcfg, plan)`.

State = TrainState(params: the model's nnx.State (fp32 master weights, the tree decoding uses),
opt_state: optax state, step: int32). One `jax.jit` with explicit in/out shardings from the
sharding plan and the state donated. train.py's loop (`train_loop`), the AOT tool and
bench/train_step.py all build their step here and nowhere else.

Inside the step, the global batch [micro_batches, rows, seq] is processed micro-batch by
micro-batch in a `lax.scan` that accumulates fp32 gradients (gradient accumulation), then one
optimizer update. lax.scan rather than `optax.MultiSteps`: one update per compiled call, so the
step counter, schedule, logging and checkpoints all count optimizer steps; no accumulator
persisted in the optimizer state; and the whole batch's gradient is exactly the token-weighted
sum of the micro-batch gradients (each micro-batch's cross entropy is weighted by its share of
the batch's loss tokens; the auxiliary losses are averaged).

Compute runs in `policy.compute_dtype` (bfloat16 on TPU): the model casts the fp32 parameters
as it uses them, so gradients, moments and updates stay fp32. The MoE dispatch of training is
`dispatch.experts_fn_for("train", ...)` (chosen by the model). PRNG: key(seed) folded with the
step and the micro-batch index drives dropout and the random re-assignment, so a resumed run
replays exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hunyuan_jax.errors import ConfigError
from hunyuan_jax.model import lora
from hunyuan_jax.model.config import ModelConfig
from hunyuan_jax.model.policy import RuntimePolicy
from hunyuan_jax.model.state import abstract_model
from hunyuan_jax.train.config import TrainConfig
from hunyuan_jax.train.dpo import DPOObjective
from hunyuan_jax.train.grpo import GRPOObjective
from hunyuan_jax.train.losses import lm_loss
from hunyuan_jax.train.optim import Optimizer, make_optimizer
from hunyuan_jax.train.remat_choice import (
    Choice,
    GiB,
    choose,
    compiled_bytes,
    fixed_choice,
    is_oom,
    state_bytes_per_chip,
)
from sharding.plan import ShardingPlan

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")

# objective(model, micro_batch, key) -> (loss, metrics with at least ce_loss, aux_loss,
# z_loss, tokens, expert_load): the LM loss by default; other objectives (DPO, GRPO) plug in here.
# `ce_loss` is the token-weighted part of the loss (weighted over micro-batches by `tokens`),
# the rest is averaged. An objective may also have `extra_batch_keys` (float32 arrays laid
# out like the batch), `loss_tokens(batch)` (the batch's total of `tokens`; default the sum
# of loss_mask), and metrics named "<objective>/..." (averaged over micro-batches).
Objective = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


def default_objective(tcfg: TrainConfig) -> Objective | None:
    """The objective `tcfg.objective` names; None = the LM loss (`TrainStep._lm_objective`)."""
    if tcfg.objective == "dpo":
        return DPOObjective(tcfg)
    if tcfg.objective == "grpo":
        return GRPOObjective(tcfg)
    return None


class TrainState(NamedTuple):
    params: Any  # nnx.State of the model
    opt_state: Any  # optax state
    step: jax.Array  # int32 scalar: optimizer steps taken (batches consumed)


class TrainStep:
    """One optimizer step for an architecture, a runtime policy, a train config and a plan:
    the abstract state and its shardings, the batch layout, and the jitted step. The loss is
    `tcfg.objective`'s (`default_objective`: the LM loss, or DPO), or `objective` if given.

        step = TrainStep(cfg, policy, tcfg, plan)
        state = step.init_state(model)            # params placed, optimizer state created
        state, metrics = step(state, batch)       # batch: BATCH_KEYS -> [micro, rows, seq]
        compiled = step.compile(state, batch)     # compiled(state, batch), as train.py runs it
        step.lower()                              # abstract lowering (AOT tool)

    `policy.remat == "auto"`: the rematerialisation is chosen here, before anything is built
    (`hunyuan_jax.train.remat_choice`: the ladder, compiled per rung for the plan's TPU devices
    against `hbm_gib` or the chip's usable HBM; full remat elsewhere); `self.policy` is the
    chosen one and `self.remat_choice` says how (its `result`: the bytes per device of the rung
    taken, None when not compiled; `remat_choice` None when the policy names its remat).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        policy: RuntimePolicy,
        tcfg: TrainConfig,
        plan: ShardingPlan,
        optimizer: Optimizer | None = None,
        objective: Objective | None = None,
        hbm_gib: float | None = None,
    ):
        self.cfg, self.policy, self.tcfg, self.plan = cfg, policy, tcfg, plan
        self.optimizer = optimizer or make_optimizer(tcfg, cfg)
        self.objective = objective or default_objective(tcfg) or self._lm_objective
        self.remat_choice: Choice | None = None
        if policy.remat == "auto":
            self.remat_choice = self._choose_remat(hbm_gib)
            self.policy = policy = self.remat_choice.policy
        self.batch_keys = BATCH_KEYS + tuple(getattr(self.objective, "extra_batch_keys", ()))
        # LoRA (`tcfg.lora`): only the adapters are state (trained, optimized, checkpointed);
        # the frozen base is a separate, undonated argument of the step (`self.frozen`).
        self.frozen = None
        if tcfg.lora is None:
            self.graphdef, params = nnx.split(abstract_model(cfg, policy, plan))
            frozen, self.frozen_shardings = None, None
        else:
            self.graphdef, params, frozen = lora.split(
                abstract_model(
                    cfg, policy, plan, weights=lora.base_policy(policy).weights, lora=tcfg.lora
                )
            )
            self.frozen_shardings = plan.state_shardings(frozen)
        self.abstract_frozen = frozen
        opt_state = jax.eval_shape(self.optimizer.tx.init, params)
        self.abstract_state = TrainState(params, opt_state, jax.ShapeDtypeStruct((), jnp.int32))
        self.shardings = TrainState(
            plan.state_shardings(params), plan.state_shardings(opt_state), plan.replicated()
        )
        self.batch_sharding = self._batch_sharding()
        self.fn = self._make_step()
        batch_sh = dict.fromkeys(self.batch_keys, self.batch_sharding)
        if plan.is_sharded:
            self.jitted = jax.jit(
                self.fn,
                in_shardings=(self.shardings, batch_sh, self.frozen_shardings),
                out_shardings=(self.shardings, plan.replicated()),
                donate_argnums=(0,),
            )
        else:
            self.jitted = jax.jit(self.fn, donate_argnums=(0,))

    # ------------------------------------------------------------------ remat: auto
    def _choose_remat(self, hbm_gib: float | None) -> Choice:
        """`remat_choice.choose` over this step's rungs, each compiled for the plan's devices
        (train.py's sizes: tcfg.batch_size / micro_batches rows of tcfg.seq_len tokens)."""
        devices = self.plan.devices
        hbm = None if hbm_gib is None else hbm_gib * GiB
        if hbm is None and devices[0].platform == "tpu":
            try:  # a real chip says what XLA lets a program use; compile-only devices do not
                local = [d for d in devices if d.process_index == jax.process_index()]
                hbm = float(local[0].memory_stats()["bytes_limit"])
            except Exception:
                hbm = None
        if hbm is None:
            return fixed_choice(
                self.policy,
                f"{devices[0].platform} devices, no usable HBM size to choose against: full "
                "remat (runtime.remat: save / none / ... names another policy)",
            )

        def build(policy):
            return TrainStep(self.cfg, policy, self.tcfg, self.plan, self.optimizer, self.objective)

        def attempt(policy):
            step = build(policy)
            try:
                used = compiled_bytes(step.lower().compile())
            except Exception as e:  # the compiler's out-of-memory verdict
                if not is_oom(e):
                    raise
                return False, None, None
            return used <= hbm, used, used

        full = build(self.policy.replace(remat="full"))
        rows = self.tcfg.batch_size // self.tcfg.micro_batches
        return choose(
            self.cfg,
            self.policy,
            state=full.state_bytes(),
            tokens=rows * self.tcfg.seq_len,
            devices=len(devices),
            hbm_bytes=hbm,
            attempt=attempt,
        )

    def state_bytes(self) -> float:
        """Bytes per chip of the train state (parameters, their gradient, optimizer state,
        LoRA's frozen base): the fixed part of `remat_choice.estimate_bytes`."""
        sh = self.shardings if self.plan.is_sharded else TrainState(None, None, None)
        pairs = [(self.abstract_state.params, sh.params)] * 2  # parameters and gradient
        pairs.append((self.abstract_state.opt_state, sh.opt_state))
        if self.abstract_frozen is not None:
            pairs.append((self.abstract_frozen, self.frozen_shardings))
        return state_bytes_per_chip(pairs)

    # ------------------------------------------------------------------ layout
    def _batch_sharding(self):
        """[micro, rows, seq] arrays: rows over the plan's batch axes (which must divide)."""
        if not self.plan.is_sharded:
            return self.plan.replicated()
        (rows,) = self.plan.spec(("batch",))
        return NamedSharding(self.plan.mesh, P(None, rows, None))

    @property
    def batch_shards(self) -> int:
        return self.plan.size("batch")

    def check_batch_layout(self, batch_size: int, micro_batches: int) -> None:
        rows = batch_size // micro_batches
        if rows % self.batch_shards:
            raise ConfigError(
                f"batch_size / micro_batches = {rows} rows per micro-batch must be divisible by "
                f"the {self.batch_shards} devices the batch is sharded over "
                f"({self.plan.describe()})"
            )

    def abstract_batch(
        self,
        batch_size: int | None = None,
        seq_len: int | None = None,
        micro_batches: int | None = None,
    ) -> dict:
        """ShapeDtypeStructs of a batch (default: the train config's sizes)."""
        b = batch_size or self.tcfg.batch_size
        s = seq_len or self.tcfg.seq_len
        m = micro_batches or self.tcfg.micro_batches
        self.check_batch_layout(b, m)
        shape = (m, b // m, s)
        out = {
            k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding)
            for k in self.batch_keys
        }
        for k in ("loss_mask", *getattr(self.objective, "extra_batch_keys", ())):
            out[k] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self.batch_sharding)
        return out

    # ------------------------------------------------------------------ state
    def init_state(self, model: nnx.Module) -> TrainState:
        """The TrainState of a model (random or loaded): parameters placed as the plan says
        (a no-op when already placed), optimizer state created sharded. A LoRA model (base +
        `lora.add_adapters`): the adapters are the state, the base becomes `self.frozen`."""
        params = self.bind_frozen(model)
        params = jax.device_put(params, self.shardings.params)
        opt_init = jax.jit(
            self.optimizer.tx.init,
            out_shardings=self.shardings.opt_state if self.plan.is_sharded else None,
        )
        step = jax.device_put(jnp.zeros((), jnp.int32), self.shardings.step)
        return TrainState(params, opt_init(params), step)

    def bind_frozen(self, model: nnx.Module):
        """Splits `model` into (trainable parameters, frozen base); keeps the base, placed, as
        the step's frozen argument (LoRA); returns the trainable parameters."""
        if self.tcfg.lora is None:
            return nnx.split(model)[1]
        _, params, frozen = lora.split(model)
        self.frozen = (
            jax.device_put(frozen, self.frozen_shardings) if self.plan.is_sharded else frozen
        )
        return params

    def compile(self, state: TrainState, batch: dict):
        """The step compiled for these arguments, called as `compiled(state, batch)`."""
        compiled = self.jitted.lower(state, batch, self.frozen).compile()
        return lambda s, b: compiled(s, b, self.frozen)

    def restore_target(self) -> TrainState:
        """The abstract TrainState with shardings (what a checkpoint restore fills)."""
        return self.plan.abstract(self.abstract_state, self.shardings)

    # ------------------------------------------------------------------ the step
    def _lm_objective(self, model, micro: dict, key):
        return lm_loss(
            model,
            micro,
            key=key,
            aux_loss_coef=self.tcfg.aux_loss_coef,
            z_loss_coef=self.tcfg.z_loss_coef,
        )

    def _make_step(self):
        graphdef, opt, objective = self.graphdef, self.optimizer, self.objective
        base_key = jax.random.key(self.tcfg.seed)
        loss_tokens = getattr(objective, "loss_tokens", None) or (
            lambda batch: jnp.sum(batch["loss_mask"].astype(jnp.float32))
        )

        def step_fn(state: TrainState, batch: dict, frozen=None):
            key = jax.random.fold_in(base_key, state.step)
            num_micro = batch["inputs"].shape[0]
            total_tokens = jnp.maximum(loss_tokens(batch), 1.0)

            def micro_objective(params, micro, mkey):
                rest = () if frozen is None else (frozen,)
                loss, m = objective(nnx.merge(graphdef, params, *rest), micro, mkey)
                ce = m["ce_loss"]
                # The batch's token-mean cross entropy is sum_i ce_i * tokens_i / tokens.
                return ce * (m["tokens"] / total_tokens) + (loss - ce) / num_micro, m

            grad_fn = jax.value_and_grad(micro_objective, has_aux=True)

            def one(params, i):
                micro = {k: v[i] for k, v in batch.items()}
                (obj, m), g = grad_fn(params, micro, jax.random.fold_in(key, i))
                m = dict(m)
                m["ce_sum"] = m.pop("ce_loss") * m["tokens"]
                m["objective"] = obj
                return g, m

            if num_micro == 1:
                grads, sums = one(state.params, 0)
            else:

                def body(carry, i):
                    acc, msum = carry
                    g, m = one(state.params, i)
                    return (jax.tree.map(jnp.add, acc, g), jax.tree.map(jnp.add, msum, m)), None

                zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
                g_shape, m_shape = jax.eval_shape(one, state.params, 0)
                (grads, sums), _ = jax.lax.scan(
                    body, (zeros(g_shape), zeros(m_shape)), jnp.arange(num_micro)
                )

            grad_norm = optax.tree.norm(grads)
            loss = sums["objective"]
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            updates, new_opt = opt.tx.update(grads, state.opt_state, state.params)
            new_params = optax.apply_updates(state.params, updates)
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
            new_state = TrainState(
                keep(new_params, state.params), keep(new_opt, state.opt_state), state.step + 1
            )
            metrics = {
                "loss": loss,
                "ce_loss": sums["ce_sum"] / total_tokens,
                "aux_loss": sums["aux_loss"] / num_micro,
                "z_loss": sums["z_loss"] / num_micro,
                "expert_load": sums["expert_load"] / num_micro,
                "tokens": sums["tokens"],
                "grad_norm": grad_norm,
                "lr": opt.schedule(state.step),
                "ok": ok,
            }
            for name in sums:
                if name in ("rerouted_fraction", "dropped_fraction") or "/" in name:
                    metrics[name] = sums[name] / num_micro
            return new_state, metrics

        return step_fn

    def __call__(self, state: TrainState, batch: dict):
        return self.jitted(state, batch, self.frozen)

    def lower(
        self,
        batch_size: int | None = None,
        seq_len: int | None = None,
        micro_batches: int | None = None,
    ):
        """`jax.stages.Lowered` of the step for abstract state and batch (the AOT tool)."""
        frozen = None
        if self.abstract_frozen is not None:
            frozen = self.plan.abstract(self.abstract_frozen, self.frozen_shardings)
        return self.jitted.lower(
            self.restore_target(), self.abstract_batch(batch_size, seq_len, micro_batches), frozen
        )
