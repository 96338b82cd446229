"""`remat: auto`: the rematerialisation of the train step chosen per slice and sequence length.

The ladder (`LADDER`) runs from the most saved to `full` remat; the first rung whose step fits
the chip's HBM is taken. Before compiling a rung, an analytic pre-filter skips the rungs that
cannot fit (`estimate_bytes`), so that usually one or two rungs are compiled:

    estimate = state + sum over the rung's save points p of
               bytes(p) per token x layers(p) x tokens per micro-batch / devices

`state` is the train state per chip (parameters, their float gradient and the optimizer state,
from the step's abstract state and its shardings, the frozen base of LoRA included); bytes(p)
per token (compute dtype, `point_bytes_per_token`): q_proj h*hd, kv_proj 2*kvh*hd on the
first layer of each CLA group only, attn_out h*hd plus the kernel's float32 log-sum-exp (h),
o_proj d, mlp_gate / mlp_up f, mlp_down d, moe_gate / moe_up top_k*capacity*f, moe_down
top_k*capacity*d. The activations are divided by every device (perfect sharding), and the
full-remat part (the layer groups' inputs, temporaries) is left out: the estimate is a lower
bound of what the compiler will ask, so the pre-filter never skips a rung that would fit.

Who measures: the AOT tool compiles each rung (`hunyuan_jax.aot.report.measure`: its
DoesNotFit or the total against the usable HBM); train.py's `TrainStep` compiles each rung
for the mesh's devices (`jit(...).lower(...).compile().memory_analysis()`) when they are TPU
chips; on CPU / GPU (where the memory analysis is not the device's limit) `auto` means `full`
unless a usable HBM size is given (tests force one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from hunyuan_jax.model.config import ModelConfig
from hunyuan_jax.model.policy import RuntimePolicy

GiB = 2**30
# An XLA compile that runs out of device memory says one of these (XLA:TPU: RESOURCE_EXHAUSTED
# naming the bytes required and available).
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "HbmOom", "out of memory")


@dataclasses.dataclass(frozen=True)
class Rung:
    """One step of the ladder: a name and the save points it keeps (() = full remat)."""

    name: str
    saved: tuple[str, ...]

    def policy(self, base: RuntimePolicy) -> RuntimePolicy:
        if not self.saved:
            return base.replace(remat="full", remat_save="")
        return base.replace(remat="save", remat_save=",".join(self.saved))


ATTENTION_POINTS = ("q_proj", "kv_proj", "attn_out", "o_proj")
# Most saved first. "matmuls": every expensive matmul output the backward needs (the group's
# last down projections excepted, which XLA need not keep; the shared expert's gate/up are left
# out: the routed ones cost the same and are top_k*capacity per token); "attention": the
# attention path only (no second attention forward, no q/k/v/o recompute); then full remat.
LADDER = (
    Rung("matmuls", (*ATTENTION_POINTS, "moe_gate", "moe_up", "moe_down", "mlp_down")),
    Rung("attention", ATTENTION_POINTS),
    Rung("full", ()),
)


def point_bytes_per_token(cfg: ModelConfig, policy: RuntimePolicy) -> dict[str, float]:
    """Bytes each named checkpoint point holds per token, summed over the layers."""
    cb = np.dtype(jax.numpy.dtype(policy.compute_dtype)).itemsize
    layers, groups = cfg.num_layers, cfg.num_layers / cfg.cla_share_factor
    h, kvh, hd, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    f, shared = cfg.intermediate_size, cfg.num_shared_experts
    routed = cfg.moe_top_k * policy.capacity_factor
    return {
        "q_proj": layers * h * hd * cb,
        "kv_proj": groups * 2 * kvh * hd * cb,
        "attn_out": layers * (h * hd * cb + h * 4),
        "o_proj": layers * d * cb,
        "mlp_gate": layers * shared * f * cb,
        "mlp_up": layers * shared * f * cb,
        "mlp_down": layers * shared * d * cb,
        "moe_gate": layers * routed * f * cb,
        "moe_up": layers * routed * f * cb,
        "moe_down": layers * routed * d * cb,
    }


def estimate_bytes(
    cfg: ModelConfig, policy: RuntimePolicy, rung: Rung, state: float, tokens: int, devices: int
) -> float:
    """The pre-filter's lower bound (module docstring): state + saved activations per chip.
    `tokens`: one micro-batch's tokens (rows x sequence), the whole slice."""
    per = point_bytes_per_token(cfg, policy)
    return state + sum(per[p] for p in rung.saved) * tokens / devices


def state_bytes_per_chip(trees_and_shardings) -> float:
    """Bytes per chip of (abstract tree, shardings) pairs: each leaf's shard (the largest)."""
    total = 0
    for tree, shardings in trees_and_shardings:
        leaves = jax.tree.leaves(tree)
        shards = jax.tree.leaves(shardings) if shardings is not None else [None] * len(leaves)
        for leaf, sh in zip(leaves, shards, strict=True):
            shape = sh.shard_shape(leaf.shape) if sh is not None else leaf.shape
            total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
    return float(total)


def compiled_bytes(compiled) -> int:
    """A compiled program's peak per device: arguments + outputs - aliased (donated) +
    temporaries + code, from XLA's memory analysis (the AOT tool's `Memory.total`)."""
    m = compiled.memory_analysis()
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
        + m.generated_code_size_in_bytes
    )


def is_oom(error: Exception) -> bool:
    return any(marker in str(error) for marker in OOM_MARKERS)


@dataclasses.dataclass
class Choice:
    """The rung taken, its policy, what the attempt returned for it, and what each rung did."""

    rung: Rung
    policy: RuntimePolicy
    result: Any
    tried: list[str]

    @property
    def note(self) -> str:
        """The `remat:` line of the AOT report and train.py."""
        kept = f" (keeping {','.join(self.rung.saved)})" if self.rung.saved else ""
        return f"auto -> {self.rung.name}{kept}; " + "; ".join(self.tried)


# attempt(policy) -> (fits, bytes or None, result): compile the step under `policy`.
Attempt = Callable[[RuntimePolicy], tuple[bool, float | None, Any]]


def choose(
    cfg: ModelConfig,
    policy: RuntimePolicy,
    *,
    state: float,
    tokens: int,
    devices: int,
    hbm_bytes: float,
    attempt: Attempt,
    ladder: tuple[Rung, ...] = LADDER,
) -> Choice:
    """Walk the ladder from the most saved rung: skip a rung whose estimate exceeds
    `hbm_bytes`, else `attempt` it and take it if it fits. The last rung (full remat) is
    always attempted and taken, fitting or not (the caller reports a misfit)."""
    tried: list[str] = []
    for i, rung in enumerate(ladder):
        candidate = rung.policy(policy)
        last = i == len(ladder) - 1
        est = estimate_bytes(cfg, policy, rung, state, tokens, devices)
        if not last and est > hbm_bytes:
            tried.append(
                f"{rung.name}: skipped, estimate {est / GiB:.2f} > {hbm_bytes / GiB:.2f} GiB"
            )
            continue
        fits, used, result = attempt(candidate)
        size = "out of memory" if used is None else f"{used / GiB:.2f} GiB"
        tried.append(f"{rung.name}: compiled, {size}{'' if fits else ' (does not fit)'}")
        if fits or last:
            return Choice(rung, candidate, result, tried)
    raise AssertionError("the ladder ends with a rung that is always taken")


def fixed_choice(policy: RuntimePolicy, why: str) -> Choice:
    """`auto` without measuring (no device memory to measure against): full remat."""
    rung = LADDER[-1]
    return Choice(rung, rung.policy(policy), None, [why])
