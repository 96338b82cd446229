"""LoRA: low-rank adapters beside the frozen matmul weights, their config, the frozen base's
form, the run directory's base pointer, and folding adapters into the base (merge).

    lcfg = LoraConfig(rank=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    add_adapters(model, lcfg, key, plan)   # in place: <name>_lora_a / _lora_b beside each target
    merged = merge_adapters(model)         # in place: W + alpha/rank * A @ B, adapters removed

Layout. An adapted weight `module.<name>` (float, bf16 or a quantized QArray) gets

    <name>_lora_a: nnx.LoRAParam [*batch, *contracted, r]   (float32; N(0, 1/fan_in))
    <name>_lora_b: nnx.LoRAParam [*batch, r, *out]          (float32; zeros: a new adapter is
                                                             exactly the base model)
    <name>_lora_scale = alpha / rank, <name>_lora_dropout    (static attributes; the dropout
                                                             drops the adapter path's input in
                                                             training, `qops.Adapted`)

where batch are the weight's stacked `layers` axis and the routed experts' `exp` axis, and
contracted / out its contracted and output dims (`quantize.CONTRACTED`). Logical axes are the
weight's with None on the rank dim, so the sharding rules place adapters like their weights with
no new rule. `hunyuan_jax.model.qops.weight` reads such a weight as `Adapted` and every matmul adds
scale * (x A) B, for float and quantized (QLoRA) bases alike.

Why not qwix's `LoraProvider` / `apply_lora_to_model`: it creates the adapters lazily inside
the first intercepted `einsum` / `dot_general` call of each module, which in this model runs
inside `lax.scan` over the stacked layer groups (parameters created under the scan's trace do
not come back out into the stacked state), it has no `ragged_dot` (the routed experts), and
its adapters take the base weight's dtype (bf16 adapters for a bf16 base). Explicit adapters
use the same attribute names and the same nnx.LoRAParam type as qwix, and qwix still serves
the int8 / fp8 base (`hunyuan_jax.model.quantize`).

Targets: q_proj, k_proj, v_proj, o_proj (attention; the public recipe, the default), `shared`
(the shared expert's gate/up/down) and `experts` (every routed expert's gate/up/down).

Applying a run's adapters (`load_adapted`: infer.py's and the server's --adapter through
`loading.load`, `convert merge-lora`) first checks the base (`check_base`): the run's
architecture and the digest `lora_base.json` records, or refuses (CheckpointError) unless
`--allow-base-mismatch`.

The frozen base of a LoRA run (`base_policy`, `run_policy`): its matmul weights in bfloat16, or
as `runtime.weights` says (int8 / fp8: QLoRA), or as the base checkpoint stores them when it
stores them quantized (`hf-to-jax --quantize`); the other parameters as stored.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from hunyuan_jax.errors import CheckpointError, ConfigError
from hunyuan_jax.model import quantize
from hunyuan_jax.model.config import dataclass_from_dict

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
TARGETS = ATTENTION + ("shared", "experts")
POINTER_FILE = "lora_base.json"  # <run>/lora_base.json: which base the adapters belong to
_SUFFIXES = ("_lora_a", "_lora_b", "_lora_scale", "_lora_dropout")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The `lora:` mapping of a train config's `train:` section."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # in training, on the input of each adapter path (x A B)
    targets: tuple[str, ...] = ATTENTION

    def __post_init__(self):
        if isinstance(self.targets, str):  # `targets: q_proj` is one target, not its letters
            object.__setattr__(self, "targets", (self.targets,))
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"train key 'lora.rank' must be a positive int, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ConfigError(f"train key 'lora.alpha' must be a number, got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"train key 'lora.dropout' must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ConfigError(
                f"train key 'lora.targets' must be a non-empty list of {list(TARGETS)}, "
                f"got {list(self.targets)}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_value(cls, value: Any) -> LoraConfig | None:
        """The `lora:` value as written in YAML: null / false (off), true (the defaults), a
        mapping of the fields above, or a LoraConfig."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"train key 'lora' must be a mapping, true or null, got {value!r}")
        return dataclass_from_dict(cls, value, "train", "lora")


# ----------------------------------------------------------------------------- which weights
def target_of(path: tuple, name: str) -> str:
    """The target a matmul weight belongs to: its own name for attention, else 'shared' or
    'experts'."""
    if name in ATTENTION:
        return name
    return "shared" if "shared" in tuple(map(str, path)) else "experts"


def targeted(model, lcfg: LoraConfig) -> Iterator[tuple[tuple, nnx.Module, str]]:
    """(module path, module, weight name) of every matmul weight the config adapts."""
    for path, module, name in quantize.matmul_weights(model):
        if target_of(path, name) in lcfg.targets:
            yield path, module, name


def adapted(model) -> Iterator[tuple[tuple, nnx.Module, str]]:
    """(module path, module, weight name) of every weight that has an adapter."""
    for path, module, name in quantize.matmul_weights(model):
        if getattr(module, name + "_lora_a", None) is not None:
            yield path, module, name


def adapter_layout(name: str, shape, axes, rank: int):
    """((A shape, A axes), (B shape, B axes)) for weight `name` of `shape` / logical `axes`
    (laid out [*batch, *contracted, *out])."""
    dims = quantize.contracted_dims(name, axes)
    lo, hi = dims[0], dims[-1] + 1
    if tuple(dims) != tuple(range(lo, hi)):
        raise ValueError(f"{name}: contracted dims {dims} of {tuple(axes)} are not contiguous")
    shape, axes = tuple(shape), tuple(axes)
    a = (shape[:hi] + (rank,), axes[:hi] + (None,))
    b = (shape[:lo] + (rank,) + shape[hi:], axes[:lo] + (None,) + axes[hi:])
    return a, b


# ----------------------------------------------------------------------------- adapters
def add_adapters(model, lcfg: LoraConfig, key: jax.Array, plan=None):
    """In place: a fresh adapter beside every targeted weight (A ~ N(0, 1/fan_in) with fan_in
    the contracted size, B = 0, float32), all created by one jitted call (on a sharded plan
    with the plan's output shardings: each device makes its own shards). Returns `model`."""
    sites = []
    for _, module, name in targeted(model, lcfg):
        axes = quantize.weight_axes(getattr(module, name))
        shape = _stored_shape(getattr(module, name))
        a, b = adapter_layout(name, shape, axes, lcfg.rank)
        fan_in = math.prod(shape[d] for d in quantize.contracted_dims(name, axes))
        sites.append((module, name, a, b, fan_in))

    def make(key):
        out = []
        for i, (_, _, (a_shape, _), (b_shape, _), fan_in) in enumerate(sites):
            a = jax.random.normal(jax.random.fold_in(key, i), a_shape, jnp.float32)
            out.append((a / math.sqrt(fan_in), jnp.zeros(b_shape, jnp.float32)))
        return out

    out_shardings = None
    if plan is not None and plan.is_sharded:
        place = lambda ax, sh: jax.sharding.NamedSharding(plan.mesh, plan.spec(ax, sh))
        out_shardings = [(place(a[1], a[0]), place(b[1], b[0])) for _, _, a, b, _ in sites]
    arrays = jax.jit(make, out_shardings=out_shardings)(key)
    for (module, name, (_, a_axes), (_, b_axes), _), (a, b) in zip(sites, arrays):
        setattr(module, name + "_lora_a", nnx.LoRAParam(a, logical_axes=a_axes))
        setattr(module, name + "_lora_b", nnx.LoRAParam(b, logical_axes=b_axes))
        setattr(module, name + "_lora_scale", lcfg.scale)
        setattr(module, name + "_lora_dropout", lcfg.dropout)
    return model


def _stored_shape(var) -> tuple[int, ...]:
    v = var[...]
    v = getattr(v, "array", v)  # WithAux(QArray)
    return tuple(v.shape)


def delta(a: jax.Array, b: jax.Array, num_batch: int) -> jax.Array:
    """A @ B over the rank dim, laid out like the weight: A = [*batch, *contracted, r] and
    B = [*batch, r, *out] (`num_batch` batch dims) -> [*batch, *contracted, *out]."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    nc, no = a.ndim - 1 - num_batch, b.ndim - 1 - num_batch
    batch, con = letters[:num_batch], letters[num_batch : num_batch + nc]
    out = letters[num_batch + nc : num_batch + nc + no]
    eq = f"{batch}{con}R,{batch}R{out}->{batch}{con}{out}"
    return jnp.einsum(eq, a, b, precision=jax.lax.Precision.HIGHEST)


def remove_adapters(model) -> None:
    for _, module, name in list(adapted(model)):
        for suffix in _SUFFIXES:
            if hasattr(module, name + suffix):
                delattr(module, name + suffix)


def merge_adapters(model, dtype=jnp.float32):
    """In place: every adapted weight becomes W + scale * A @ B, computed in float32 (a
    quantized base dequantized first) and stored in `dtype`, one weight at a time (jitted; the
    result keeps the weight's sharding); its adapter is removed. Returns `model`."""
    for _, module, name in list(adapted(model)):
        var = getattr(module, name)
        axes = quantize.weight_axes(var)
        w = _fold(
            var[...],
            getattr(module, name + "_lora_a")[...],
            getattr(module, name + "_lora_b")[...],
            num_batch=quantize.contracted_dims(name, axes)[0],
            scale=getattr(module, name + "_lora_scale"),
            dtype=jnp.dtype(dtype),
        )
        setattr(module, name, nnx.Param(w, logical_axes=axes))
    remove_adapters(model)
    return model


@functools.partial(jax.jit, static_argnames=("num_batch", "scale", "dtype"))
def _fold(w, a, b, *, num_batch: int, scale: float, dtype):
    d = delta(a.astype(jnp.float32), b.astype(jnp.float32), num_batch)
    return (quantize.dequantize(w) + scale * d).astype(dtype)


# ----------------------------------------------------------------------------- the frozen base
def base_policy(policy):
    """The policy of a LoRA run's frozen base: matmul weights as `policy.weights` says, bf16
    for 'auto' (the base is never a float32 master copy: nothing updates it)."""
    return policy if policy.weights != "auto" else policy.replace(weights="bf16")


def run_policy(run_dir, policy, tcfg, resume: bool):
    """The runtime policy of a LoRA run: with `runtime.weights: auto` and a base checkpoint
    that stores quantized (int8 / fp8) matmul weights, those (QLoRA on the weights as they
    exist); otherwise `policy` (whose 'auto' `base_policy` reads as bf16)."""
    if policy.weights != "auto":
        return policy
    pointer = read_pointer(run_dir) if resume else None
    base = pointer["base"] if pointer else tcfg.init_from
    if base is None:
        return policy
    from hunyuan_jax.checkpoints import loading

    stored = loading.open_checkpoint(base).weights
    return policy.replace(weights=stored) if stored in quantize.QUANTIZED else policy


def abstract_model(cfg, policy, plan, lcfg: LoraConfig):
    """The LoRA model as ShapeDtypeStructs: the frozen base in `base_policy(policy)`'s form
    plus adapters (no memory, no compute)."""
    from hunyuan_jax.model.transformer import HunyuanForCausalLM

    form = base_policy(policy).weights

    def build():
        model = HunyuanForCausalLM(cfg, policy, plan, rngs=nnx.Rngs(0))
        return add_adapters(quantize.convert_model(model, form), lcfg, jax.random.key(0))

    return nnx.eval_shape(build)


def split(model):
    """(graphdef, adapters, frozen base) of a LoRA model: nnx.LoRAParam is what trains."""
    return nnx.split(model, nnx.LoRAParam, ...)


def base_digest(model) -> str:
    """One digest of every parameter of a (base) model as held (`integrity` per-array digests,
    computed on device, combined): the identity the base pointer records."""
    from hunyuan_jax.checkpoints import integrity

    return integrity.json_digest(integrity.tree_digests(nnx.state(model)))


def write_pointer(run_dir, base: str | None, seed: int, form: str, digest: str) -> Path:
    """<run>/lora_base.json: the base the adapters belong to (path, or the seed of a random
    base), the form it is held in during training, and its digest (process 0)."""
    from hunyuan_jax import atomic

    path = Path(run_dir) / POINTER_FILE
    if jax.process_index() == 0:
        base = None if base is None else str(Path(base).resolve())
        record = {"base": base, "seed": seed, "weights": form, "digest": digest}
        atomic.write_json(path, record)
    return path


def read_pointer(run_dir) -> dict | None:
    """<run>/lora_base.json, its fields checked (None: the file does not exist)."""
    path = Path(run_dir) / POINTER_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable LoRA base pointer ({e})") from e
    if not isinstance(record, dict) or not {"base", "digest"} <= set(record):
        raise CheckpointError(f"{path}: not a LoRA base pointer (keys base, digest)")
    problem = None
    if not (isinstance(record["base"], str) and record["base"]) and record["base"] is not None:
        problem = f"'base' must be a path or null, got {record['base']!r}"
    elif not (
        isinstance(record["digest"], str)
        and len(record["digest"]) == 64
        and all(c in "0123456789abcdef" for c in record["digest"])
    ):
        problem = f"'digest' must be 64 hex digits, got {record['digest']!r}"
    elif record.get("weights", "bf16") not in ("bf16",) + tuple(quantize.QUANTIZED):
        problem = f"'weights' must be bf16, int8 or fp8, got {record.get('weights')!r}"
    elif not isinstance(record.get("seed", 0), int) or isinstance(record.get("seed"), bool):
        problem = f"'seed' must be an int, got {record.get('seed')!r}"
    if problem:
        raise CheckpointError(f"{path}: corrupt LoRA base pointer: {problem}")
    return record


def _mismatch(run_dir, pointer: dict, base, found: str) -> str:
    """The one line of a base that is not the one the adapters were trained on."""
    trained = pointer["base"] or f"a random base (seed {pointer.get('seed')})"
    return (
        f"the adapters of {run_dir} were trained on {trained} (digest {pointer['digest']}, "
        f"{Path(run_dir) / POINTER_FILE}), not on {base} ({found})"
    )


def trained_base_policy(run_dir):
    """The policy the base of LoRA run `run_dir` was held in when its digest was recorded:
    the run's runtime section with the matmul weights in the pointer's form."""
    from hunyuan_jax.checkpoints.runs import read_run_config

    _, runtime, _ = read_run_config(run_dir)
    pointer = read_pointer(run_dir) or {}
    return base_policy(runtime.replace(weights=pointer.get("weights", "auto")))


def check_base(
    run_dir, ckpt, plan=None, *, model=None, allow_mismatch: bool = False, log=print
) -> None:
    """The one check that the base `ckpt` (a `loading.Checkpoint`) is the one the adapters of
    LoRA run `run_dir` were trained on: the same architecture as the run's config.yaml and
    the digest its lora_base.json records (`base_digest` of the base held as in training:
    `model` when it is already held so, else the base loaded once more in that form; a copy
    of the base in another directory or format is the same base when its values are).
    CheckpointError on a mismatch, naming both bases and digests; with `allow_mismatch`
    (`--allow-base-mismatch`) the check is not made (a line says so)."""
    from hunyuan_jax.checkpoints.runs import read_run_config

    pointer = read_pointer(run_dir)
    if pointer is None:
        raise CheckpointError(f"{run_dir} has no {POINTER_FILE}: not a LoRA run directory")
    if allow_mismatch:
        log(f"[lora] base {ckpt.path} not checked against {run_dir} (--allow-base-mismatch)")
        return
    cfg, _, _ = read_run_config(run_dir)
    if cfg != ckpt.cfg:
        diff = [
            f"{f.name} {getattr(cfg, f.name)} vs {getattr(ckpt.cfg, f.name)}"
            for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(ckpt.cfg, f.name)
        ]
        raise CheckpointError(
            _mismatch(run_dir, pointer, ckpt.path, "another architecture: " + ", ".join(diff))
        )
    if model is None:
        from hunyuan_jax.checkpoints import loading

        model = loading.load_params(ckpt, trained_base_policy(run_dir), plan)
    digest = base_digest(model)
    if digest != pointer["digest"]:
        raise CheckpointError(
            _mismatch(run_dir, pointer, ckpt.path, f"digest {digest}")
            + "; pass --allow-base-mismatch to apply them anyway"
        )


def load_adapted(
    ckpt,
    policy,
    run_dir,
    plan=None,
    *,
    step: int | None = None,
    allow_base_mismatch: bool = False,
    log=print,
):
    """(model, step): base checkpoint `ckpt` loaded with `policy` plus the adapters of LoRA run
    `run_dir` (checkpoint `step`, default the latest), after `check_base`. What infer.py's
    and the server's --adapter (`loading.load`) and `convert merge-lora` all call. When the
    base is not held in its training form, the check's copy is loaded, digested and dropped
    before the model is loaded (peak: one copy; time: two loads)."""
    from hunyuan_jax.checkpoints import loading

    same = policy == trained_base_policy(run_dir) and not allow_base_mismatch
    if not same:
        check_base(run_dir, ckpt, plan, allow_mismatch=allow_base_mismatch, log=log)
    model = loading.load_params(ckpt, policy, plan)
    if same:
        check_base(run_dir, ckpt, plan, model=model, log=log)
    return attach(model, run_dir, plan, step)


def load_base(base: str | None, cfg, policy, plan, seed: int = 0):
    """The base model in the form `policy.weights` asks for: a checkpoint any format
    `loading` knows, or (base None) the random model of `seed`."""
    if base is None:
        from hunyuan_jax.model.state import init_model

        return init_model(cfg, policy, plan, seed)
    from hunyuan_jax.checkpoints import loading

    return loading.load_params(loading.open_checkpoint(base), policy, plan)


def training_model(run_dir, cfg, policy, tcfg, plan, resume: bool, log=print):
    """The model a LoRA run trains: its frozen base (`base_policy`) plus fresh adapters.
    A new run takes the base from `tcfg.init_from` (random without one) and records the
    pointer; a resumed run takes it from the pointer and checks its digest (CheckpointError
    when the base changed: the adapters belong to the base they were trained on)."""
    pointer = read_pointer(run_dir) if resume else None
    if resume and pointer is None:
        raise CheckpointError(f"{run_dir} is a LoRA run without its {POINTER_FILE}")
    base = pointer["base"] if pointer else tcfg.init_from
    seed = pointer.get("seed", tcfg.seed) if pointer else tcfg.seed
    bpolicy = base_policy(policy)
    import time

    t0 = time.time()
    model = load_base(base, cfg, bpolicy, plan, seed)
    digest = base_digest(model)
    what = base or f"random (seed {seed})"
    if pointer is not None and pointer["digest"] != digest:
        raise CheckpointError(_mismatch(run_dir, pointer, what, f"digest {digest}"))
    if pointer is None:
        write_pointer(run_dir, base, seed, bpolicy.weights, digest)
    log(
        f"[lora] base {what} as {bpolicy.weights} ({time.time() - t0:.1f}s, digest {digest[:12]}); "
        f"adapters rank {tcfg.lora.rank} alpha {tcfg.lora.alpha} on {list(tcfg.lora.targets)}"
    )
    return add_adapters(model, tcfg.lora, jax.random.fold_in(jax.random.key(tcfg.seed), 1), plan)


# ----------------------------------------------------------------------------- a run's adapters
def run_lora_config(run_dir) -> LoraConfig | None:
    """The LoRA config of a train.py run directory (None: not a LoRA run)."""
    from hunyuan_jax.checkpoints.runs import read_run_config

    _, _, train = read_run_config(run_dir)
    return LoraConfig.from_value(train.get("lora"))


def recorded_base(run_dir) -> str:
    """The base checkpoint a LoRA run's pointer names (CheckpointError when it has none)."""
    pointer = read_pointer(run_dir)
    if pointer is None:
        raise CheckpointError(f"{run_dir} has no {POINTER_FILE}: not a LoRA run directory")
    if pointer["base"] is None:
        raise CheckpointError(
            f"the LoRA run {run_dir} was trained on a random base (seed {pointer.get('seed')}): "
            f"there is no base checkpoint to load it beside"
        )
    return pointer["base"]


def attach(model, run_dir, plan=None, step: int | None = None):
    """(model with adapters, step): the adapters of a LoRA run's checkpoint `step` (default:
    the latest) beside the weights of `model` (its base, in any form), restored into the
    plan's layout and verified against the step's integrity record."""
    from hunyuan_jax.checkpoints.runs import restore_run_params
    from sharding.plan import ShardingPlan

    lcfg = run_lora_config(run_dir)
    if lcfg is None:
        raise CheckpointError(f"{run_dir} is not a LoRA run (its config.yaml has no train.lora)")
    plan = plan or ShardingPlan.single()
    add_adapters(model, lcfg, jax.random.key(0), plan)
    graphdef, adapters, rest = split(model)
    target = plan.abstract(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), adapters))
    step, restored = restore_run_params(run_dir, target, step)
    return nnx.merge(graphdef, restored, rest), step
