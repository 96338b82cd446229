"""Train or fine-tune Hunyuan-Large (continued pre-training or SFT), or resume a run.

    python train.py --config configs/tiny.yaml [--set key=value ...] [--init-from DIR]

Multi-host: the same command on every host (Cloud TPU pods, SLURM, MPI, JobSet are detected; or
`--coordinator/--num-processes/--process-id`, see hunyuan_jax.distributed).

`--set` overrides keys of the config's `train:` section (`steps=200`, `mesh=data=2,expert=4`)
or, prefixed `model.`, of its `model:` section (`model.hidden_dropout=0.2`). A run directory
that already holds checkpoints is resumed from its last complete one. `--devices N` simulates N
CPU devices (set before JAX starts). Exit status: 0 done, 1 stopped on a non-finite loss.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Simulated devices must be configured before JAX is imported.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--devices", type=int, default=None)
    devices = pre.parse_known_args(argv)[0].devices
    if devices:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
        )
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hunyuan_jax import distributed

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="YAML with model: and train: sections")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a train key, or model.KEY for the model section",
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
    distributed.add_arguments(ap)
    args = ap.parse_args(argv)

    distributed.initialize_from_args(args)  # multi-host: before JAX touches devices
    from hunyuan_jax.errors import NonFiniteLoss
    from hunyuan_jax.train_config import load_configs
    from hunyuan_jax.train_loop import train

    changes = {}
    if args.init_from:
        changes["init_from"] = args.init_from
    if args.run_dir:
        changes["run_dir"] = args.run_dir
    mcfg, policy, tcfg = load_configs(args.config, args.overrides, **changes)
    try:
        summary = train(mcfg, policy, tcfg)
    except NonFiniteLoss as e:
        print(f"[train] STOPPED: {e}", file=sys.stderr)
        return 1
    losses = summary["losses"]
    if losses:
        print(
            f"[train] steps {summary['start_step']} -> {summary['end_step']}: loss "
            f"{losses[0]:.4f} -> {losses[-1]:.4f}; run dir {tcfg.run_dir}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
