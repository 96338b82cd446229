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

Decoding loads a trained model with `restore_params(run_dir, mesh, rules)`.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
import yaml
from flax import nnx

from hunyuan_jax.config import ModelConfig

PARAMS, OPT_STATE, DATA = "params", "opt_state", "data"


# ----------------------------------------------------------------------------- run files
def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir).resolve() / "checkpoints"


def write_run_config(run_dir: str | Path, mcfg: ModelConfig, tcfg=None) -> Path:
    """<run>/config.yaml with the resolved model (and train) sections (process 0 writes)."""
    path = Path(run_dir) / "config.yaml"
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"model": dataclasses.asdict(mcfg)}
        if tcfg is not None:
            data["train"] = dataclasses.asdict(tcfg)
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
        tmp.replace(path)
    return path


def read_run_config(run_dir: str | Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, train section as a dict) of a run directory."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: no config.yaml")
    data = yaml.safe_load(path.read_text()) or {}
    return ModelConfig.from_dict(data["model"], str(path)), dict(data.get("train") or {})


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


def latest_step(run_dir: str | Path) -> int | None:
    """The last complete checkpoint step of a run (None if none)."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return None
    with ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0),
    ) as mgr:
        return mgr.latest_step()


def restore_params(
    run_dir: str | Path, mesh=None, rules=None, step: int | None = None, **model_overrides
) -> tuple[ModelConfig, nnx.Module]:
    """The trained model of a run directory: (ModelConfig from <run>/config.yaml, model with
    the params of checkpoint `step` (default: the latest complete one)).

    With `mesh` and `rules` the parameters are restored directly into the rules' shardings;
    without, onto the default device. `model_overrides` replace ModelConfig fields that do not
    change the parameter tree (e.g. compute_dtype="bfloat16", remat="none").
    """
    from hunyuan_jax.state import abstract_model
    from sharding.rules import get_rules, state_shardings

    run_dir = Path(run_dir)
    mcfg, _ = read_run_config(run_dir)
    if model_overrides:
        mcfg = mcfg.replace(**model_overrides)
    directory = checkpoint_dir(run_dir)
    with ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0),
    ) as mgr:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint under {directory}")
        if rules is not None:
            rules = get_rules(rules)
        graphdef, abstract = nnx.split(abstract_model(mcfg, rules if mesh is not None else None))
        if mesh is not None:
            if rules is None:
                raise ValueError("restore_params: a mesh needs rules")
            shardings = state_shardings(abstract, rules, mesh)
        else:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: device, abstract)
        target = with_shardings(abstract, shardings)
        out = mgr.restore(
            step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)})
        )
    return mcfg, nnx.merge(graphdef, out[PARAMS])
