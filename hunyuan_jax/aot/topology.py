"""TPU slices you do not have: the chip table, Cloud TPU names -> topologies, the compile-only
devices of a slice (libtpu), and the default mesh of a slice for each mode.

Names: v5p-N, v4-N and tpu7x-N count TensorCores (2 per chip: v5p-256 = 128 chips, `v5:4x4x8`;
tpu7x-8 = one 4-chip TPU7x host, `tpu7x:2x2x1`, 8 devices: each TensorCore of a TPU7x is its
own device), v5e-N and v6e-N count chips. A topology can also be given as such (`v5p:4x4x12`,
`v6e:4x8`).
The platform and chip of a run are always read from the mesh's devices (`chip_of`), never from
`jax.devices()`.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re

from jax.experimental import topologies

from hunyuan_jax.errors import UsageError
from hunyuan_jax.model.config import ModelConfig
from sharding.layout import CP_CHUNK, CP_MIN_SEQ, context_parallel_layout  # noqa: F401 (re-exported)


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation. `hbm_gib`: what XLA:TPU lets a program use per chip (measured: the
    capacity its out-of-memory error names); peak bf16 FLOP/s and HBM bandwidth per chip.
    `ici_bytes_per_s`: the chip's inter-chip interconnect bandwidth over all its links, as the
    Cloud TPU system-architecture pages state it (v5p 4800 Gbps, v6e 3584 Gbps, v5e 1600 Gbps;
    v4's page gives only the pod's all-reduce bandwidth: 1.1 PB/s over 4096 chips, the way
    v5e's 51.2 TB/s over 256 chips gives its 1600 Gbps); `ici_links`: its ICI links (torus
    ports: 6 in 3D, 4 in 2D)."""

    name: str
    topology_prefix: str  # as get_topology_desc spells it
    device_kinds: tuple[str, ...]  # Device.device_kind values
    hbm_gib: float
    peak_flops: float
    hbm_bytes_per_s: float
    cores_per_chip: int  # the number in a Cloud TPU name counts TensorCores on v4 / v5p
    chip_config_name: str | None
    dims: int  # torus dimensions (3 on v4 / v5p, 2 on v5e / v6e)
    ici_bytes_per_s: float
    ici_links: int
    mxu: int = 128  # the matrix unit's side: 128x128 systolic arrays, 256x256 on v6e


CHIPS: dict[str, Chip] = {
    "v4": Chip(
        "v4", "v4", ("TPU v4",), 30.75, 275e12, 1.228e12, 2, "megacore", 3, 1.1e15 / 4096, 6
    ),
    "v5p": Chip(
        "v5p", "v5", ("TPU v5", "TPU v5p"), 95.73, 459e12, 2.765e12, 2, "megacore", 3, 4800e9 / 8, 6
    ),
    "v5e": Chip(
        "v5e", "v5e", ("TPU v5 lite", "TPU v5e"), 15.75, 197e12, 0.819e12, 1, None, 2, 1600e9 / 8, 4
    ),
    "v6e": Chip(
        "v6e",
        "v6e",
        ("TPU v6 lite", "TPU v6e"),
        31.24,
        918e12,
        1.640e12,
        1,
        None,
        2,
        3584e9 / 8,
        4,
        256,
    ),
    # TPU7x (Ironwood): two TensorCore chiplets per chip, each its own JAX device with half the
    # chip's 192 GiB, 2307 TFLOP/s (bf16; 4614 fp8) and 7.38 TB/s (Cloud TPU's TPU7x page);
    # these figures are per device, the unit every program and this table count. 94.74 GiB:
    # the capacity libtpu 0.0.52's out-of-memory error names for tpu7x:2x2x1. ICI: the chip's
    # 1200 GB/s bidirectional, halved per direction and per chiplet.
    "tpu7x": Chip(
        "tpu7x", "tpu7x", ("TPU7x",), 94.74, 2307e12 / 2, 7.38e12 / 2, 2, None, 3, 300e9, 6, 256
    ),
}
_ALIASES = {
    "v5": "v5p",
    "v5litepod": "v5e",
    "v5lite": "v5e",
    "v6": "v6e",
    "trillium": "v6e",
    "v7x": "tpu7x",
    "ironwood": "tpu7x",
}


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

    @property
    def description(self) -> str:
        return self.topology + (f" x {self.num_slices} slices" if self.num_slices > 1 else "")


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The usual Cloud TPU shape of a power-of-two slice: v5p/v4 4 chips 2x2x1, 8 2x2x2,
    16 2x2x4, 32 2x4x4, 64 4x4x4, 128 4x4x8, 256 4x8x8, ...; v5e/v6e 4 2x2, 8 2x4, 16 4x4,
    32 4x8, 64 8x8, 128 8x16, 256 16x16."""
    if chips < 1 or chips & (chips - 1):
        raise UsageError(
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


def _chip(generation: str, text: str) -> Chip:
    gen = _ALIASES.get(generation, generation)
    if gen not in CHIPS:
        raise UsageError(
            f"--topology {text!r}: unknown TPU generation {generation!r}; known: {sorted(CHIPS)}"
        )
    return CHIPS[gen]


def parse_topology(text: str, num_slices: int = 1) -> Slice:
    """'v5p-256' (Cloud TPU name: TensorCores on v4/v5p, chips on v5e/v6e), 'v5p:4x4x8' or
    'v5:4x4x8' (topology), 'v6e-32', 'v5litepod-64', 'v4-128'. UsageError otherwise."""
    if num_slices < 1:
        raise UsageError(f"--slices must be >= 1, got {num_slices}")
    t = text.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+?)(?:pod)?-(\d+)", t)
    if m:
        chip, n = _chip(m.group(1), text), int(m.group(2))
        if n % chip.cores_per_chip:
            raise UsageError(
                f"--topology {text}: {chip.name} names count TensorCores ({chip.cores_per_chip} "
                f"per chip), so the number must be a multiple of {chip.cores_per_chip}"
            )
        shape = torus_shape(n // chip.cores_per_chip, chip.dims)
    else:
        m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", t)
        if not m:
            raise UsageError(
                f"--topology {text!r}: expected a Cloud TPU name like v5p-256, "
                f"v6e-32, v5e-64, v4-128, a topology like v5p:4x4x8 / v6e:4x8, or 'local'"
            )
        chip = _chip(m.group(1), text)
        shape = tuple(int(s) for s in m.group(2).split("x"))
        if len(shape) != chip.dims:
            raise UsageError(
                f"--topology {text}: a {chip.name} topology has {chip.dims} dimensions"
            )
    topology = f"{chip.topology_prefix}:{'x'.join(map(str, shape))}"
    return Slice(text, chip, topology, shape, num_slices)


def _has_tpu_hardware() -> bool:
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def quiet_libtpu(topology: str, num_slices: int = 1) -> None:
    """Before libtpu loads (the AOT entry point): on a host without TPU chips, libtpu looks for
    the TPU VM it would drive and prints "Failed to find host bounds", "could not determine TPU
    accelerator type" and an `E0000 ... unexpected worker hostname` error on stderr, harmless
    and not silenced by its log-level variables (TPU_STDERR_LOG_LEVEL, TPU_MIN_LOG_LEVEL act
    after its logging starts). It is silent when the environment names the accelerator and the
    worker, as a single-host TPU VM's does: TPU_ACCELERATOR_TYPE (the --topology's Cloud TPU
    name) and TPU_WORKER_HOSTNAMES=localhost. Only values the user has not set, and never on
    a host with TPU chips; compile-only devices do not depend on them (measured: the same
    devices for v6e-32 and v5p-256 with TPU_ACCELERATOR_TYPE=v5p-8)."""
    if _has_tpu_hardware():
        return
    try:
        name = parse_topology(topology, num_slices).cloud_name
    except UsageError:
        return  # 'local', or a name the tool will refuse with its own message
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", name)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def topology_devices(sl: Slice) -> list:
    """Compile-only devices of the slice (needs libtpu; no TPU needed).

    libtpu takes /tmp/libtpu_lockfile so that two processes never drive the same chips; any
    JAX process started without JAX_PLATFORMS=cpu on a host with libtpu installed holds it.
    On a host without TPU chips nothing is driven, so concurrent loads are allowed
    (ALLOW_MULTIPLE_LIBTPU_LOAD=1) unless the environment says otherwise."""
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
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"cannot describe TPU topology {sl.topology} ({first}); ahead-of-time TPU "
            f"compiles need libtpu: pip install libtpu==0.0.52"
        ) from e
    return list(desc.devices)


def chip_of(devices) -> Chip | None:
    """The Chip of a mesh's devices (None for CPU / GPU / unknown kinds)."""
    d = devices[0]
    if d.platform != "tpu":
        return None
    for chip in CHIPS.values():
        if d.device_kind in chip.device_kinds:
            return chip
    return None


def default_mesh(mode: str, cfg: ModelConfig, chips: int) -> str:
    """ICI sizes for `chips` chips of one slice. train: FSDP x expert parallelism (experts over
    `expert`, everything else over fsdp x expert); serving: tensor parallelism over KV heads
    (at most 8) x experts. Several slices add dcn.data (the caller)."""
    if mode == "train":
        return f"fsdp=-1,expert={math.gcd(cfg.num_experts, chips)}"
    tensor = math.gcd(cfg.num_kv_heads, chips)
    rest = chips // tensor
    expert = math.gcd(cfg.num_experts, rest)
    return f"fsdp={rest // expert},expert={expert},tensor={tensor}"


def default_rules(mode: str) -> str:
    return "fsdp_ep" if mode == "train" else "serve_ep_tp"
