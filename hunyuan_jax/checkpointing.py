"""Run directories and checkpoints (orbax-checkpoint `CheckpointManager`).

Run directory layout:

    <run>/config.yaml                     resolved `model:` + `train:` sections
    <run>/metrics.jsonl                   one JSON object per training step
    <run>/tokenizer/                      tokenizer.model (SentencePiece) or hy.tiktoken + json
    <run>/checkpoints/<step>/params       the model's nnx.State (the tree decoding uses)
    <run>/checkpoints/<step>/opt_state    the optax state
    <run>/checkpoints/<step>/data         every host's data-iterator state (JSON)

Saves are asynchronous (device -> host copy blocks, the writes run in the background), sharded
(each host writes its own shards, OCDBT/tensorstore) and atomic: orbax writes into
`<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` only after every item is complete,
so a run killed mid-save leaves no directory that looks complete; the manager lists and
restores only finished steps and removes stale temporary directories when it starts.
Restores go straight into the target shardings (ShapeDtypeStructs carrying NamedShardings): no
host ever materialises the full tree.

Reading a run directory as a model (for decoding, export or `--init-from`) is
`hunyuan_jax.loading`; this module only restores arrays into given abstract targets.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
import yaml

from hunyuan_jax.config import ModelConfig, read_yaml
from hunyuan_jax.errors import CheckpointError
from hunyuan_jax.policy import RuntimePolicy

PARAMS, OPT_STATE, DATA = "params", "opt_state", "data"


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
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
        tmp.replace(path)
    return path


def read_run_config(run_dir: str | Path) -> tuple[ModelConfig, RuntimePolicy, dict]:
    """(ModelConfig, RuntimePolicy, train section as a dict) of a run directory."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory: no config.yaml")
    data = read_yaml(path)
    if "model" not in data:
        raise CheckpointError(f"{path}: no 'model:' section")
    return (
        ModelConfig.from_dict(data["model"], str(path)),
        RuntimePolicy.from_dict(data.get("runtime"), str(path)),
        dict(data.get("train") or {}),
    )


def copy_tokenizer_files(tokenizer, run_dir: str | Path) -> Path:
    """Copies the files behind a loaded tokenizer into <run>/tokenizer/."""
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
            shutil.copyfile(src, dst / "tokenizer.model")
    else:
        for name in (src.name, "generation_config.json", "tokenizer_config.json"):
            f = src.parent / name
            if f.is_file() and f.resolve() != (dst / name).resolve():
                shutil.copyfile(f, dst / name)
    return dst


# ----------------------------------------------------------------------------- abstract trees
def with_shardings(abstract, shardings):
    """ShapeDtypeStructs carrying the target shardings (restore targets)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


# ----------------------------------------------------------------------------- manager
class Checkpointer:
    """A CheckpointManager over <run>/checkpoints: async, keep-last-K, atomic steps."""

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

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, params, opt_state, data_states: dict[str, Any]) -> bool:
        """Starts saving step `step`; returns once the arrays are copied to host memory (so the
        caller may donate the buffers), the files are written in the background."""
        args = ocp.args.Composite(
            **{
                PARAMS: ocp.args.StandardSave(params),
                OPT_STATE: ocp.args.StandardSave(opt_state),
                DATA: ocp.args.JsonSave(data_states),
            }
        )
        return self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_params, abstract_opt_state):
        """(params, opt_state, data states) of `step`, placed as the abstract targets say."""
        args = ocp.args.Composite(
            **{
                PARAMS: ocp.args.StandardRestore(abstract_params),
                OPT_STATE: ocp.args.StandardRestore(abstract_opt_state),
                DATA: ocp.args.JsonRestore(),
            }
        )
        out = self.manager.restore(step, args=args)
        return out[PARAMS], out[OPT_STATE], out[DATA]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
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


def all_steps(run_dir: str | Path) -> list[int]:
    """The complete checkpoint steps of a run, ascending ([] if none)."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    with ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0),
    ) as mgr:
        return sorted(mgr.all_steps())


def restore_run_params(run_dir: str | Path, target, step: int | None = None):
    """(step, params) of checkpoint `step` of a run (default: the latest complete one),
    restored into `target` (an abstract nnx.State of ShapeDtypeStructs with shardings).
    Reads only the params item (no CheckpointManager: nothing is written or cleaned)."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        raise CheckpointError(f"{run_dir}: no checkpoints/ directory")
    step = latest_step(run_dir) if step is None else step
    if step is None:
        raise CheckpointError(f"no complete checkpoint under {directory}")
    path = directory / str(step) / PARAMS
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint item (steps: {complete_steps(run_dir)})")
    with ocp.StandardCheckpointer() as ckptr:
        return step, ckptr.restore(path, target)
