"""Run directories and checkpoints (orbax-checkpoint `CheckpointManager`).

Run directory layout:

    <run>/config.yaml                     resolved `model:` + `train:` sections
    <run>/metrics.jsonl                   one JSON object per training step
    <run>/tokenizer/                      tokenizer.model (SentencePiece) or hy.tiktoken + json,
                                          and checksums.json (SHA-256 of each, written last)
    <run>/checkpoints/<step>/params       the model's nnx.State (the tree decoding uses)
    <run>/checkpoints/<step>/opt_state    the optax state
    <run>/checkpoints/<step>/data         every host's data-iterator state (JSON)
    <run>/checkpoints/<step>/integrity    checksums of the other items and the loss statistics
                                          of the steps before it (JSON, see below)
    <run>/checkpoints/corrupt-<step>      a step that failed verification, set aside on resume

Saves are asynchronous (device -> host copy blocks, the writes run in the background), sharded
(each host writes its own shards, OCDBT/tensorstore) and atomic: orbax writes into
`<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` only after every item is complete,
so a run killed mid-save leaves no directory that looks complete; the manager lists and
restores only finished steps and removes stale temporary directories when it starts.
Restores go straight into the target shardings (ShapeDtypeStructs carrying NamedShardings): no
host ever materialises the full tree.

Integrity: every save records, in the step's `integrity` item (written by the same atomic
save), the 64-bit digest of every array of `params` and `opt_state` (shape, dtype, digest;
`hunyuan_jax.checkpoints.integrity`), the SHA-256 of the data states, and the health of the steps since
the previous save (`hunyuan_jax.checkpoints.health`). `Checkpointer.restore` and `restore_run_params`
recompute the digests of what they restored (on device, one pass) and raise CheckpointError
naming the first array that differs; read failures (a truncated or missing file) are
CheckpointError too. A step saved without the item (older code) is restored unverified.

Reading a run directory as a model (for decoding, export or `--init-from`) is
`hunyuan_jax.checkpoints.loading`; this module only restores arrays into given abstract targets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
import yaml
from jax.experimental import multihost_utils

from hunyuan_jax import atomic
from hunyuan_jax.checkpoints import health, integrity
from hunyuan_jax.errors import CheckpointError, NonFiniteLoss
from hunyuan_jax.model.config import ModelConfig, read_yaml
from hunyuan_jax.model.policy import RuntimePolicy

PARAMS, OPT_STATE, DATA, INTEGRITY = "params", "opt_state", "data", "integrity"
RECORD_FILE = "metadata"  # the file orbax's JsonSave writes in an item directory


# ----------------------------------------------------------------------------- run files
def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir).resolve() / "checkpoints"


def write_run_config(
    run_dir: str | Path, mcfg: ModelConfig, policy: RuntimePolicy, tcfg=None
) -> Path:
    """<run>/config.yaml with the resolved model, runtime (and train) sections (process 0)."""
    path = Path(run_dir) / "config.yaml"
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"model": dataclasses.asdict(mcfg), "runtime": dataclasses.asdict(policy)}
        if tcfg is not None:
            data["train"] = dataclasses.asdict(tcfg)
        atomic.write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path


def read_run_config(run_dir: str | Path) -> tuple[ModelConfig, RuntimePolicy, dict]:
    """(ModelConfig, RuntimePolicy, train section as a dict) of a run directory."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory: no config.yaml")
    data = read_yaml(path)
    if "model" not in data:
        raise CheckpointError(f"{path}: no 'model:' section")
    if not isinstance(data.get("train") or {}, dict):
        raise CheckpointError(f"{path}: the 'train:' section is not a mapping")
    return (
        ModelConfig.from_dict(data["model"], str(path)),
        RuntimePolicy.from_dict(data.get("runtime"), str(path)),
        dict(data.get("train") or {}),
    )


def copy_tokenizer_files(tokenizer, run_dir: str | Path) -> Path:
    """Copies the files behind a loaded tokenizer into <run>/tokenizer/ (each atomically),
    then records their checksums (`tokenizer_problem` checks them)."""
    dst = Path(run_dir) / "tokenizer"
    if jax.process_index() != 0:
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    src = getattr(tokenizer, "vocab_file", None) or getattr(tokenizer, "path", None)
    if src is None:
        raise ValueError(f"cannot tell which files make up tokenizer {tokenizer!r}")
    src = Path(src)
    if src.suffix == ".model":
        if src.resolve() != (dst / "tokenizer.model").resolve():
            atomic.copy_file(src, dst / "tokenizer.model")
    else:
        for name in (src.name, "generation_config.json", "tokenizer_config.json"):
            f = src.parent / name
            if f.is_file() and f.resolve() != (dst / name).resolve():
                atomic.copy_file(f, dst / name)
    if not (dst / TOKENIZER_SUMS).is_file():
        atomic.write_json(dst / TOKENIZER_SUMS, _file_sums(dst))
    return dst


TOKENIZER_SUMS = "checksums.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_sums(directory: Path) -> dict[str, str]:
    return {
        p.name: _sha256(p)
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != TOKENIZER_SUMS and not p.name.endswith(".tmp")
    }


def tokenizer_problem(tok_dir: str | Path) -> str | None:
    """What is wrong with a run's tokenizer/ directory, or None when every file matches the
    checksums recorded after it was written. No checksums.json: the files were not all
    written (a run killed meanwhile), or the run predates the checksums."""
    tok_dir = Path(tok_dir)
    sums_path = tok_dir / TOKENIZER_SUMS
    if not sums_path.is_file():
        return (
            f"{tok_dir} has no {TOKENIZER_SUMS} (a run killed while writing it, or one "
            f"older than the checksums)"
        )
    try:
        sums = json.loads(sums_path.read_text())
    except (OSError, ValueError) as e:
        return f"{sums_path}: unreadable ({e})"
    for name, want in sums.items():
        f = tok_dir / name
        if not f.is_file():
            return f"{f} is missing"
        if _sha256(f) != want:
            return f"{f} is corrupt ({f.stat().st_size} bytes; its checksum differs)"
    return None


# ----------------------------------------------------------------------------- abstract trees
# ----------------------------------------------------------------------------- integrity
def array_record(tree) -> dict[str, dict]:
    """{array name: {shape, dtype, digest}} of a (sharded) pytree, digests computed on device."""
    digests = integrity.tree_digests(tree)
    return {
        name: {"shape": list(x.shape), "dtype": str(x.dtype), "digest": digests[name]}
        for name, x in integrity.named_leaves(tree)
    }


def read_record(step_dir: Path) -> dict | None:
    """The integrity record of a step directory; None for a step saved without one."""
    item = Path(step_dir) / INTEGRITY
    if not item.is_dir():
        return None
    path = item / RECORD_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable integrity record ({e})") from e
    if not isinstance(record, dict) or record.get("digest") != integrity.DIGEST:
        raise CheckpointError(f"{path}: not an integrity record this code understands")
    return record


def check_arrays(record: dict, item: str, tree, step_dir: Path) -> None:
    """Recompute the digests of a restored item and compare them with the record."""
    want = {n: r["digest"] for n, r in record.get(item, {}).items()}
    integrity.compare(want, integrity.tree_digests(tree), str(Path(step_dir) / item))


def _stored_dtypes(target, arrays: dict):
    """`target` with each leaf's dtype as recorded (so that what is verified is what is
    stored; the caller casts afterwards)."""
    names = iter([n for n, _ in integrity.named_leaves(target)])

    def stored(leaf):
        if not hasattr(leaf, "shape"):
            return leaf
        rec = arrays.get(next(names))
        if rec is None or rec["dtype"] == str(leaf.dtype):
            return leaf
        return jax.ShapeDtypeStruct(leaf.shape, rec["dtype"], sharding=leaf.sharding)

    return jax.tree.map(stored, target)


def _cast_like(tree, target):
    return jax.tree.map(
        lambda x, t: x.astype(t.dtype) if hasattr(x, "dtype") and x.dtype != t.dtype else x,
        tree,
        target,
    )


# ----------------------------------------------------------------------------- manager
class Checkpointer:
    """A CheckpointManager over <run>/checkpoints: async, keep-last-K, atomic steps, each with
    its integrity record; restores are verified."""

    def __init__(self, run_dir: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = checkpoint_dir(run_dir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=1,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._saving: int | None = None  # the step of the last save started

    def _write_error(self, e: BaseException) -> CheckpointError:
        step = "" if self._saving is None else f" {self._saving}"
        return integrity.write_error(e, f"saving checkpoint{step} into {self.directory}")

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, params, opt_state, data_states: dict[str, Any], health=None) -> bool:
        """Starts saving step `step`; returns once the arrays are copied to host memory (so the
        caller may donate the buffers), the files are written in the background. The digests
        of the arrays are computed first, on device, and saved with them. Arrays holding NaN
        or inf are never saved: NonFiniteLoss (exit 5) naming them, the kept checkpoints and
        the newest healthy one (`health.stop_report`)."""
        self._refuse_nonfinite(step, params, opt_state, health)
        record = {
            "digest": integrity.DIGEST,
            PARAMS: array_record(params),
            OPT_STATE: array_record(opt_state),
            DATA: integrity.json_digest(data_states),
            "health": health,
        }
        args = ocp.args.Composite(
            **{
                PARAMS: ocp.args.StandardSave(params),
                OPT_STATE: ocp.args.StandardSave(opt_state),
                DATA: ocp.args.JsonSave(data_states),
                INTEGRITY: ocp.args.JsonSave(record),
            }
        )
        try:  # waits for the previous save, whose background failure surfaces here
            started = self.manager.save(step, args=args, force=True)
        except Exception as e:
            raise self._write_error(e) from e
        self._saving = step
        return started

    def _refuse_nonfinite(self, step: int, params, opt_state, step_health) -> None:
        bad = [f"{PARAMS}.{n}" for n in health.nonfinite_arrays(params)]
        bad += [f"{OPT_STATE}.{n}" for n in health.nonfinite_arrays(opt_state)]
        if not bad:
            return
        names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        where = f"non-finite values (NaN / inf) in {len(bad)} arrays at step {step} ({names})"
        if step_health is None:
            raise NonFiniteLoss(f"{where}; not saved into {self.directory}")
        if step_health.get("finite_steps"):
            where += (
                f" although the losses of steps {step_health['window'][0]}-{step} were finite "
                f"(last {step_health.get('loss_last', float('nan')):.4g}): an update overflowed "
                f"(a learning rate or LR scale too large?)"
            )
        raise NonFiniteLoss(
            health.stop_report(where, None, self.kept_health(), self.directory.parent)
        )

    def kept_health(self) -> dict[int, dict | None]:
        """{step: recorded health or None} of the kept checkpoints (pending saves finished)."""
        self.wait()
        out = {}
        for s in self.all_steps():
            try:
                out[s] = (self.record(s) or {}).get("health")
            except CheckpointError:
                out[s] = None
        return out

    def record(self, step: int) -> dict | None:
        return read_record(self.directory / str(step))

    def restore(self, step: int, abstract_params, abstract_opt_state):
        """(params, opt_state, data states) of `step`, placed as the abstract targets say and
        verified against the step's integrity record. CheckpointError names the first array
        that cannot be read or does not match."""
        step_dir = self.directory / str(step)
        record = read_record(step_dir)
        for item in (PARAMS, OPT_STATE):
            integrity.orbax_metadata(step_dir / item)
        stored_params, stored_opt = abstract_params, abstract_opt_state
        if record is not None:  # restore what is stored, verify it, then cast to the target
            stored_params = _stored_dtypes(abstract_params, record.get(PARAMS, {}))
            stored_opt = _stored_dtypes(abstract_opt_state, record.get(OPT_STATE, {}))
        args = ocp.args.Composite(
            **{
                PARAMS: ocp.args.StandardRestore(stored_params),
                OPT_STATE: ocp.args.StandardRestore(stored_opt),
                DATA: ocp.args.JsonRestore(),
            }
        )
        try:
            out = self.manager.restore(step, args=args)
        except Exception as e:  # tensorstore / orbax: truncated or missing files, bad JSON
            raise integrity.read_error(e, step_dir) from e
        params, opt_state, data = out[PARAMS], out[OPT_STATE], out[DATA]
        if record is not None:
            check_arrays(record, PARAMS, params, step_dir)
            check_arrays(record, OPT_STATE, opt_state, step_dir)
            if integrity.json_digest(data) != record.get(DATA):
                raise CheckpointError(f"{step_dir / DATA}: data states do not match their checksum")
        return _cast_like(params, abstract_params), _cast_like(opt_state, abstract_opt_state), data

    def set_aside(self, step: int) -> Path:
        """Moves a step that failed verification to `corrupt-<step>` (never deleted: the user
        decides), so the run continues from an older one and may save this step again."""
        src = self.directory / str(step)
        dst = self.directory / f"corrupt-{step}"
        n = 1
        while dst.exists():
            dst, n = self.directory / f"corrupt-{step}-{n}", n + 1
        if jax.process_index() == 0:
            os.replace(src, dst)
            atomic.fsync_dir(self.directory)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self.manager.reload()
        return dst

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # a background save failed (disk full, permission, ...)
            raise self._write_error(e) from e

    def close(self) -> None:
        self.wait()
        self.manager.close()


def complete_steps(run_dir: str | Path) -> list[int]:
    """The finalized checkpoint steps of a run, ascending (orbax renames a step directory into
    place only when every item is written, so a killed save never appears here)."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    return sorted(ocp.utils.checkpoint_steps(directory))


def latest_step(run_dir: str | Path) -> int | None:
    """The last complete checkpoint step of a run (None if none)."""
    steps = complete_steps(run_dir)
    return steps[-1] if steps else None


def restore_run_params(run_dir: str | Path, target, step: int | None = None):
    """(step, params) of checkpoint `step` of a run (default: the latest complete one),
    restored into `target` (an abstract nnx.State of ShapeDtypeStructs with shardings) and
    verified against the step's integrity record (restored in the stored dtype, checked, then
    cast to the target's). Reads only the params item (no CheckpointManager: nothing is
    written or cleaned)."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        raise CheckpointError(f"{run_dir}: no checkpoints/ directory")
    step = latest_step(run_dir) if step is None else step
    if step is None:
        raise CheckpointError(f"no complete checkpoint under {directory}")
    path = directory / str(step) / PARAMS
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint item (steps: {complete_steps(run_dir)})")
    record = read_record(directory / str(step))
    integrity.orbax_metadata(path)
    stored = target if record is None else _stored_dtypes(target, record.get(PARAMS, {}))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(path, stored)
    except Exception as e:  # tensorstore / orbax: truncated or missing files
        raise integrity.read_error(e, path) from e
    if record is not None:
        check_arrays(record, PARAMS, params, directory / str(step))
    return step, _cast_like(params, target)
