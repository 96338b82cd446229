"""The sharding plan: one frozen object holding the device mesh and the logical-axis rules.

Every program takes a `ShardingPlan` (never a loose `(mesh, rules)` pair): entry points build
it once from their flags (`ShardingPlan.from_flags`), and the model, the train step, the
generator, the loaders and the AOT tool ask it for shardings. It answers in logical names only:

    plan = ShardingPlan.create("data=2,expert=4", "fsdp_ep")
    plan.sharding(("batch", None), shape)        # NamedSharding for an input
    plan.constrain(x, ("batch", "length", "act_embed"))   # activation layout inside jit
    plan.state_shardings(abstract_state)         # parameters / optimizer state

Parameters must divide their mesh axes exactly. A mesh that does not fit is a `ConfigError`
(exit 2) raised here and nowhere else: at creation when its sizes do not fit the devices, and
from `check_state` / `state_shardings` when an axis does not divide a parameter (the message
names the axis, its size, the dimension and the sizes that would fit). Activations are
shape-aware: a mesh axis that does not divide the dimension is dropped (e.g. a batch of 2 on
data=2 x expert=4 is split over `data` only) instead of padded, so small batches never force
XLA into resharding copies. `ShardingPlan.single()` (no mesh) is one device: constraints are the
identity and arrays stay where JAX puts them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hunyuan_jax.errors import ConfigError
from sharding.mesh import MESH_AXES, MeshConfig, build_mesh
from sharding.rules import PARAM_AXES, MeshAxes, Rules, get_rules, logical_to_spec, rules_dict


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """A device mesh plus the rules mapping logical axis names onto its axes (or no mesh)."""

    mesh: Mesh | None
    rules: Rules
    label: str = ""

    # ----------------------------------------------------------------- construction
    @classmethod
    def create(
        cls,
        mesh: Mesh | MeshConfig | str | Mapping | None = None,
        rules: Rules | str = "fsdp",
        overrides: Mapping[str, MeshAxes] | None = None,
        devices: Sequence[Any] | None = None,
    ) -> ShardingPlan:
        """mesh: a Mesh, or a mesh description ("data=2,fsdp=-1", MeshConfig, dict) built over
        `devices` (default: all devices; a fully sized mesh smaller than a single process's
        devices uses the first ones). None gives the one-device plan. A bad description, an
        unknown preset or a mesh that does not fit the devices: ConfigError."""
        label = rules if isinstance(rules, str) else "custom"
        if overrides:
            label += " + " + ",".join(f"{k}={_fmt_axes(v)}" for k, v in overrides.items())
        try:
            table = get_rules(rules, overrides)
            if mesh is None:
                return cls(None, table, label)
            if not isinstance(mesh, Mesh):
                mesh = _build(MeshConfig.coerce(mesh), devices)
            rules_dict(table)  # validates
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return cls(mesh, table, label)

    @classmethod
    def single(cls, rules: Rules | str = "fsdp") -> ShardingPlan:
        """One device, no mesh: no constraints, default placement."""
        return cls.create(None, rules)

    @classmethod
    def or_single(cls, plan: ShardingPlan | None) -> ShardingPlan:
        """`plan`, or the one-device plan when it is None (what a function taking an optional
        plan uses)."""
        return cls.single() if plan is None else plan

    @classmethod
    def from_flags(
        cls,
        mesh: str | None,
        rules: str | None,
        rule_overrides: Sequence[str] = (),
        devices: Sequence[Any] | None = None,
        default_rules: str = "fsdp",
    ) -> ShardingPlan:
        """From command-line values: --mesh "data=2,tensor=4", --rules PRESET and repeated
        --rule LOGICAL=AXIS[+AXIS] overrides (`none` for replicated)."""
        return cls.create(
            mesh, rules or default_rules, parse_rule_overrides(rule_overrides), devices
        )

    # ----------------------------------------------------------------- queries
    @property
    def is_sharded(self) -> bool:
        return self.mesh is not None

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.devices.size

    @property
    def platform(self) -> str:
        if self.mesh is None:
            return jax.devices()[0].platform
        return self.mesh.devices.flat[0].platform

    @property
    def devices(self) -> list:
        return [jax.devices()[0]] if self.mesh is None else list(self.mesh.devices.flat)

    def mesh_axes(self, logical: str) -> tuple[str, ...]:
        """The mesh axes of size > 1 that `logical` is sharded over (empty: not sharded)."""
        if self.mesh is None:
            return ()
        table = rules_dict(self.rules)
        if logical not in table:
            raise ValueError(
                f"unknown logical axis name {logical!r}; the rules map {sorted(table)}"
            )
        return tuple(a for a in table[logical] if self.mesh.shape[a] > 1)

    def size(self, logical: str) -> int:
        """Number of shards of a dimension named `logical` (1 when not sharded)."""
        return math.prod(self.mesh.shape[a] for a in self.mesh_axes(logical))

    def shards(self, logical: str) -> bool:
        return self.size(logical) > 1

    def check_state(self, abstract_state) -> None:
        """ConfigError naming the mesh axis, its size, the first parameter dimension it does
        not divide and the sizes of that axis that fit every parameter (plus a whole mesh that
        does, where the devices can move to an axis no parameter uses)."""
        if self.mesh is None:
            return
        leaves = _param_leaves(abstract_state)
        sizes = dict(self.mesh.shape)
        bad = _first_misfit(self.rules, sizes, leaves)
        if bad is None:
            return
        name, lname, dim_size, axes = bad
        axis = axes[-1]  # the one to shrink (the activation layout drops axes from the right)
        fit = [
            s
            for s in range(1, sizes[axis] + 1)
            if sizes[axis] % s == 0
            and _first_misfit(self.rules, {**sizes, axis: s}, leaves) is None
        ]
        over = " x ".join(f"{a}={sizes[a]}" for a in axes)
        msg = (
            f"mesh {_fmt_sizes(sizes)} does not fit the model: {over} does not divide "
            f"{lname} (size {dim_size}, parameter {name!r}; rules {self.label})"
        )
        if fit:
            msg += f"; {axis} sizes that fit: {', '.join(map(str, fit))}"
            spare = _spare_axis(self.rules, sizes, axis)
            if spare is not None:
                alt = {**sizes, axis: fit[-1], spare: sizes[spare] * sizes[axis] // fit[-1]}
                if _first_misfit(self.rules, alt, leaves) is None:
                    msg += f" (e.g. mesh {_fmt_sizes(alt)})"
        else:
            msg += f"; no {axis} size fits: shard {lname} over other axes (--rules / --rule)"
        raise ConfigError(msg)

    def describe(self) -> str:
        if self.mesh is None:
            return "one device"
        live = {k: v for k, v in self.mesh.shape.items() if v > 1} or {"devices": 1}
        return f"mesh {live} rules {self.label}"

    # ----------------------------------------------------------------- specs and shardings
    def spec(
        self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None, name: str = ""
    ) -> P:
        """The PartitionSpec of a parameter-like array: every sharded dimension must divide
        its mesh axes (ValueError naming `name`)."""
        return logical_to_spec(logical_axes, self.rules, mesh=self.mesh, shape=shape, name=name)

    def activation_spec(self, logical_axes: Sequence[str | None], shape: Sequence[int]) -> P:
        """The PartitionSpec of an activation of `shape`: per dimension, mesh axes are dropped
        from the right until their product divides the dimension."""
        if self.mesh is None:
            return P()
        spec = logical_to_spec(logical_axes, self.rules, mesh=self.mesh)
        out = []
        for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            while axes and dim % math.prod(self.mesh.shape[a] for a in axes):
                axes = axes[:-1]
            out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return P(*out)

    def sharding(
        self,
        logical_axes: Sequence[str | None],
        shape: Sequence[int] | None = None,
        *,
        activation: bool = True,
    ) -> jax.sharding.Sharding:
        """NamedSharding of an input or output array (shape-aware unless activation=False)."""
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        if activation and shape is not None:
            return NamedSharding(self.mesh, self.activation_spec(logical_axes, shape))
        return NamedSharding(self.mesh, self.spec(logical_axes, shape))

    def replicated(self) -> jax.sharding.Sharding:
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return NamedSharding(self.mesh, P())

    def constrain(self, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
        """`with_sharding_constraint` to the activation layout of `logical_axes` (identity
        without a mesh). A wrong logical name fails even without a mesh."""
        if len(logical_axes) != x.ndim:
            raise ValueError(
                f"constrain: logical_axes {tuple(logical_axes)} has "
                f"{len(logical_axes)} names but the array has shape {x.shape}"
            )
        if self.mesh is None:
            logical_to_spec(logical_axes, self.rules)  # validates the names
            return x
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(self.mesh, self.activation_spec(logical_axes, x.shape))
        )

    def gather(
        self,
        x: jax.Array,
        logical_axes: Sequence[str | None],
        to: Mapping[str, str],
        cast=None,
    ) -> jax.Array:
        """A parameter `x` (laid out by `logical_axes`) as its use needs it: every dim whose
        name is a key of `to` brought from its parameter layout to the activation layout of
        the name it maps to (e.g. {"embed": "act_embed"}: the FSDP gather of a weight's hidden
        dim in training; nothing in serving, where the two agree). Only whole-dim gathers are
        made here; where none is needed, `cast(x)`.

        Forward: explicit all-gathers of the local shard inside `shard_map`, one mesh axis at
        a time, minor first (`cast`, an elementwise dtype cast, runs on the shard first, so
        the narrow dtype travels). XLA:TPU's all-gather decomposer turns an all-gather whose
        group is a whole multi-dimensional slice (embed over fsdp x expert = 64 chips) into an
        all-reduce of a zero-padded buffer, twice the bytes; over one axis's group it stays an
        all-gather (docs/tpu.md).
        Backward: the cotangent constrained to the parameter's own layout (GSPMD reduces it
        over the batch shards), returned in x's dtype."""
        cast = cast or (lambda a: a)
        if self.mesh is None:
            return cast(x)
        spec = tuple(self.spec(logical_axes, x.shape))
        spec += (None,) * (x.ndim - len(spec))
        out, gathers = list(spec), []
        for dim, (name, axes) in enumerate(zip(logical_axes, spec)):
            if name not in to or axes is None:
                continue
            want = self.activation_spec((to[name],), (x.shape[dim],))
            if tuple(want) in ((), (None,)):
                gathers.append((dim, (axes,) if isinstance(axes, str) else tuple(axes)))
                out[dim] = None
        if not gathers:
            return cast(x)

        def body(a):
            a = cast(a)
            for dim, axes in gathers:  # one mesh axis at a time, minor first
                for axis in reversed(axes):
                    a = jax.lax.all_gather(a, axis, axis=dim, tiled=True)
            return a

        gathered = jax.shard_map(
            body, mesh=self.mesh, in_specs=P(*spec), out_specs=P(*out), check_vma=False
        )
        layout = NamedSharding(self.mesh, P(*spec))

        @jax.custom_vjp
        def use(a):
            return gathered(a)

        def use_bwd(_, g):
            return (jax.lax.with_sharding_constraint(g, layout).astype(x.dtype),)

        use.defvjp(lambda a: (gathered(a), None), use_bwd)
        return use(x)

    def state_shardings(self, abstract_state):
        """For an nnx.State (Variables carrying `logical_axes` metadata, values arrays or
        ShapeDtypeStructs) or any pytree of them: the same structure with Shardings."""
        if self.mesh is None:
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            return jax.tree.map(lambda _: one, abstract_state)
        self.check_state(abstract_state)
        return _map_variables(
            abstract_state,
            lambda path, leaf: NamedSharding(self.mesh, _leaf_spec(path, leaf, self)),
        )

    def state_specs(self, abstract_state):
        """As `state_shardings`, with PartitionSpecs (mesh-independent where mesh is None)."""
        return _map_variables(abstract_state, lambda path, leaf: _leaf_spec(path, leaf, self))

    def abstract(self, tree, shardings=None):
        """ShapeDtypeStructs of `tree` carrying `shardings` (default: `state_shardings`)."""
        shardings = self.state_shardings(tree) if shardings is None else shardings
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
        )

    def unused_mesh_axes(self) -> list[str]:
        """Mesh axes of size > 1 that no rule uses (every device along them would hold and
        compute the same thing)."""
        if self.mesh is None:
            return []
        used = {a for axes in rules_dict(self.rules).values() for a in axes}
        return [a for a, s in self.mesh.shape.items() if s > 1 and a not in used]


# ----------------------------------------------------------------------------- helpers
def parse_rule_overrides(items: Sequence[str]) -> dict[str, MeshAxes]:
    """["cache_length=expert", "cache_batch=data+expert", "vocab=none"] -> overrides."""
    out: dict[str, MeshAxes] = {}
    for item in items:
        name, sep, axes = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--rule expects LOGICAL=AXIS[+AXIS], got {item!r}")
        parts = [a.strip() for a in axes.replace("+", ",").split(",")]
        parts = [a for a in parts if a and a != "none"]
        out[name.strip()] = None if not parts else parts[0] if len(parts) == 1 else tuple(parts)
    return out


def _fmt_axes(v: MeshAxes) -> str:
    if v is None:
        return "none"
    return v if isinstance(v, str) else "+".join(v)


def _fmt_sizes(sizes: Mapping[str, int]) -> str:
    live = [f"{a}={s}" for a, s in sizes.items() if s > 1]
    return ",".join(live) or "of 1 device"


def _build(cfg: MeshConfig, devices) -> Mesh:
    sizes = tuple(cfg.ici) + tuple(cfg.dcn)
    need = math.prod(sizes)
    if devices is None:
        if -1 not in sizes and jax.process_count() == 1 and need < jax.device_count():
            devices = jax.devices()[:need]
        have, platform = jax.device_count(), jax.devices()[0].platform
    else:
        have, platform = len(devices), getattr(devices[0], "platform", "") if devices else ""
    if -1 not in sizes and need > have:
        axes = " x ".join(
            f"{a}={i * d}" for a, i, d in zip(MESH_AXES, cfg.ici, cfg.dcn) if i * d > 1
        )
        hint = (
            f"; on a CPU host --devices {need} simulates {need} devices"
            if platform == "cpu"
            else ""
        )
        raise ConfigError(
            f"mesh {cfg} needs {need} devices ({axes}) but there "
            f"{'is' if have == 1 else 'are'} {have} {platform} device{'s' * (have != 1)}: "
            f"give sizes that multiply to {have} (or one size -1, e.g. fsdp=-1, for all "
            f"of them){hint}"
        )
    return build_mesh(cfg, devices)


def _param_leaves(abstract_state) -> list[tuple[str, tuple, tuple[int, ...]]]:
    """(name, logical axes, shape) of every Variable that carries logical_axes."""
    out = []

    def visit(path, leaf):
        axes = leaf.get_metadata("logical_axes", None) if _is_var(leaf) else None
        if axes is not None:
            value = leaf.get_value()
            name = jax.tree_util.keystr(path, simple=True, separator=".")
            out.append((name, tuple(axes), tuple(getattr(value, "shape", ()))))
        return leaf

    jax.tree_util.tree_map_with_path(visit, abstract_state, is_leaf=_is_var)
    return out


class _Sizes:
    """A stand-in mesh for `logical_to_spec` (it reads only `.shape`): hypothetical sizes."""

    def __init__(self, shape: Mapping[str, int]):
        self.shape = dict(shape)


def _first_misfit(rules: Rules, sizes: Mapping[str, int], leaves):
    """The first (name, logical name, dim size, mesh axes) whose mesh axes do not divide the
    dimension under `sizes`; None when everything fits."""
    mesh = _Sizes(sizes)
    for name, axes, shape in leaves:
        if len(axes) != len(shape):
            continue  # named by logical_to_spec's own error
        spec = logical_to_spec(axes, rules, mesh=mesh)
        for dim, lname, part in zip(shape, axes, tuple(spec) + (None,) * len(shape)):
            part = () if part is None else (part,) if isinstance(part, str) else tuple(part)
            if part and dim % math.prod(sizes[a] for a in part):
                return name, lname, dim, part
    return None


def _spare_axis(rules: Rules, sizes: Mapping[str, int], besides: str) -> str | None:
    """A mesh axis no parameter rule uses (the extra devices can go there), data first."""
    table = rules_dict(rules)
    used = {a for name in PARAM_AXES for a in table.get(name, ())}
    free = [a for a in MESH_AXES if a not in used and a != besides]
    return free[0] if free else None


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _map_variables(tree, fn):
    def f(path, leaf):
        out = fn(path, leaf)
        return leaf.replace(out) if _is_var(leaf) else out

    return jax.tree_util.tree_map_with_path(f, tree, is_leaf=_is_var)


def _leaf_spec(path, leaf, plan: ShardingPlan) -> P:
    name = jax.tree_util.keystr(path, simple=True, separator=".")
    value = leaf.get_value() if _is_var(leaf) else leaf
    shape = tuple(getattr(value, "shape", ()))
    axes = leaf.get_metadata("logical_axes", None) if _is_var(leaf) else None
    if axes is None:
        if not shape:
            return P()  # scalars (step counters, RNG keys) are replicated
        raise ValueError(
            f"{type(leaf).__name__} {name!r} of shape {shape} has no logical_axes metadata; "
            f"give it logical_axes=(one name or None per dim)"
        )
    return plan.spec(axes, shape, name)
