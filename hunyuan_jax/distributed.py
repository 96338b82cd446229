"""Multi-host start-up: `jax.distributed.initialize` from the environment, plus helpers to see
which part of a global array (e.g. the batch) this host feeds.

Call `initialize()` first thing in a program, before anything touches JAX devices:

    from hunyuan_jax import distributed
    distributed.initialize()          # no-op on one host; automatic on Cloud TPU pods

or launch any script through it (same command on every host):

    python -m hunyuan_jax.distributed train.py --config ... [--set ...]
    python -m hunyuan_jax.distributed --coordinator 10.0.0.2:8476 --num-processes 4 \
        --process-id 1 -- train.py --config ...

Where the settings come from, first match wins:

1. Arguments: `initialize(coordinator_address="10.0.0.2:8476", num_processes=4, process_id=1)`
   (or `--coordinator/--num-processes/--process-id` through `add_arguments` and
   `initialize_from_args`).
2. Environment (any cluster: a launcher exports these for each process):
   `HUNYUAN_COORDINATOR` (host:port of process 0), `HUNYUAN_NUM_PROCESSES`, `HUNYUAN_PROCESS_ID`,
   optional `HUNYUAN_LOCAL_DEVICE_IDS` ("0,1,2,3"). JAX's own `JAX_COORDINATOR_ADDRESS`,
   `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` are read as well.
3. Auto-detection, handed to JAX's cluster plugins (`jax.distributed.initialize()` without
   arguments): Cloud TPU VMs of a multi-host slice (every worker runs the same command; the
   TPU metadata gives the coordinator, count and id), SLURM (`srun`), Open MPI (`mpirun`),
   Kubernetes JobSet / GKE TPU. Used when one of these reports more than one process.
4. Otherwise: one process, nothing to initialise.

On CPU (tests, `JAX_PLATFORMS=cpu`) cross-process collectives need an implementation: gloo is
selected (`jax_cpu_collectives_implementation`) unless `HUNYUAN_CPU_COLLECTIVES` says otherwise.

Per-host data: `hunyuan_jax.data.corpus` already shards documents by process (document i to host
i % count) and assembles the global batch with `jax.make_array_from_process_local_data`;
`process_rows` tells which rows of a global batch this host's devices hold (for loaders that
read a shared, indexable dataset instead).
"""

from __future__ import annotations

import argparse
import logging
import os
import runpy
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import jax
from jax._src import distributed as _d

logger = logging.getLogger(__name__)

_ENV = {
    "coordinator_address": ("HUNYUAN_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("HUNYUAN_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("HUNYUAN_PROCESS_ID", "JAX_PROCESS_ID"),
    "local_device_ids": ("HUNYUAN_LOCAL_DEVICE_IDS", "JAX_LOCAL_DEVICE_IDS"),
}


@dataclass(frozen=True)
class DistributedConfig:
    """What `initialize` decided (and did)."""

    mode: str  # 'explicit', 'auto', 'single'
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    source: str = ""


def _env(name: str) -> str | None:
    for var in _ENV[name]:
        value = os.environ.get(var)
        if value not in (None, ""):
            return value
    return None


def _int(value, what: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"distributed: {what} must be an integer, got {value!r}") from None


def _ids(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    return tuple(_int(v, "local device id") for v in value)


def _cluster_processes() -> tuple[str, int] | None:
    """(which cluster, process count) when an auto-detectable cluster reports several
    processes; None otherwise."""
    env = os.environ
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts:  # Cloud TPU VM of a multi-host slice (set on every worker)
        return "Cloud TPU (TPU_WORKER_HOSTNAMES)", len(hosts.split(","))
    if env.get("MEGASCALE_NUM_SLICES", "1") not in ("", "1"):
        return "Cloud TPU multislice (MEGASCALE_*)", -1
    for var, name in (
        ("SLURM_NTASKS", "SLURM"),
        ("OMPI_COMM_WORLD_SIZE", "Open MPI"),
        ("PMI_SIZE", "PMI/MPICH"),
    ):
        n = env.get(var)
        if n and n.isdigit() and int(n) > 1:
            return f"{name} ({var}={n})", int(n)
    if env.get("JOBSET_NAME") or env.get("TPU_WORKER_ID") not in (None, "", "0") and hosts:
        return "Kubernetes JobSet / GKE TPU", -1
    return None


def resolve(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | str | None = None,
) -> DistributedConfig:
    """Decides how to initialise (see the module docstring) without doing it."""
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
        "local_device_ids": local_device_ids,
    }
    source = "arguments" if any(v is not None for v in given.values()) else ""
    values = {k: v if v is not None else _env(k) for k, v in given.items()}
    if not source and any(v is not None for v in values.values()):
        source = "environment"
    address = values["coordinator_address"]
    count = _int(values["num_processes"], "num_processes")
    pid = _int(values["process_id"], "process_id")
    ids = _ids(values["local_device_ids"])
    if address is not None or count is not None or pid is not None:
        missing = [
            n
            for n, v in (
                ("coordinator address", address),
                ("number of processes", count),
                ("process id", pid),
            )
            if v is None
        ]
        if missing:
            raise ValueError(
                f"distributed ({source}): a cluster without auto-detection needs the coordinator "
                f"address, the number of processes and this process's id; missing: "
                f"{', '.join(missing)} (set HUNYUAN_COORDINATOR=host:port, "
                f"HUNYUAN_NUM_PROCESSES=N, HUNYUAN_PROCESS_ID=i)"
            )
        if count < 1 or not 0 <= pid < count:
            raise ValueError(
                f"distributed ({source}): process id {pid} is not in [0, {count}) processes"
            )
        if ":" not in address:
            raise ValueError(
                f"distributed ({source}): coordinator address {address!r} must "
                f"be host:port (port of process 0, e.g. 8476)"
            )
        return DistributedConfig("explicit", address, count, pid, ids, source)
    cluster = _cluster_processes()
    if cluster is not None:
        name, n = cluster
        return DistributedConfig("auto", None, n if n > 0 else None, None, ids, name)
    return DistributedConfig("single", source="one process")


_INITIALISED: DistributedConfig | None = None


def _is_initialized() -> bool:
    fn = getattr(jax.distributed, "is_initialized", None)
    if fn is not None:
        return bool(fn())

    return _d.global_state.client is not None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | str | None = None,
    *,
    cpu_collectives: str | None = None,
    initialization_timeout: int | None = None,
) -> DistributedConfig:
    """Initialises JAX's multi-process runtime as the arguments / environment / cluster say
    (module docstring); returns what was decided. Safe to call twice; a no-op on one host."""
    global _INITIALISED
    if _INITIALISED is not None:
        return _INITIALISED
    cfg = resolve(coordinator_address, num_processes, process_id, local_device_ids)
    if cfg.mode == "single":
        _INITIALISED = cfg
        return cfg
    if _is_initialized():
        logger.info("distributed: JAX was already initialised elsewhere")
        _INITIALISED = cfg
        return cfg
    impl = cpu_collectives or os.environ.get("HUNYUAN_CPU_COLLECTIVES", "gloo")
    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    if impl and impl != "none" and (platforms.startswith("cpu") or cfg.mode == "explicit"):
        # Only affects the CPU backend; harmless where TPU/GPU devices do the work.
        jax.config.update("jax_cpu_collectives_implementation", impl)
    kwargs = {}
    if initialization_timeout is not None:
        kwargs["initialization_timeout"] = initialization_timeout
    if cfg.local_device_ids is not None:
        kwargs["local_device_ids"] = list(cfg.local_device_ids)
    if cfg.mode == "explicit":
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
            **kwargs,
        )
    else:
        jax.distributed.initialize(**kwargs)
    cfg = DistributedConfig(
        cfg.mode,
        cfg.coordinator_address,
        jax.process_count(),
        jax.process_index(),
        cfg.local_device_ids,
        cfg.source,
    )
    logger.info(
        "distributed: process %d of %d (%s, %s)",
        cfg.process_id,
        cfg.num_processes,
        cfg.mode,
        cfg.source,
    )
    _INITIALISED = cfg
    return cfg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--coordinator / --num-processes / --process-id (override the environment)."""
    g = parser.add_argument_group("multi-host (default: from the environment / cluster)")
    g.add_argument("--coordinator", default=None, help="host:port of process 0")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)


def initialize_from_args(args: argparse.Namespace) -> DistributedConfig:
    return initialize(
        getattr(args, "coordinator", None),
        getattr(args, "num_processes", None),
        getattr(args, "process_id", None),
    )


# ----------------------------------------------------------------------------- per-host data
def process_rows(
    sharding: jax.sharding.Sharding, global_shape: Sequence[int], axis: int = 0
) -> tuple[int, int]:
    """[start, stop) along `axis` of a global array that this process's devices hold under
    `sharding` (contiguous for the meshes `build_mesh` makes). The rows a host must load."""
    index_map = sharding.addressable_devices_indices_map(tuple(global_shape))
    starts, stops = [], []
    for index in index_map.values():
        s = index[axis] if index is not None and len(index) > axis else slice(None)
        start, stop, _ = s.indices(global_shape[axis])
        starts.append(start)
        stops.append(stop)
    start, stop = min(starts), max(stops)
    covered = set()
    for a, b in zip(starts, stops):
        covered.update(range(a, b))
    if len(covered) != stop - start:
        raise ValueError(
            f"this process's devices hold non-contiguous rows of axis {axis} "
            f"under {sharding}; load rows {sorted(covered)} explicitly"
        )
    return start, stop


def host_local_to_global(local, sharding: jax.sharding.Sharding, global_shape: Sequence[int]):
    """This host's rows (numpy, exactly `process_rows` of the global array) -> a global
    jax.Array (thin wrapper of jax.make_array_from_process_local_data)."""
    return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))


def summary() -> str:
    """One line for logs: process i of n, local/global devices, platform."""
    local = jax.local_devices()
    return (
        f"process {jax.process_index()} of {jax.process_count()}: {len(local)} local / "
        f"{jax.device_count()} global {local[0].platform} devices"
    )


def main(argv=None) -> int:
    """`python -m hunyuan_jax.distributed [options] [--] SCRIPT [ARGS...]`: initialise, then run
    SCRIPT as __main__ with ARGS (its exit status is ours)."""
    ap = argparse.ArgumentParser(
        prog="python -m hunyuan_jax.distributed",
        description="Initialise JAX's multi-process runtime (from the "
        "environment, a cluster or these options), then "
        "run a script, e.g. train.py, in this process.",
    )
    add_arguments(ap)
    ap.add_argument("script", help="Python script to run after initialising (train.py, ...)")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = initialize_from_args(a)
    if cfg.mode != "single":
        print(f"[distributed] {summary()} ({cfg.mode}: {cfg.source})", file=sys.stderr, flush=True)
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    sys.argv = [a.script, *args]
    try:
        runpy.run_path(a.script, run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
