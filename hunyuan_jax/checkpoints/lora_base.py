"""A LoRA run's base: which base its adapters belong to (`<run>/lora_base.json`: path or seed,
the form it was held in, its digest), the one check that a base is that one (`check_base`),
the model a LoRA run trains (`training_model`: new or resumed), and a run's adapters loaded
beside a base (`load_adapted`, `attach`: infer.py's and the server's --adapter, `convert
merge-lora`). Above the loader (it loads bases); the adapters themselves are
`hunyuan_jax.model.lora`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
from flax import nnx

from hunyuan_jax import atomic
from hunyuan_jax.checkpoints import integrity, loading
from hunyuan_jax.checkpoints.runs import read_run_config, restore_run_params
from hunyuan_jax.errors import CheckpointError
from hunyuan_jax.model import quantize
from hunyuan_jax.model.config import LoraConfig
from hunyuan_jax.model.lora import add_adapters, base_policy, split
from hunyuan_jax.model.state import init_model
from sharding.plan import ShardingPlan

POINTER_FILE = "lora_base.json"  # <run>/lora_base.json: which base the adapters belong to


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
    stored = loading.open_checkpoint(base).weights
    return policy.replace(weights=stored) if stored in quantize.QUANTIZED else policy


def base_digest(model) -> str:
    """One digest of every parameter of a (base) model as held (`integrity` per-array digests,
    computed on device, combined): the identity the base pointer records."""
    return integrity.json_digest(integrity.tree_digests(nnx.state(model)))


def write_pointer(run_dir, base: str | None, seed: int, form: str, digest: str) -> Path:
    """<run>/lora_base.json: the base the adapters belong to (path, or the seed of a random
    base), the form it is held in during training, and its digest (process 0)."""
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
    and the server's --adapter (`from_checkpoint.load`) and `convert merge-lora` all call. When the
    base is not held in its training form, the check's copy is loaded, digested and dropped
    before the model is loaded (peak: one copy; time: two loads)."""
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
        return init_model(cfg, policy, plan, seed)
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
    lcfg = run_lora_config(run_dir)
    if lcfg is None:
        raise CheckpointError(f"{run_dir} is not a LoRA run (its config.yaml has no train.lora)")
    plan = ShardingPlan.or_single(plan)
    add_adapters(model, lcfg, jax.random.key(0), plan)
    graphdef, adapters, rest = split(model)
    target = plan.abstract(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), adapters))
    step, restored = restore_run_params(run_dir, target, step)
    return nnx.merge(graphdef, restored, rest), step
