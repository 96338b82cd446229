"""Device meshes: the four mesh axes, `MeshConfig` (ICI / DCN sizes) and `build_mesh`.

This module owns the mapping from a mesh configuration (sizes per axis within a slice (ICI) and
across slices (DCN)) to a `jax.sharding.Mesh` over any list of devices: `jax.devices()`, or the
compile-only devices of `jax.experimental.topologies` for ahead-of-time TPU compiles. Every axis is
`AxisType.Auto` (GSPMD propagation plus `with_sharding_constraint`). What each axis shards is
decided in `sharding/rules.py`, not here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

logger = logging.getLogger(__name__)

# Ordered by increasing network intensity (the mesh_utils convention): 'tensor' gets the best links.
MESH_AXES: tuple[str, ...] = ("data", "fsdp", "expert", "tensor")

SizesLike = Mapping[str, int] | Sequence[int] | None


def _sizes(value: SizesLike, what: str, *, allow_auto: bool) -> tuple[int, ...]:
    """Normalises a dict {axis: size} (missing axes are 1) or a 4-sequence into a tuple of ints."""
    if value is None:
        return (1,) * len(MESH_AXES)
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in MESH_AXES]
        if unknown:
            raise ValueError(
                f"{what}: unknown mesh axis name(s) {unknown}; known axes are {list(MESH_AXES)}"
            )
        raw = [value.get(a, 1) for a in MESH_AXES]
    else:
        raw = list(value)
        if len(raw) != len(MESH_AXES):
            raise ValueError(
                f"{what}: expected {len(MESH_AXES)} sizes, one per axis {list(MESH_AXES)}, got {raw}"
            )
    out = []
    for axis, s in zip(MESH_AXES, raw):
        try:
            si = int(s)
            if si != s and not isinstance(s, str):
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(
                f"{what}: size of axis {axis!r} must be an integer, got {s!r}"
            ) from None
        if si == -1 and allow_auto:
            pass
        elif si <= 0:
            extra = " (-1, auto-fill, is allowed once in ici)" if allow_auto else ""
            raise ValueError(f"{what}: size of axis {axis!r} must be positive{extra}, got {si}")
        out.append(si)
    autos = [a for a, s in zip(MESH_AXES, out) if s == -1]
    if len(autos) > 1:
        raise ValueError(
            f"{what}: at most one axis may be -1 (auto-filled), got -1 for axes {autos}"
        )
    return tuple(out)


def _fmt(sizes: Sequence[int]) -> str:
    return ",".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh sizes per axis of `MESH_AXES`.

    ici: sizes within one slice (dict {axis: size}, missing axes are 1, or a 4-tuple); one -1 is
      auto-filled so that the product equals the number of devices per slice.
    dcn: sizes across slices (default all 1; no -1). The mesh axis size is ici * dcn.
    allow_split_physical_axes: when an ICI axis size is not a product of whole physical torus
      axes (e.g. expert=16 on v5p 4x8x8), first try without splitting, then split physical axes
      (True) or raise (False).
    """

    ici: Any = None
    dcn: Any = None
    allow_split_physical_axes: bool = True

    def __post_init__(self):
        object.__setattr__(self, "ici", _sizes(self.ici, "mesh ici", allow_auto=True))
        object.__setattr__(self, "dcn", _sizes(self.dcn, "mesh dcn", allow_auto=False))

    # ----- construction -----
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MeshConfig:
        """From e.g. YAML `{ici: {data: 1, fsdp: -1, expert: 4, tensor: 1}, dcn: {data: 2}}`.

        A flat dict of axis sizes ({fsdp: -1, expert: 4}) is read as `ici`.
        """
        if isinstance(d, MeshConfig):
            return d
        d = dict(d)
        if not ({"ici", "dcn"} & d.keys()) and all(k in MESH_AXES for k in d):
            return cls(ici=d)
        known = ("ici", "dcn", "allow_split_physical_axes")
        unknown = [k for k in d if k not in known]
        if unknown:
            raise ValueError(
                f"mesh config: unknown key(s) {unknown}; known keys are {list(known)} "
                f"(or a flat dict of axis sizes over {list(MESH_AXES)})"
            )
        return cls(
            ici=d.get("ici"),
            dcn=d.get("dcn"),
            allow_split_physical_axes=bool(d.get("allow_split_physical_axes", True)),
        )

    @classmethod
    def parse(cls, s: str) -> MeshConfig:
        """From a CLI string "data=2,fsdp=-1,expert=4,tensor=1"; DCN sizes as "dcn.data=2"."""
        ici: dict[str, int] = {}
        dcn: dict[str, int] = {}
        for item in (t.strip() for t in s.split(",")):
            if not item:
                continue
            if "=" not in item:
                raise ValueError(f"mesh string {s!r}: item {item!r} is not of the form axis=size")
            key, val = (t.strip() for t in item.split("=", 1))
            target = ici
            if key.startswith(("dcn.", "dcn:")):
                key, target = key[4:], dcn
            elif key.startswith(("ici.", "ici:")):
                key = key[4:]
            if key not in MESH_AXES:
                raise ValueError(
                    f"mesh string {s!r}: unknown mesh axis name {key!r}; known axes are "
                    f'{list(MESH_AXES)} (prefix "dcn." for sizes across slices)'
                )
            if key in target:
                raise ValueError(f"mesh string {s!r}: axis {key!r} given twice")
            try:
                target[key] = int(val)
            except ValueError:
                raise ValueError(
                    f"mesh string {s!r}: size of axis {key!r} must be an integer, got {val!r}"
                ) from None
        return cls(ici=ici, dcn=dcn)

    from_string = parse

    @classmethod
    def coerce(cls, cfg: MeshConfig | str | Mapping[str, Any]) -> MeshConfig:
        if isinstance(cfg, MeshConfig):
            return cfg
        if isinstance(cfg, str):
            return cls.parse(cfg)
        if isinstance(cfg, Mapping):
            return cls.from_dict(cfg)
        raise TypeError(f"cannot make a MeshConfig from {type(cfg).__name__}: {cfg!r}")

    # ----- arithmetic -----
    @property
    def num_slices(self) -> int:
        return math.prod(self.dcn)

    @property
    def is_multi_slice(self) -> bool:
        return self.num_slices > 1

    def resolve(self, num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Returns (ici, dcn) sizes with the -1 filled in, for `num_devices` devices in all."""
        nslices = self.num_slices
        if num_devices % nslices:
            raise ValueError(
                f"mesh: {num_devices} devices cannot be split into {nslices} slices "
                f"(dcn {_fmt(self.dcn)})"
            )
        per_slice = num_devices // nslices
        ici = list(self.ici)
        if -1 in ici:
            i = ici.index(-1)
            known = math.prod(s for s in ici if s != -1)
            if per_slice % known:
                raise ValueError(
                    f"mesh: cannot auto-fill {MESH_AXES[i]}=-1: the other ici sizes ({_fmt(self.ici)}, "
                    f"product {known}) do not divide the {per_slice} devices per slice "
                    f"({num_devices} devices, {nslices} slice(s))"
                )
            ici[i] = per_slice // known
        elif math.prod(ici) != per_slice:
            raise ValueError(
                f"mesh: product of ici sizes ({_fmt(ici)}) is {math.prod(ici)}, but there are "
                f"{per_slice} devices per slice ({num_devices} devices, {nslices} slice(s), "
                f"dcn {_fmt(self.dcn)})"
            )
        return tuple(ici), self.dcn

    def axis_sizes(self, num_devices: int) -> dict[str, int]:
        """The mesh's size per axis (ici * dcn) for `num_devices` devices."""
        ici, dcn = self.resolve(num_devices)
        return {a: i * d for a, i, d in zip(MESH_AXES, ici, dcn)}

    def __str__(self) -> str:
        s = _fmt(self.ici)
        if self.is_multi_slice:
            s += "," + ",".join(f"dcn.{a}={d}" for a, d in zip(MESH_AXES, self.dcn) if d != 1)
        return s


def _object_array(devices: Sequence[Any]) -> np.ndarray:
    arr = np.empty(len(devices), dtype=object)
    for i, d in enumerate(devices):
        arr[i] = d
    return arr


def _slice_device_array(
    shape: tuple[int, ...], devices: Sequence[Any], allow_split: bool
) -> np.ndarray:
    """Topology-aware device array for one slice; plain reshape where there is no topology."""
    try:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=False)
    except NotImplementedError as e:  # an axis is not a product of whole physical axes
        if not allow_split:
            raise ValueError(
                f"mesh: ici sizes {_fmt(shape)} do not map onto whole physical axes of "
                f"this slice and allow_split_physical_axes is False: {e}"
            ) from e
        logger.info("mesh: ici sizes %s need split physical axes", _fmt(shape))
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (AttributeError, AssertionError, KeyError, TypeError) as e:
        # Devices without a usable physical topology (no coords, holes, stub devices).
        if getattr(devices[0], "platform", None) == "tpu":
            logger.warning("mesh: no physical TPU topology (%s); using device order as is", e)
        return _object_array(devices).reshape(shape)


def _device_array(
    ici: tuple[int, ...], dcn: tuple[int, ...], devices: Sequence[Any], allow_split: bool
) -> np.ndarray:
    nslices = math.prod(dcn)
    has_slices = hasattr(devices[0], "slice_index")
    slice_ids = sorted({d.slice_index for d in devices}) if has_slices else [0]
    if nslices == 1:
        if len(slice_ids) > 1:
            raise ValueError(
                f"mesh: the devices span {len(slice_ids)} slices (slice_index {slice_ids}) but dcn "
                f"sizes are all 1; set dcn, e.g. dcn.data={len(slice_ids)}"
            )
        return _slice_device_array(ici, devices, allow_split)

    if has_slices:
        if len(slice_ids) != nslices:
            raise ValueError(
                f"mesh: dcn sizes ({_fmt(dcn)}) ask for {nslices} slices, but the devices span "
                f"{len(slice_ids)} slice(s) (slice_index {slice_ids})"
            )
        try:
            return mesh_utils.create_hybrid_device_mesh(
                ici, dcn, devices, allow_split_physical_axes=False
            )
        except NotImplementedError as e:
            if not allow_split:
                raise ValueError(
                    f"mesh: ici sizes {_fmt(ici)} do not map onto whole physical axes "
                    f"and allow_split_physical_axes is False: {e}"
                ) from e
            return mesh_utils.create_hybrid_device_mesh(
                ici, dcn, devices, allow_split_physical_axes=True
            )

    # No slice_index (e.g. CPU): consecutive groups of devices play the slices, assembled the way
    # create_hybrid_device_mesh does it (axis size = ici * dcn, slice-major within each axis).
    per = len(devices) // nslices
    blocks = [
        _slice_device_array(ici, devices[i * per : (i + 1) * per], allow_split)
        for i in range(nslices)
    ]
    granule = np.arange(nslices).reshape(dcn)
    tiled = np.vectorize(lambda i: blocks[i], otypes=[object])(granule)
    return np.block(tiled.tolist())


def build_mesh(
    cfg: MeshConfig | str | Mapping[str, Any], devices: Sequence[Any] | None = None
) -> Mesh:
    """A `Mesh` over MESH_AXES, all axes AxisType.Auto.

    devices: default `jax.devices()`; any list works (e.g. `topologies.get_topology_desc(...)
    .devices` for AOT compiles). Multi-slice (any dcn size > 1) groups devices by `slice_index`.
    """
    cfg = MeshConfig.coerce(cfg)
    if devices is None:
        devices = jax.devices()
    devices = list(devices)
    if not devices:
        raise ValueError("mesh: empty device list")
    ici, dcn = cfg.resolve(len(devices))
    arr = _device_array(ici, dcn, devices, cfg.allow_split_physical_axes)
    expected = tuple(i * d for i, d in zip(ici, dcn))
    assert arr.shape == expected, (arr.shape, expected)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
