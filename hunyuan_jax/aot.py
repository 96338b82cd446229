"""Ahead-of-time compiles for TPU slices you do not have: does the program fit, and how fast
could it be?

    python -m hunyuan_jax.aot --config configs/hunyuan_a52b_instruct.yaml --topology v5p-256 \
        --mode train --mesh fsdp=-1,expert=16 --rules fsdp_ep --seq 4096
    python -m hunyuan_jax.aot --config configs/hunyuan_a52b_instruct.yaml --topology v6e-32 \
        --mode decode-step --batch 8 --cache-len 32768 --rule cache_length=expert

With `libtpu` installed (`pip install libtpu`), `jax.experimental.topologies` describes any TPU
slice as compile-only devices on a CPU host. The mesh is built over those devices; parameters,
optimizer state, KV cache and batch are `ShapeDtypeStruct`s carrying their `NamedSharding`s (no
array is ever allocated), and the real program is lowered and compiled by XLA:TPU:

* `train`: one optimizer step, `hunyuan_jax.train_step.make_train_step` jitted by its
  `jit_train_step` (what train.py runs: forward, backward with the config's remat, AdamW;
  state donated). A fallback with the same loss and optimizer is used if that module is absent.
* `prefill`: one prefill chunk of `--seq` tokens written into a `--cache-len` KV cache
  (`decode.Generator._prefill_fn`), bf16 weights.
* `decode`: `decode.Generator._decode_fn`, the decode while-loop (model, sampling, cache).
* `decode-step`: one decode step without the outer loop (model on one token per row, greedy
  pick, cache donated): what a server calling one compiled step per token needs.

Prefill/decode use the expert-parallel `gather` dispatch when the rules shard the experts
(`--experts auto` leaves the Generator's own choice). Names: v5p-N and v4-N count TensorCores
(v5p-256 = 128 chips, `v5:4x4x8`), v5e-N / v6e-N count chips; `--topology local` uses this
host's devices.

The report gives per-chip memory (arguments, outputs, aliased, temporaries, total vs the chip's
usable HBM), FLOPs per step and the MFU implied by a stated step-time model (`step_time_model`);
exit status 2 means "does not fit" (the compiler's own out-of-memory verdict, or total > HBM),
1 a usage error. `--dump DIR` adds XLA's largest buffers and a check for bf16 copies of stacked
weights hoisted out of the layer scan.

FLOPs: XLA's `cost_analysis()` counts a loop body once, so for the layer scan it undercounts
by about the number of layer groups. The report therefore gives (a) the analytic count from the
config (`analytic_flops`: the formula is stated there), (b) the raw compiled count, labelled as
such, and with `--unrolled-flops` (c) XLA's exact count from two extra compiles with 1 and 2
layer groups unrolled (rest + G x per group), plus the analytic remat recompute.

The platform (and chip) are read from the mesh's devices, never from `jax.devices()`.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hunyuan_jax.config import ModelConfig, load_config
from sharding.mesh import MeshConfig, build_mesh
from sharding.rules import get_rules, logical_to_spec, rules_dict, state_shardings

GiB = 2**30
MODES = ("train", "prefill", "decode", "decode-step")


# ============================================================================ chips and slices
@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation. `hbm_gib`: what XLA:TPU lets a program use per chip (measured: the
    capacity its out-of-memory error names); peak bf16 FLOP/s and HBM bandwidth per chip."""

    name: str
    topology_prefix: str  # as get_topology_desc spells it
    device_kinds: tuple[str, ...]  # Device.device_kind values
    hbm_gib: float
    peak_flops: float
    hbm_bytes_per_s: float
    cores_per_chip: int  # the number in a Cloud TPU name counts TensorCores on v4 / v5p
    chip_config_name: str | None
    dims: int  # torus dimensions (3 on v4 / v5p, 2 on v5e / v6e)


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "v4", ("TPU v4",), 30.75, 275e12, 1.228e12, 2, "megacore", 3),
    "v5p": Chip("v5p", "v5", ("TPU v5", "TPU v5p"), 95.73, 459e12, 2.765e12, 2, "megacore", 3),
    "v5e": Chip("v5e", "v5e", ("TPU v5 lite", "TPU v5e"), 15.75, 197e12, 0.819e12, 1, None, 2),
    "v6e": Chip("v6e", "v6e", ("TPU v6 lite", "TPU v6e"), 31.24, 918e12, 1.640e12, 1, None, 2),
}
_ALIASES = {"v5": "v5p", "v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "trillium": "v6e"}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A resolved --topology: the chip, the topology string and the number of chips."""

    label: str  # what the user typed
    chip: Chip
    topology: str  # e.g. "v5:4x4x8"
    shape: tuple[int, ...]
    num_slices: int = 1

    @property
    def chips(self) -> int:
        return math.prod(self.shape) * self.num_slices

    @property
    def cloud_name(self) -> str:
        return f"{self.chip.name}-{math.prod(self.shape) * self.chip.cores_per_chip}"


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The usual Cloud TPU shape of a power-of-two slice: v5p/v4 4 chips 2x2x1, 8 2x2x2,
    16 2x2x4, 32 2x4x4, 64 4x4x4, 128 4x4x8, 256 4x8x8, ...; v5e/v6e 4 2x2, 8 2x4, 16 4x4,
    32 4x8, 64 8x8, 128 8x16, 256 16x16."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(
            f"{chips} chips: friendly names cover power-of-two slices only; give "
            f"the topology itself, e.g. v5p:4x4x12"
        )
    if dims == 2:
        shape = [1, 1]
        while math.prod(shape) < chips:
            i = 0 if shape[0] < shape[1] else 1
            shape[i] *= 2
        return tuple(shape)
    if chips < 4:
        return (chips, 1, 1) if chips < 2 else (2, 1, 1)
    shape = [2, 2, 1]
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest)
        shape[i] *= 2
    return tuple(shape)


def parse_topology(text: str, num_slices: int = 1) -> Slice:
    """'v5p-256' (Cloud TPU name: TensorCores on v4/v5p, chips on v5e/v6e), 'v5p:4x4x8' or
    'v5:4x4x8' (topology), 'v6e-32', 'v5litepod-64', 'v4-128'."""
    t = text.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+?)(?:pod)?-(\d+)", t)
    if m:
        gen, n = _ALIASES.get(m.group(1), m.group(1)), int(m.group(2))
        if gen not in CHIPS:
            raise ValueError(
                f"unknown TPU generation {m.group(1)!r} in {text!r}; known: {sorted(CHIPS)}"
            )
        chip = CHIPS[gen]
        if n % chip.cores_per_chip:
            raise ValueError(
                f"{text}: {gen} names count TensorCores ({chip.cores_per_chip} per "
                f"chip), so the number must be a multiple of {chip.cores_per_chip}"
            )
        shape = torus_shape(n // chip.cores_per_chip, chip.dims)
    else:
        m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", t)
        if not m:
            raise ValueError(
                f"--topology {text!r}: expected a Cloud TPU name like v5p-256, "
                f"v6e-32, v5e-64, v4-128, or a topology like v5p:4x4x8 / v6e:4x8"
            )
        gen = _ALIASES.get(m.group(1), m.group(1))
        if gen not in CHIPS:
            raise ValueError(f"unknown TPU generation {m.group(1)!r}; known: {sorted(CHIPS)}")
        chip = CHIPS[gen]
        shape = tuple(int(s) for s in m.group(2).split("x"))
        if len(shape) != chip.dims:
            raise ValueError(f"{text}: a {gen} topology has {chip.dims} dimensions")
    topology = f"{chip.topology_prefix}:{'x'.join(map(str, shape))}"
    return Slice(text, chip, topology, shape, num_slices)


def _has_tpu_hardware() -> bool:
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def topology_devices(sl: Slice):
    """Compile-only devices of the slice (needs libtpu; no TPU needed).

    libtpu takes /tmp/libtpu_lockfile so that two processes never drive the same chips; any
    JAX process started without JAX_PLATFORMS=cpu on a host with libtpu installed holds it.
    On a host without TPU chips nothing is driven, so concurrent loads are allowed
    (ALLOW_MULTIPLE_LIBTPU_LOAD=1) unless the environment says otherwise."""
    from jax.experimental import topologies

    if not _has_tpu_hardware():
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {}
    if sl.chip.chip_config_name:
        kwargs["chip_config_name"] = sl.chip.chip_config_name
    if sl.num_slices > 1:
        kwargs["num_slices"] = sl.num_slices
    try:
        desc = topologies.get_topology_desc(topology_name=sl.topology, platform="tpu", **kwargs)
    except Exception as e:  # no libtpu, unknown topology, libtpu busy
        raise RuntimeError(
            f"cannot describe TPU topology {sl.topology} ({e}). Ahead-of-time "
            f"TPU compiles need libtpu: pip install libtpu"
        ) from e
    return list(desc.devices)


def chip_of(devices) -> Chip | None:
    """The Chip of a mesh's devices (None for CPU / GPU / unknown kinds)."""
    d = devices[0]
    if d.platform != "tpu":
        return None
    kind = getattr(d, "device_kind", "")
    for chip in CHIPS.values():
        if kind in chip.device_kinds:
            return chip
    return None


# ============================================================================ defaults
def default_mesh(mode: str, cfg: ModelConfig, chips: int) -> str:
    """ICI sizes for `chips` chips of one slice. train: FSDP x expert parallelism (experts over
    `expert`, everything else over fsdp x expert); serving: tensor parallelism over KV heads
    (at most 8) x experts. Multi-slice adds dcn.data (pure data parallelism across slices)."""
    if mode == "train":
        return f"fsdp=-1,expert={math.gcd(cfg.num_experts, chips)}"
    tensor = math.gcd(cfg.num_kv_heads, chips)
    rest = chips // tensor
    expert = math.gcd(cfg.num_experts, rest)
    return f"fsdp={rest // expert},expert={expert},tensor={tensor}"


def default_rules(mode: str) -> str:
    return "fsdp_ep" if mode == "train" else "serve_ep_tp"


def batch_shards(rules, mesh, name: str = "batch") -> int:
    spec = logical_to_spec((name,), rules, mesh=mesh)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return math.prod(mesh.shape[a] for a in axes)


def shards_exp(rules, mesh) -> bool:
    """Whether the rules shard the routed experts over a mesh axis of size > 1."""
    return any(mesh.shape[a] > 1 for a in rules_dict(get_rules(rules))["exp"])


# ============================================================================ abstract trees
def _abstract(tree, shardings):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
    )


def abstract_params(cfg: ModelConfig, rules, mesh):
    """(graphdef, params as sharded ShapeDtypeStructs) of the model; nothing is allocated."""
    from hunyuan_jax.state import abstract_model

    graphdef, state = nnx.split(abstract_model(cfg, rules))
    return graphdef, _abstract(state, state_shardings(state, rules, mesh))


def abstract_batch(cfg: ModelConfig, rules, mesh, batch: int, seq: int, micro: int = 1):
    """A training batch {inputs, targets, positions, segment_ids, loss_mask}: [micro, rows,
    seq] (the data loader's layout), rows over the rules' batch axes."""
    spec = logical_to_spec(("batch",), rules, mesh=mesh)
    sharding = NamedSharding(mesh, P(None, *spec, None))
    shape = (micro, batch // micro, seq)
    out = {
        k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
        for k in ("inputs", "targets", "positions", "segment_ids")
    }
    out["loss_mask"] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
    return out


def replicated(mesh, value):
    return jax.ShapeDtypeStruct(
        np.shape(value), jnp.asarray(value).dtype, sharding=NamedSharding(mesh, P())
    )


# ============================================================================ programs
@dataclasses.dataclass
class Program:
    """What to compile: fn(*args), which args are donated, and how it was built."""

    fn: Any
    args: tuple
    donate: tuple[int, ...]
    source: str  # which code path provides the step
    tokens: int  # tokens processed per step (whole slice)
    jitted: Any = None  # the caller's own jax.jit of fn (shardings, donation), if it has one


def _experts_fn(cfg, rules, mesh, training: bool):
    if not shards_exp(rules, mesh):
        if training:
            from hunyuan_jax.moe import make_capacity_experts

            return make_capacity_experts(cfg.capacity_factor)
        return None  # dropless
    from hunyuan_jax.expert_parallel import make_expert_parallel_fn

    return make_expert_parallel_fn(
        mesh, rules, "all_to_all" if training else "gather", cfg.capacity_factor
    )


def train_program(
    cfg: ModelConfig, rules, mesh, batch: int, seq: int, micro: int = 1, tcfg=None
) -> Program:
    """One optimizer step: `hunyuan_jax.train_step` (the step train.py runs) when importable,
    else the equivalent fallback below."""
    from hunyuan_jax.train_config import TrainConfig

    tcfg = tcfg or TrainConfig(batch_size=batch, seq_len=seq, micro_batches=micro)
    data = abstract_batch(cfg, rules, mesh, batch, seq, micro)
    try:
        from hunyuan_jax import train_step as ts
    except ImportError:
        ts = None
    needed = (
        "make_train_step",
        "abstract_train_state",
        "train_shardings",
        "jit_train_step",
        "make_experts_fn",
    )
    if ts is not None and all(hasattr(ts, n) for n in needed):
        from hunyuan_jax.data import batch_sharding
        from hunyuan_jax.optim import make_optimizer
        from hunyuan_jax.state import abstract_model

        opt = make_optimizer(tcfg, cfg)
        graphdef, params = nnx.split(abstract_model(cfg, rules))
        abstract = ts.abstract_train_state(params, opt)
        sh = ts.train_shardings(abstract, mesh, rules)
        state = _abstract(abstract, sh)
        step_fn = ts.make_train_step(
            graphdef, opt, cfg, tcfg, ts.make_experts_fn(cfg, tcfg, mesh, rules)
        )
        jitted = ts.jit_train_step(step_fn, sh, batch_sharding(mesh, rules), mesh)
        return Program(
            step_fn,
            (state, data),
            (0,),
            "train_step.make_train_step + jit_train_step (train.py's step)",
            batch * seq,
            jitted=jitted,
        )
    graphdef, params = abstract_params(cfg, rules, mesh)
    return _fallback_train_program(cfg, tcfg, rules, mesh, graphdef, params, data)


def _fallback_train_program(cfg, tcfg, rules, mesh, graphdef, params, data) -> Program:
    """value_and_grad of `losses.lm_loss` (gradients accumulated over micro-batches with a
    scan) + the project's optimizer (`optim.make_optimizer`: clip, AdamW, per-group lr)."""
    import optax

    from hunyuan_jax.losses import lm_loss
    from hunyuan_jax.optim import make_optimizer

    opt = make_optimizer(tcfg, cfg)
    tx = opt.tx
    opt_state = jax.eval_shape(tx.init, params)
    opt_state = _abstract(opt_state, state_shardings(opt_state, rules, mesh))
    experts_fn = _experts_fn(cfg, rules, mesh, training=True)

    def loss_fn(p, mb, key):
        model = nnx.merge(graphdef, p)
        return lm_loss(
            model,
            mb,
            experts_fn=experts_fn,
            key=key,
            aux_loss_coef=tcfg.aux_loss_coef,
            z_loss_coef=tcfg.z_loss_coef,
        )

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(p, o, batch, step_no):
        key = jax.random.fold_in(jax.random.key(tcfg.seed), step_no)
        zeros = jax.tree.map(jnp.zeros_like, p)

        def accumulate(carry, xs):
            g_sum, loss_sum = carry
            mb, i = xs
            (loss, _), g = grad_fn(p, mb, jax.random.fold_in(key, i))
            return (jax.tree.map(jnp.add, g_sum, g), loss_sum + loss), None

        micro = batch["inputs"].shape[0]
        (grads, loss), _ = jax.lax.scan(
            accumulate, (zeros, jnp.zeros((), jnp.float32)), (batch, jnp.arange(micro))
        )
        grads = jax.tree.map(lambda g: g / micro, grads)
        updates, o = tx.update(grads, o, p)
        p = optax.apply_updates(p, updates)
        return p, o, {"loss": loss / micro, "grad_norm": optax.global_norm(grads)}

    return Program(
        step,
        (params, opt_state, data, replicated(mesh, np.int32(0))),
        (0, 1),
        "aot fallback: value_and_grad(lm_loss) + optim.make_optimizer",
        tcfg.batch_size * tcfg.seq_len,
    )


def _serve_cfg(cfg: ModelConfig, dtype: str) -> ModelConfig:
    return cfg.replace(param_dtype=dtype, compute_dtype=dtype, remat="none")


def _generator(cfg, rules, mesh, cache_dtype, experts: str = "default"):
    """decode.Generator over the abstract model (its compiled pieces are pure functions of
    params and state). experts: 'gather' = expert-parallel dropless dispatch (shard_map,
    `expert_parallel`); 'auto' = the Generator's own default; 'default' = gather when the
    rules shard the experts on this mesh, else auto."""
    import inspect

    from hunyuan_jax import decode
    from hunyuan_jax.state import abstract_model

    model = abstract_model(cfg, rules)
    kwargs = dict(mesh=mesh, rules=rules, cache_dtype=cache_dtype)
    if experts == "default":
        experts = "gather" if shards_exp(rules, mesh) else "auto"
    if experts == "gather":
        if "experts_fn" not in inspect.signature(decode.Generator).parameters:
            raise RuntimeError("decode.Generator takes no experts_fn: use --experts auto")
        kwargs["experts_fn"] = _experts_fn(cfg, rules, mesh, training=False)
    elif experts != "auto":
        raise ValueError(f"--experts must be auto or gather, got {experts!r}")
    return decode.Generator(model, **kwargs), experts


def _abstract_cache(cfg, rules, mesh, batch, cache_len, cache_dtype):
    from hunyuan_jax import decode
    from hunyuan_jax.model import KVCache

    cache = jax.eval_shape(lambda: KVCache.zeros(cfg, batch, cache_len, cache_dtype))
    return _abstract(cache, decode.cache_shardings(cache, rules, mesh))


def _batch_struct(mesh, rules, shape, dtype):
    spec = logical_to_spec(("cache_batch",) + (None,) * (len(shape) - 1), rules, mesh=mesh)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def prefill_program(
    cfg, rules, mesh, batch, chunk, cache_len, cache_dtype, experts="default"
) -> Program:
    """One prefill chunk: tokens [B, chunk] at positions start.. into a [B, cache_len] cache."""
    gen, experts = _generator(cfg, rules, mesh, cache_dtype, experts)
    graphdef, params = abstract_params(cfg, rules, mesh)
    cache = _abstract_cache(cfg, rules, mesh, batch, cache_len, gen.cache_dtype)
    args = (
        params,
        _batch_struct(mesh, rules, (batch, chunk), jnp.int32),
        replicated(mesh, np.int32(0)),
        cache,
        _batch_struct(mesh, rules, (batch,), jnp.int32),
        _batch_struct(mesh, rules, (batch, cfg.vocab_size), jnp.float32),
    )
    return Program(
        gen._prefill_fn,
        args,
        (3, 5),
        f"decode.Generator._prefill_fn, experts {experts}",
        batch * chunk,
    )


def decode_program(cfg, rules, mesh, batch, cache_len, cache_dtype, experts="default") -> Program:
    """The decode loop (one while-loop iteration per token; FLOPs are per token)."""
    from hunyuan_jax import decode

    gen, experts = _generator(cfg, rules, mesh, cache_dtype, experts)
    graphdef, params = abstract_params(cfg, rules, mesh)
    cache = _abstract_cache(cfg, rules, mesh, batch, cache_len, gen.cache_dtype)
    b = lambda shape, dtype: _batch_struct(mesh, rules, shape, dtype)
    fields = decode.DecodeState._fields
    values = dict(
        cache=cache,
        tokens=b((batch, cache_len), jnp.int32),
        last=b((batch,), jnp.int32),
        done=b((batch,), jnp.bool_),
        num_new=b((batch,), jnp.int32),
        seen=None,
        key=jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, P())),
        step=replicated(mesh, np.int32(0)),
        logits=None,
        eos=replicated(mesh, np.full((8,), -1, np.int32)),
    )
    missing = [f for f in fields if f not in values]
    if missing:
        raise RuntimeError(
            f"decode.DecodeState has fields {missing} this tool does not know; "
            f"update hunyuan_jax/aot.py:decode_program"
        )
    state = decode.DecodeState(**{f: values[f] for f in fields})
    args = (params, state, replicated(mesh, np.int32(1)), replicated(mesh, np.int32(1)))
    return Program(
        gen._decode_fn,
        args,
        (1,),
        f"decode.Generator._decode_fn ({gen.decode_loop} loop: "
        f"{'one token per call' if gen.decode_loop == 'host' else 'while loop'}), "
        f"experts {experts}",
        batch,
    )


def decode_step_program(
    cfg, rules, mesh, batch, cache_len, cache_dtype, experts="default"
) -> Program:
    """One decode step without the while loop: the model on one token per row with the cache,
    greedy next token, cache donated (what a server calling one step per token compiles)."""
    gen, experts = _generator(cfg, rules, mesh, cache_dtype, experts)
    graphdef, params = abstract_params(cfg, rules, mesh)
    cache = _abstract_cache(cfg, rules, mesh, batch, cache_len, gen.cache_dtype)
    last = _batch_struct(mesh, rules, (batch,), jnp.int32)
    experts_fn = gen.experts_fn if gen.experts_fn != "auto" else None

    def step(params, cache, last):
        model = nnx.merge(graphdef, params)
        logits, _, cache = model(last[:, None], cache=cache, experts_fn=experts_fn)
        return cache, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)

    return Program(
        step,
        (params, cache, last),
        (1,),
        f"one decode step (model + greedy, no while loop), experts {experts}",
        batch,
    )


# ============================================================================ FLOPs
def active_matmul_params(cfg: ModelConfig) -> dict[str, float]:
    """Weights each token multiplies by (per model): attention, experts, router, LM head."""
    d, h, kvh, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    f, L = cfg.intermediate_size, cfg.num_layers
    attn = L * 2 * d * h * hd + (L // cfg.cla_share_factor) * 2 * d * kvh * hd
    mlp = L * 3 * d * f * (cfg.num_shared_experts + cfg.moe_top_k)
    router = L * d * cfg.num_experts
    head = d * cfg.vocab_size
    return {
        "attention": attn,
        "mlp": mlp,
        "router": router,
        "lm_head": head,
        "total": attn + mlp + router + head,
    }


def analytic_flops(
    cfg: ModelConfig, mode: str, batch: int, seq: int, context: int, remat: bool
) -> dict[str, float]:
    """Whole-slice FLOPs per step. Matmuls: 2 x weights x tokens forward; backward twice that;
    full remat adds one more forward. Attention: QK^T and PV, 4 x heads x head_dim x context
    per token and layer, full (masked, not causally halved: this implementation computes the
    whole score matrix). `model` excludes the remat recompute (the MFU convention)."""
    n = active_matmul_params(cfg)["total"]
    attn_per_token = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context
    tokens = batch * seq
    fwd = tokens * (2 * n + attn_per_token)
    if mode == "train":
        model = 3 * fwd
        hardware = model + (fwd if remat else 0)
    else:
        model = hardware = fwd
    return {
        "model": float(model),
        "hardware": float(hardware),
        "tokens": tokens,
        "active_params": float(n),
    }


def compiled_cost(compiled) -> dict[str, float]:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    ca = ca or {}
    return {
        "flops": float(ca.get("flops", 0.0)),
        "bytes_accessed": float(ca.get("bytes accessed", 0.0)),
    }


# ============================================================================ compile + report
@dataclasses.dataclass
class Memory:
    argument: int
    output: int
    alias: int
    temp: int
    code: int

    @property
    def total(self) -> int:
        return self.argument + self.output - self.alias + self.temp + self.code

    @classmethod
    def of(cls, compiled) -> Memory:
        m = compiled.memory_analysis()
        return cls(
            int(m.argument_size_in_bytes),
            int(m.output_size_in_bytes),
            int(m.alias_size_in_bytes),
            int(m.temp_size_in_bytes),
            int(m.generated_code_size_in_bytes),
        )


class DoesNotFit(Exception):
    def __init__(self, message: str, required_gib: float | None, available_gib: float | None):
        super().__init__(message)
        self.required_gib, self.available_gib = required_gib, available_gib


_SIZE = r"([\d.]+)\s*([GMK])i?B?"
_OOM_PATTERNS = (
    re.compile(rf"required for [^(]*\({_SIZE}\)\s*exceeds available HBM \({_SIZE}\)"),
    re.compile(rf"Used {_SIZE} of {_SIZE} hbm"),
    re.compile(rf"requires? {_SIZE}.*?(?:available|limit|capacity)\D*?{_SIZE}", re.S),
)


def _parse_oom(text: str) -> tuple[float | None, float | None]:
    """(required GiB, available GiB) from XLA:TPU's out-of-memory message ('G' is GiB)."""
    unit = {"G": 1.0, "M": 1 / 1024, "K": 1 / 2**20}
    for pattern in _OOM_PATTERNS:
        m = pattern.search(text)
        if m:
            return (float(m.group(1)) * unit[m.group(2)], float(m.group(3)) * unit[m.group(4)])
    return None, None


def compile_program(prog: Program, mesh):
    """(compiled, lower seconds, compile seconds); DoesNotFit on the compiler's OOM."""
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        jitted = prog.jitted or jax.jit(prog.fn, donate_argnums=prog.donate)
        lowered = jitted.lower(*prog.args)
        t1 = time.perf_counter()
        try:
            compiled = lowered.compile()
        except Exception as e:  # XlaRuntimeError RESOURCE_EXHAUSTED
            text = str(e)
            if "RESOURCE_EXHAUSTED" in text or "HbmOom" in text or "out of memory" in text:
                need, have = _parse_oom(text)
                first = text.strip().splitlines()[0] if text.strip() else repr(e)
                raise DoesNotFit(first[:400], need, have) from None
            raise
    return compiled, t1 - t0, time.perf_counter() - t1


def stacked_cast_copies(hlo_text: str, params, mesh, dtype: str = "bf16") -> dict:
    """Full `dtype` copies of stacked (scanned) parameters in the optimized HLO.

    Inside the layer scan each iteration should cast only its own group's slice. If XLA
    hoists the fp32 -> bf16 cast of the stacked weights out of the loop (SPEC 7), a `dtype`
    array with the stacked per-device shape [groups, ...] appears: a second copy of those
    weights held for the whole step. Returns {shape: bytes} of such arrays (empty = none)."""
    shapes = {}
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None or len(leaf.shape) < 3:
            continue
        local = sharding.shard_shape(leaf.shape)
        shapes[",".join(map(str, local))] = math.prod(local)
    width = {"bf16": 2, "f16": 2, "f32": 4}[dtype]
    found = {}
    for m in re.finditer(rf"\b{dtype}\[([\d,]+)\]", hlo_text):
        dims = m.group(1)
        if dims in shapes:
            found[dims] = shapes[dims] * width
    return found


def read_dump(directory: str, since: float, top: int = 12) -> tuple[str, list[str]]:
    """(optimized HLO text, the `top` largest rows of the memory-usage report) of the
    biggest module XLA dumped into `directory` after `since` (our program)."""
    import glob as _glob

    reports = [
        p
        for p in _glob.glob(os.path.join(directory, "*memory-usage-report.txt"))
        if os.path.getmtime(p) >= since - 1
    ]
    if not reports:
        return "", []
    report = max(
        reports,
        key=lambda p: (
            os.path.getsize(p.replace("-memory-usage-report.txt", ".txt"))
            if os.path.exists(p.replace("-memory-usage-report.txt", ".txt"))
            else 0
        ),
    )
    rows = []
    with open(report) as fh:
        for line in fh:
            if re.match(r"\s*[\d.]+[KMG]?i?B\(", line.strip()) and len(rows) < top:
                parts = [x.strip() for x in line.split(";")]
                if len(parts) >= 5:
                    rows.append(f"{parts[1]:>10}  {parts[4][:110]}")
    hlo_path = report.replace("-memory-usage-report.txt", ".txt")
    hlo = open(hlo_path).read() if os.path.exists(hlo_path) else ""
    return hlo, rows


def build_program(
    mode, cfg, rules, mesh, batch, seq, cache_len, micro=1, cache_dtype=None, experts="default"
):
    if mode == "train":
        return train_program(cfg, rules, mesh, batch, seq, micro)
    if mode == "prefill":
        return prefill_program(cfg, rules, mesh, batch, seq, cache_len, cache_dtype, experts)
    if mode == "decode-step":
        return decode_step_program(cfg, rules, mesh, batch, cache_len, cache_dtype, experts)
    return decode_program(cfg, rules, mesh, batch, cache_len, cache_dtype, experts)


def unrolled_flops(
    mode, cfg, rules, mesh, batch, seq, cache_len, micro, cache_dtype, experts="default"
):
    """Per-chip FLOPs and bytes of the full model from two unrolled compiles (1 and 2 layer
    groups): rest + G x per-group. The unrolled compiles use remat 'none': unrolled, XLA
    merges a remat'd layer's recomputation with its first forward (the model's checkpoint
    uses prevent_cse=False), so their count would be neither with nor without remat. The
    caller adds the recomputation analytically."""
    csf = cfg.cla_share_factor
    costs = []
    for groups in (1, 2):
        small = cfg.replace(num_layers=groups * csf, scan_layers=False, remat="none")
        prog = build_program(
            mode, small, rules, mesh, batch, seq, cache_len, micro, cache_dtype, experts
        )
        compiled, _, _ = compile_program(prog, mesh)
        costs.append(compiled_cost(compiled))
    g = cfg.num_groups
    out = {}
    for k in ("flops", "bytes_accessed"):
        per_group = costs[1][k] - costs[0][k]
        out[k] = costs[0][k] + (g - 1) * per_group
        out[k + "_per_group"] = per_group
    return out


def run(args) -> dict:
    cfg = load_config(args.config)
    if args.set:
        from hunyuan_jax.train_config import parse_overrides

        train_over, model_over = parse_overrides(
            s if s.startswith("model.") else "model." + s for s in args.set
        )
        cfg = cfg.replace(**model_over)
    if args.mode != "train":
        cfg = _serve_cfg(cfg, args.dtype)
    elif args.param_dtype:
        cfg = cfg.replace(param_dtype=args.param_dtype)

    if args.topology == "local":
        devices, sl = jax.devices(), None
    else:
        sl = parse_topology(args.topology, args.slices)
        devices = topology_devices(sl)
    slices = sl.num_slices if sl else 1
    mesh_str = args.mesh or (
        default_mesh(args.mode, cfg, len(devices) // slices)
        + (f",dcn.data={slices}" if slices > 1 else "")
    )
    rules_name = args.rules or default_rules(args.mode)
    overrides = {}
    for item in args.rule:
        name, _, axes = item.partition("=")
        if not _:
            raise ValueError(f"--rule expects logical=axis[+axis], got {item!r}")
        parts = [a for a in axes.replace("+", ",").split(",") if a and a != "none"]
        overrides[name.strip()] = (
            None if not parts else parts[0] if len(parts) == 1 else tuple(parts)
        )
    rules = get_rules(rules_name, overrides)
    if overrides:
        rules_name += " + " + ",".join(args.rule)
    mesh = build_mesh(MeshConfig.coerce(mesh_str), devices=devices)
    platform = mesh.devices.flat[0].platform
    chip = chip_of(list(mesh.devices.flat))
    hbm_gib = args.hbm_gib or (chip.hbm_gib if chip else None)

    shards = batch_shards(rules, mesh, "batch" if args.mode == "train" else "cache_batch")
    batch = args.batch or (shards * args.micro if args.mode == "train" else 1)
    seq = args.seq or {"train": 4096, "prefill": 512}.get(args.mode, 1)
    if args.mode.startswith("decode"):
        seq = 1
    cache_len = args.cache_len or 32768
    if batch % shards:
        raise SystemExit(
            f"error: --batch {batch} is not a multiple of the {shards} devices the "
            f"batch is sharded over (mesh {mesh_str}, rules {rules_name})"
        )

    report: dict[str, Any] = {
        "config": args.config,
        "mode": args.mode,
        "topology": args.topology,
        "topology_string": (
            sl.topology + (f" x {slices} slices" if slices > 1 else "") if sl else "local"
        ),
        "chips": mesh.devices.size,
        "platform": platform,
        "device_kind": mesh.devices.flat[0].device_kind,
        "mesh": dict(mesh.shape),
        "mesh_arg": mesh_str,
        "rules": rules_name,
        "batch": batch,
        "seq": seq,
        "cache_len": cache_len if args.mode != "train" else None,
        "param_dtype": cfg.param_dtype,
        "compute_dtype": cfg.compute_dtype,
        "remat": cfg.remat,
        "hbm_gib": hbm_gib,
    }
    prog = build_program(
        args.mode,
        cfg,
        rules,
        mesh,
        batch,
        seq,
        cache_len,
        args.micro,
        args.cache_dtype,
        args.experts,
    )
    report["step_source"] = prog.source
    compile_started = time.time()
    try:
        compiled, t_lower, t_compile = compile_program(prog, mesh)
    except DoesNotFit as e:
        report.update(
            fits=False, required_gib=e.required_gib, available_gib=e.available_gib, error=str(e)
        )
        if args.dump:  # XLA writes its memory report even for a program that does not fit
            report["largest_buffers"] = read_dump(args.dump, compile_started)[1]
        return report
    report["lower_s"], report["compile_s"] = round(t_lower, 1), round(t_compile, 1)
    mem = Memory.of(compiled)
    report["memory_gib"] = {
        k: round(v / GiB, 3)
        for k, v in dict(
            arguments=mem.argument,
            outputs=mem.output,
            aliased=mem.alias,
            temporaries=mem.temp,
            code=mem.code,
            total=mem.total,
        ).items()
    }
    report["fits"] = hbm_gib is None or mem.total / GiB <= hbm_gib
    hlo, usage = read_dump(args.dump, compile_started) if args.dump else ("", "")
    params_tree = prog.args[0].params if hasattr(prog.args[0], "params") else prog.args[0]
    hoisted = stacked_cast_copies(hlo, params_tree, mesh) if hlo else {}
    if usage:
        report["largest_buffers"] = usage
    report["hoisted_cast_gib"] = sum(hoisted.values()) / GiB
    report["hoisted_cast_shapes"] = sorted(hoisted)

    chips = mesh.devices.size
    context = seq if args.mode == "train" else cache_len
    ana = analytic_flops(cfg, args.mode, batch, seq, context, cfg.remat != "none")
    raw = compiled_cost(compiled)
    flops = {
        "analytic_model_per_chip": ana["model"] / chips,
        "analytic_hardware_per_chip": ana["hardware"] / chips,
        "compiled_raw_per_chip": raw["flops"],
        "compiled_raw_note": "XLA cost_analysis: each loop body (layer scan, decode "
        "while-loop) counted once",
        "active_matmul_params": ana["active_params"],
        "tokens_per_step": ana["tokens"],
    }
    bytes_per_chip = raw["bytes_accessed"]
    if args.unrolled_flops:
        t0 = time.perf_counter()
        unrolled = unrolled_flops(
            args.mode,
            cfg,
            rules,
            mesh,
            batch,
            seq,
            cache_len,
            args.micro,
            args.cache_dtype,
            args.experts,
        )
        recompute = flops["analytic_hardware_per_chip"] - flops["analytic_model_per_chip"]
        flops["compiled_unrolled_no_remat_per_chip"] = unrolled["flops"]
        flops["compiled_unrolled_per_group"] = unrolled["flops_per_group"]
        flops["analytic_remat_recompute_per_chip"] = recompute
        flops["compiled_unrolled_per_chip"] = unrolled["flops"] + recompute
        flops["unrolled_compile_s"] = round(time.perf_counter() - t0, 1)
        bytes_per_chip = unrolled["bytes_accessed"]
    report["flops"] = flops
    report["bytes_accessed_per_chip"] = bytes_per_chip
    report["mfu"] = step_time_model(report, chip, args.step_time, args.efficiency)
    return report


def step_time_model(report, chip: Chip | None, step_time: float | None, efficiency: float) -> dict:
    """MFU = analytic model FLOPs per chip / (step time x peak FLOP/s).

    The step time is a stated model, not a measurement (`--step-time` replaces it):
        t = max(hardware FLOPs per chip / (efficiency x peak), HBM bytes per chip / bandwidth)
    hardware FLOPs: the unrolled compiled count with --unrolled-flops, else the analytic count
    (remat recompute included). HBM bytes: XLA's bytes-accessed (unrolled) when known; for
    prefill/decode at least the argument bytes (every weight and cache slot is read once per
    step); for training without --unrolled-flops the HBM term is left out (compute-bound).
    Collectives are assumed to overlap with compute. With efficiency 1 the MFU is an upper
    bound: model / hardware FLOPs for a compute-bound step (0.75 with full remat)."""
    if chip is None:
        return {"note": "no TPU chip: no peak FLOP/s to compare with"}
    f = report["flops"]
    hw = f.get("compiled_unrolled_per_chip") or f["analytic_hardware_per_chip"]
    t_compute = hw / (chip.peak_flops * efficiency)
    bytes_ = None
    if "compiled_unrolled_per_chip" in f:
        bytes_ = report.get("bytes_accessed_per_chip")
    if report["mode"] != "train":
        args = report["memory_gib"]["arguments"] * GiB
        bytes_ = max(bytes_ or 0.0, args)
    t_memory = bytes_ / chip.hbm_bytes_per_s if bytes_ else None
    if step_time:
        t, how = step_time, "given --step-time"
    else:
        t = max(t_compute, t_memory or 0.0)
        how = (
            f"max(hardware FLOPs at {efficiency:.0%} of {chip.peak_flops / 1e12:.0f} "
            f"TFLOP/s = {t_compute * 1e3:.2f} ms"
            + (
                f", {bytes_ / GiB:.2f} GiB of HBM traffic at "
                f"{chip.hbm_bytes_per_s / 1e12:.2f} TB/s = {t_memory * 1e3:.2f} ms"
                if t_memory
                else ""
            )
            + ")"
        )
    model = f["analytic_model_per_chip"]
    return {
        "step_time_s": t,
        "model": how,
        "mfu": model / (t * chip.peak_flops),
        "tokens_per_s_per_chip": f["tokens_per_step"] / report["chips"] / t,
        "compute_time_s": t_compute,
        "hbm_time_s": t_memory,
        "bound": "given" if step_time else ("memory" if (t_memory or 0) > t_compute else "compute"),
    }


def format_report(r: dict) -> str:
    lines = [
        f"{r['mode']} | {r['config']} | {r['topology']} ({r['topology_string']}, "
        f"{r['chips']} chips, {r['device_kind']}) | mesh {r['mesh_arg']} "
        f"{ {k: v for k, v in r['mesh'].items() if v > 1} } | rules {r['rules']}",
        f"batch {r['batch']} x seq {r['seq']}"
        + (f", cache {r['cache_len']}" if r.get("cache_len") else "")
        + f" | params {r['param_dtype']}, compute {r['compute_dtype']}, remat {r['remat']}",
        f"step: {r.get('step_source', '?')}",
    ]
    hbm = r.get("hbm_gib")
    if not r.get("fits", True) and "memory_gib" not in r:
        need, have = r.get("required_gib"), r.get("available_gib") or hbm
        lines.append(
            f"DOES NOT FIT: the compiler needs "
            f"{f'{need:.1f} GiB' if need else 'more than'} of {have} GiB HBM per chip"
        )
        lines.append(f"  ({r.get('error', '')})")
        if r.get("largest_buffers"):
            lines.append("largest buffers (XLA memory-usage report):")
            lines += ["  " + row for row in r["largest_buffers"]]
        return "\n".join(lines)
    m = r["memory_gib"]
    lines.append(
        f"memory per chip (GiB): arguments {m['arguments']:.2f}, outputs "
        f"{m['outputs']:.2f} (aliased {m['aliased']:.2f}), temporaries "
        f"{m['temporaries']:.2f}, code {m['code']:.2f} -> total {m['total']:.2f}"
        + (f" of {hbm:.2f} HBM ({'fits' if r['fits'] else 'DOES NOT FIT'})" if hbm else "")
    )
    lines.append(f"compile: lower {r['lower_s']} s, compile {r['compile_s']} s")
    if r.get("largest_buffers"):
        lines.append("largest buffers (XLA memory-usage report):")
        lines += ["  " + row for row in r["largest_buffers"]]
    if r.get("hoisted_cast_shapes"):
        lines.append(
            f"WARNING: XLA keeps bf16 copies of stacked fp32 weights outside the layer "
            f"scan ({r['hoisted_cast_gib'] * 1024:.1f} MiB per chip; shapes "
            f"{r['hoisted_cast_shapes']}): the cast was hoisted out of the loop"
        )
    f = r["flops"]
    lines.append(
        f"FLOPs per chip per step: analytic model {f['analytic_model_per_chip']:.3e}, "
        f"analytic hardware {f['analytic_hardware_per_chip']:.3e}, compiled raw "
        f"{f['compiled_raw_per_chip']:.3e} (loop bodies counted once)"
        + (
            f", compiled unrolled {f['compiled_unrolled_no_remat_per_chip']:.3e} "
            f"(+ {f['analytic_remat_recompute_per_chip']:.3e} remat recompute = "
            f"{f['compiled_unrolled_per_chip']:.3e})"
            if "compiled_unrolled_per_chip" in f
            else ""
        )
    )
    mfu = r.get("mfu", {})
    if "mfu" in mfu:
        lines.append(
            f"step-time model: {mfu['model']} -> {mfu['step_time_s'] * 1e3:.2f} ms "
            f"({mfu['bound']}-bound): MFU {mfu['mfu']:.1%}, "
            f"{mfu['tokens_per_s_per_chip']:.1f} tokens/s/chip"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hunyuan_jax.aot",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="model YAML (configs/*.yaml) or HF config")
    p.add_argument(
        "--topology",
        required=True,
        help="v5p-256 / v6e-32 / v5e-64 / v4-128 (Cloud TPU names: TensorCores on "
        "v4 and v5p, chips on v5e and v6e), a topology like v5p:4x4x8, or "
        "'local' (this host's devices)",
    )
    p.add_argument(
        "--slices", type=int, default=1, help="number of slices (multi-slice; use dcn.* mesh sizes)"
    )
    p.add_argument("--mode", choices=MODES, default="train")
    p.add_argument("--mesh", default=None, help="e.g. fsdp=-1,expert=16 (default per mode)")
    p.add_argument(
        "--rules",
        default=None,
        help="sharding preset (default: fsdp_ep for train, serve_ep_tp otherwise)",
    )
    p.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="LOGICAL=AXES",
        help="override one logical axis of the preset, e.g. cache_length=expert or "
        "cache_batch=data+expert (repeatable)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="global batch (sequences); train "
        "default: one sequence per batch shard; prefill/decode default 1",
    )
    p.add_argument(
        "--seq",
        type=int,
        default=None,
        help="train: sequence length (4096); prefill: chunk length (512)",
    )
    p.add_argument("--cache-len", type=int, default=None, help="KV cache slots (32768)")
    p.add_argument("--micro", type=int, default=1, help="train: micro-batches per step")
    p.add_argument("--dtype", default="bfloat16", help="serving weights/compute dtype")
    p.add_argument("--param-dtype", default=None, help="train: override param_dtype")
    p.add_argument("--cache-dtype", default=None, help="KV cache dtype (default compute; int8)")
    p.add_argument(
        "--experts",
        default="default",
        choices=("default", "gather", "auto"),
        help="prefill/decode MoE dispatch: gather = expert-parallel shard_map "
        "(default when experts are sharded), auto = decode.Generator's default",
    )
    p.add_argument("--set", action="append", default=[], help="model key=value override")
    p.add_argument("--hbm-gib", type=float, default=None, help="override usable HBM per chip")
    p.add_argument(
        "--step-time",
        type=float,
        default=None,
        help="seconds per step for the MFU (default: the roofline model)",
    )
    p.add_argument(
        "--efficiency",
        type=float,
        default=1.0,
        help="fraction of peak FLOP/s in the step-time model (default 1.0)",
    )
    p.add_argument(
        "--unrolled-flops",
        action="store_true",
        help="two more compiles (1 and 2 layer groups unrolled) for exact FLOPs",
    )
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument(
        "--dump",
        default=None,
        metavar="DIR",
        help="XLA dump directory (sets XLA_FLAGS=--xla_dump_to=DIR): prints the "
        "largest buffers and checks for bf16 copies of stacked weights",
    )
    args = p.parse_args(argv)
    if args.dump:  # read by XLA when the first compile builds its options
        os.makedirs(args.dump, exist_ok=True)
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={args.dump} --xla_dump_hlo_as_text"
        ).strip()
    try:
        report = run(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1, default=str)
    if not report.get("fits", True):
        print(f"error: {args.mode} step does not fit on {args.topology}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
