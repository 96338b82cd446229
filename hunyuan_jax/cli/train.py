"""Train or fine-tune Hunyuan-Large (continued pre-training or SFT), or resume a run.

    python train.py --config configs/tiny.yaml --devices 8 [--set key=value ...] [--init-from DIR]

The YAML has a `model:` section (the architecture), a `runtime:` section (dtypes, remat,
attention kernel, dispatch, dropouts: hunyuan_jax/model/policy.py) and a `train:` section
(hunyuan_jax/train/config.py). `--set KEY=V` overrides a train key (`steps=200`,
`mesh=data=2,expert=4`), `--set model.KEY=V` a model key and `--set runtime.KEY=V` a runtime key
(`runtime.remat=full`); unknown keys are errors. The train section's mesh must fit the devices
(configs/tiny.yaml's needs 8: `--devices 8` on a CPU host). A config that sets neither `mesh`
nor `rules` gets context parallelism for `seq_len` above `cp_min_seq` (32768), the layout the AOT
tool picks (`sharding/layout.py`; a `layout:` line says so); `runtime.remat: auto` is chosen by
compiling the train step's ladder on TPU (`hunyuan_jax/train/remat_choice.py`; full remat on
CPU / GPU; a `remat:` line says which).

Multi-host: the same command on every host (Cloud TPU pods, SLURM, MPI, JobSet are detected; or
`--coordinator/--num-processes/--process-id`, see hunyuan_jax.distributed).

`--set objective=dpo --set data=prefs.jsonl` trains with DPO on preference pairs (docs/dpo.md);
`--set objective=grpo --set data=prompts.jsonl` with GRPO on rollouts from the engine (docs/rl.md).
A run from `--init-from` uses that checkpoint's tokenizer (one without a tokenizer needs
`--set tokenizer=PATH`); only a run from scratch trains a SentencePiece tokenizer on its data.
A run directory that already holds checkpoints is resumed from its last complete one.
`--devices N` simulates N CPU devices (set before JAX starts). Metrics go to
<run>/metrics.jsonl and to TensorBoard event files in <run>/tensorboard (`pip install
tensorboard` to view them: tensorboardX only writes them); `--profile-steps A:B` writes a
jax.profiler trace of steps A..B (1-based, inclusive) to <run>/profile (`tensorboard --logdir
<run>`, Profile tab, or XProf).

Exit status (`hunyuan_jax/errors.py`): 0 done; 2 bad command line or configuration; 3 bad
training data (file:line named); 4 checkpoint or run directory missing, corrupt or not
writable (disk full, permission denied), in use by another process (<run>/run.lock names it),
or no checkpoint of the run verifies; 5 stopped on a non-finite loss, or before saving
non-finite weights (the message names the last finite step and the newest healthy checkpoint);
1 a bug (traceback). Expected errors are one line on stderr; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hunyuan_jax.cli_help import HelpFormatter
from hunyuan_jax.errors import (
    CheckpointError,
    DataError,
    HunyuanError,
    UsageError,
    add_debug_flag,
    os_error,
    run_cli,
)
from hunyuan_jax.host_env import reexec_with_hugepage_malloc
from hunyuan_jax.train.config import TrainConfig, check_repeated_overrides, load_configs

# JAX and the package's heavy modules are imported inside the functions, not here: the entry
# point first re-executes itself (`entry`, hunyuan_jax/host_env.py) and, for --devices, sets
# XLA_FLAGS before JAX starts; an import at module level would run before both.

PROG = "train.py"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Simulated devices must be configured before JAX is imported.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--devices", type=int, default=None)
    pre.add_argument("--debug", action="store_true")
    known = pre.parse_known_args(argv)[0]
    devices = known.devices
    if devices:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
        )
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    return run_cli(PROG, lambda: _main(argv), debug=known.debug, oserror=CheckpointError)


def _main(argv) -> int:
    from hunyuan_jax import distributed

    ap = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=HelpFormatter,
    )
    ap.add_argument(
        "--config", required=True, help="YAML with model:, runtime: and train: sections"
    )
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a train key (KEY=V), a model key (model.KEY=V) or a runtime key "
        "(runtime.KEY=V); repeatable",
    )
    ap.add_argument(
        "--init-from",
        default=None,
        help="initial weights: a run dir, a converted or a Hugging Face checkpoint",
    )
    ap.add_argument("--run-dir", default=None, help="shorthand for --set run_dir=DIR")
    ap.add_argument(
        "--devices",
        type=int,
        default=None,
        help="simulate this many CPU devices (set before JAX starts)",
    )
    ap.add_argument(
        "--profile-steps",
        default=None,
        metavar="A:B",
        help="write a jax.profiler trace of steps A..B (inclusive) to <run>/profile",
    )
    distributed.add_arguments(ap)
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    profile_steps = parse_profile_steps(args.profile_steps)

    distributed.initialize_from_args(args)  # multi-host: before JAX touches devices
    from hunyuan_jax.engine.rollout import make_grpo_source
    from hunyuan_jax.train.loop import train
    from sharding.plan import ShardingPlan

    changes = {}
    if args.init_from:
        changes["init_from"] = args.init_from
    if args.run_dir:
        changes["run_dir"] = args.run_dir
    check_repeated_overrides(args.overrides, **changes)  # a repeated key: said, or refused
    mcfg, policy, tcfg = load_configs(args.config, args.overrides, **changes)
    tcfg = choose_layout(mcfg, tcfg)
    plan = ShardingPlan.create(tcfg.mesh, tcfg.rules)  # built here, as every entry point does
    preflight(mcfg, policy, tcfg, plan)
    run_dir = Path(tcfg.run_dir)
    new_run = not run_dir.exists()
    try:
        summary = train(
            mcfg, policy, tcfg, profile_steps=profile_steps, plan=plan,
            make_grpo_source=make_grpo_source,
        )  # fmt: skip
    except OSError as e:
        _remove_if_unused(run_dir, new_run)
        raise _io_error(e, tcfg) from e
    except HunyuanError:
        _remove_if_unused(run_dir, new_run)
        raise
    losses = summary["losses"]
    if losses:
        print(
            f"[train] steps {summary['start_step']} -> {summary['end_step']}: loss "
            f"{losses[0]:.4f} -> {losses[-1]:.4f}; run dir {tcfg.run_dir}"
        )
    return 0


def choose_layout(mcfg, tcfg):
    """The train config with the layout a long sequence needs (`sharding.layout`, the rule the
    AOT tool applies): when the config sets neither `mesh` nor `rules` and seq_len exceeds
    `cp_min_seq`, context parallelism over all devices; the `layout:` line says so."""
    import jax

    from hunyuan_jax.checkpoints.loading import open_checkpoint
    from sharding.layout import long_sequence_layout

    default = TrainConfig()
    if (tcfg.mesh, tcfg.rules) != (default.mesh, default.rules):
        return tcfg
    if tcfg.init_from:  # the run trains the checkpoint's architecture
        mcfg = open_checkpoint(tcfg.init_from).cfg
    how = "--set mesh=... / --set rules=..."
    long = long_sequence_layout(mcfg, jax.device_count(), tcfg.seq_len, tcfg.cp_min_seq, how)
    if long is None:
        return tcfg
    mesh, rules, note = long
    if jax.process_index() == 0:
        print(f"layout: {note}", flush=True)
    return tcfg.replace(mesh=mesh, rules=rules)


def preflight(mcfg, policy, tcfg, plan) -> None:
    """The checks that need neither data nor weights (`train.data.check_run`: seq_len, the mesh
    against the devices and the model), before the run directory is created."""
    from hunyuan_jax.checkpoints.loading import open_checkpoint
    from hunyuan_jax.train.data import check_run

    if tcfg.init_from:  # the run trains the checkpoint's architecture
        mcfg = open_checkpoint(tcfg.init_from).cfg
    check_run(mcfg, policy, tcfg, plan)


def _remove_if_unused(run_dir: Path, new_run: bool) -> None:
    """A run directory this invocation created and left without a single file (a start that
    failed) is removed, so that a failed start leaves nothing behind."""
    import jax

    if not new_run or jax.process_index() != 0 or not run_dir.is_dir():
        return
    if any(p.is_file() or p.is_symlink() for p in run_dir.rglob("*")):
        return
    for d in sorted(run_dir.rglob("*"), key=lambda p: -len(p.parts)):
        d.rmdir()
    run_dir.rmdir()


def parse_profile_steps(text: str | None) -> tuple[int, int] | None:
    """ "A:B" -> (A, B) with 1 <= A <= B; UsageError (exit 2) otherwise."""

    if text is None:
        return None
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise UsageError(f"--profile-steps must be A:B (two step numbers), got {text!r}") from None
    if not 1 <= a <= b:
        raise UsageError(f"--profile-steps A:B needs 1 <= A <= B, got {text!r}")
    return a, b


def _io_error(e: OSError, tcfg):
    """An OSError reading the training data is bad input data (3); anything else (the run
    directory, a checkpoint: disk full, permission denied) a checkpoint error (4)."""

    if isinstance(e, HunyuanError):
        return e
    if e.filename and tcfg.data:
        f, data = Path(e.filename).absolute(), Path(tcfg.data).absolute()
        if f == data or data in f.parents:
            return os_error(e, DataError)
    return os_error(e, CheckpointError)


def entry() -> int:
    """`hunyuan-train`, `python -m hunyuan_jax.cli.train`, `python train.py`: the start-up re-exec (before any work: glibc reads its
    tunables at start-up), then `main()`."""
    reexec_with_hugepage_malloc()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
