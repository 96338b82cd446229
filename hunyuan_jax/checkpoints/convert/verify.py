"""`python -m hunyuan_jax.cli.convert verify --ckpt DIR [--step N]`: read a checkpoint in full and
check every byte against its checksums, naming the first bad array and file.

| DIR | what is checked |
|---|---|
| converted (`hf-to-jax`) | the manifest; config.json is the architecture the manifest records (`hf_config`) and has exactly the manifest's leaves; every leaf listed there exists with its shape and dtype; every chunk of every leaf is read (tensorstore checks each chunk's crc32c and each shard index's crc32c; a missing chunk file is an error, not zeros); no NaN / Inf in the weights |
| train.py run | each complete step (or `--step N`): every array of `params` and `opt_state` is read back and its digest compared with the step's integrity record, the data states with their SHA-256; no NaN / Inf in the parameters; the run's tokenizer files against their checksums |
| Hugging Face | the index and every shard's header and size (the format has no checksums) |

Memory: one block of <= 64 MB at a time. Returns a summary; raises CheckpointError (exit 4)
for the first problem.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from hunyuan_jax.checkpoints import converted as fmt
from hunyuan_jax.checkpoints import hf_checkpoint, integrity, loading, runs
from hunyuan_jax.checkpoints.convert.common import default_log
from hunyuan_jax.checkpoints.hf_checkpoint import HeaderView, HFCheckpoint
from hunyuan_jax.errors import CheckpointError, UsageError
from hunyuan_jax.model.config import ModelConfig
from hunyuan_jax.model.policy import INT4_GROUP_SIZE, RuntimePolicy
from hunyuan_jax.model.state import abstract_model, flat_shapes


def verify(ckpt: str | Path, step: int | None = None, log=None) -> dict:
    """Verify a converted checkpoint, a run directory (every complete step, or `step`) or a
    Hugging Face checkpoint; returns {"format", "arrays", "bytes", "seconds", "steps"?,
    "checksums"}."""
    log = log or default_log
    path = Path(ckpt)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    kind = loading.detect_format(path)
    if kind is None:
        loading.open_checkpoint(path)  # the error naming what the directory is not
    if step is not None and kind != "run":
        raise UsageError(f"--step is only for a train.py run directory; {path} is {kind}")
    t0 = time.time()
    if kind == "converted":
        out = verify_converted(path, log)
    elif kind == "run":
        out = verify_run(path, step, log)
    else:
        out = verify_hf(path, log)
    out["seconds"] = round(time.time() - t0, 3)
    return out


def _read_leaf(params_dir: Path, name: str, use_ocdbt: bool, use_zarr3: bool):
    if not use_ocdbt and not (params_dir / name).is_dir():
        raise CheckpointError(f"{params_dir / name}: array {name} is missing")
    return fmt.open_for_read(params_dir, name, use_ocdbt, use_zarr3)


def verify_converted(path: Path, log) -> dict:
    man = fmt.read_manifest(path)
    # config.json against the architecture the manifest recorded (`fmt.stored_config`), and
    # the manifest's leaves against what that architecture has.
    cfg = loading.read_model_config(path)
    p = man["params"]
    params_dir = path / p["dir"]
    checksum = p.get("checksum", "none")
    form = man.get("weights", {}).get("form", "float")
    group = man.get("weights", {}).get("group_size") or INT4_GROUP_SIZE
    want = fmt.param_leaves(cfg, man["dtype"], "auto" if form == "float" else form, group)
    want = {l.name: f"{l.dtype.name} {list(l.shape)}" for l in want.values()}
    got = {n: f"{i['dtype']} {list(i['shape'])}" for n, i in p["leaves"].items()}
    for name in sorted(set(want) | set(got)):
        if want.get(name) != got.get(name):
            raise CheckpointError(
                f"{path / fmt.MANIFEST}: array {name} is {got.get(name, 'absent')} in the "
                f"manifest, but the architecture of {path / fmt.CONFIG} gives "
                f"{want.get(name, 'no such array')}"
            )
    _, _, names = integrity.orbax_metadata(params_dir)
    if sorted(names) != sorted(p["leaves"]):
        extra = sorted(set(names) ^ set(p["leaves"]))
        raise CheckpointError(
            f"{params_dir / '_METADATA'}: array {extra[0]} is in the orbax metadata or the "
            f"manifest, not both"
        )
    total, n = 0, 0
    for name, info in p["leaves"].items():
        try:
            arr = _read_leaf(params_dir, name, p["use_ocdbt"], p["use_zarr3"])
        except CheckpointError as e:
            raise integrity.read_error(e.__cause__ or e, params_dir, name) from e
        if list(arr.shape) != list(info["shape"]) or arr.dtype.numpy_dtype.name != info["dtype"]:
            raise CheckpointError(
                f"{params_dir / name}: array {name} is {arr.dtype.numpy_dtype.name} "
                f"{list(arr.shape)}, the manifest says {info['dtype']} {info['shape']}"
            )
        _, nbytes, bad = integrity.stored_digest(arr, params_dir, name)
        if bad:
            raise CheckpointError(f"{params_dir / name}: array {name} holds {bad} NaN/Inf values")
        total, n = total + nbytes, n + 1
    for name in man.get("tokenizer_files", []):
        if not (path / name).is_file():
            raise CheckpointError(
                f"{path / name}: tokenizer file listed in the manifest is missing"
            )
    note = (
        "every chunk's crc32c matches"
        if checksum == "crc32c"
        else "written without checksums: every chunk was read, values cannot be checked"
    )
    log(f"verified {path}: {n} arrays, {total / 1e9:.3f} GB; {note}")
    return {"format": "converted", "arrays": n, "bytes": total, "checksums": checksum}


def verify_step(run: Path, step: int) -> tuple[int, int, bool]:
    """(arrays, bytes, had checksums) of one run step, every array read back and checked."""
    step_dir = runs.checkpoint_dir(run) / str(step)
    record = runs.read_record(step_dir)
    n = total = 0
    for item in (runs.PARAMS, runs.OPT_STATE):
        item_dir = step_dir / item
        if not item_dir.is_dir():
            raise CheckpointError(f"{item_dir}: item {item} is missing")
        ocdbt, zarr3, names = integrity.orbax_metadata(item_dir)
        want = None if record is None else {k: r["digest"] for k, r in record[item].items()}
        if want is not None and sorted(want) != sorted(names):
            extra = sorted(set(names) ^ set(want))
            raise CheckpointError(
                f"{item_dir}: array {extra[0]} is in the metadata or the record, not both"
            )
        for name in names:
            arr = fmt.open_for_read(item_dir, name, ocdbt, zarr3)
            digest, nbytes, bad = integrity.stored_digest(arr, item_dir, name)
            if want is not None and digest != want[name]:
                raise CheckpointError(
                    f"{item_dir}: array {name} is corrupt (checksum {digest}, recorded "
                    f"{want[name]})"
                )
            if bad and item == runs.PARAMS:
                raise CheckpointError(f"{item_dir}: array {name} holds {bad} NaN/Inf values")
            n, total = n + 1, total + nbytes
    data = step_dir / runs.DATA / runs.RECORD_FILE
    try:
        states = json.loads(data.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{data}: unreadable data states ({e})") from e
    if record is not None and integrity.json_digest(states) != record.get(runs.DATA):
        raise CheckpointError(f"{data}: data states do not match their checksum")
    return n, total, record is not None


def verify_run(run: Path, step: int | None, log) -> dict:
    steps = runs.complete_steps(run)
    if not steps:
        raise CheckpointError(f"run {run} has no complete checkpoint")
    if step is not None:
        if step not in steps:
            raise CheckpointError(
                f"run {run} has no complete checkpoint of step {step} (steps: "
                f"{', '.join(map(str, steps))})"
            )
        steps = [step]
    tok = run / "tokenizer"
    if (tok / runs.TOKENIZER_SUMS).is_file():
        problem = runs.tokenizer_problem(tok)
        if problem:
            raise CheckpointError(problem)
    good, failures, n, total, unchecked = [], [], 0, 0, []
    for s in reversed(steps):
        try:
            a, b, checked = verify_step(run, s)
        except CheckpointError as e:
            if step is not None:
                raise
            failures.append((s, e))
            continue
        good.append(s)
        n, total = n + a, total + b
        if not checked:
            unchecked.append(s)
        log(f"step {s}: ok ({a} arrays, {b / 1e9:.3f} GB{', no checksums' if not checked else ''})")
    if failures:
        s, e = failures[0]
        bad = ", ".join(str(f) for f, _ in failures)
        ok = f"steps that verify: {', '.join(map(str, sorted(good)))}" if good else "none verifies"
        raise CheckpointError(f"{e} (step {s}; steps that fail: {bad}; {ok})")
    note = f"; steps {unchecked} have no checksums (saved by older code)" if unchecked else ""
    log(f"verified {run}: steps {sorted(good)}, {n} arrays, {total / 1e9:.3f} GB{note}")
    return {
        "format": "run",
        "steps": sorted(good),
        "arrays": n,
        "bytes": total,
        "checksums": "digest" if not unchecked else "partial",
    }


def verify_hf(path: Path, log) -> dict:
    cfg = ModelConfig.from_hf(path)
    ckpt = HFCheckpoint(path)
    infos = ckpt.tensor_infos()
    hf_checkpoint.verify(
        cfg, HeaderView(ckpt, infos), flat_shapes(abstract_model(cfg, RuntimePolicy()))
    )
    total = sum(i.nbytes for i in infos.values())
    log(
        f"checked {path}: {len(infos)} tensors, {total / 1e9:.3f} GB; Hugging Face checkpoints "
        f"carry no checksums: headers, sizes and shapes only"
    )
    return {"format": "hf", "arrays": len(infos), "bytes": total, "checksums": "none"}
