"""Gathered matmuls: a weight's FSDP all-gather and the matmul reading it in one `shard_map`.

In training a dense weight's hidden dim is sharded (over fsdp x expert in `fsdp_ep`) while the
activations' is not, so every use gathers the weight. Gathered outside the matmul
(`ShardingPlan.gather`), the weight gradient is the output of a batch-sharded dot that GSPMD
reduces with an all-reduce over the slice (and slices); constraining it to the sharded layout
does not make a reduce-scatter. Here the gather and the matmul run on the local shards inside
one `shard_map`: the forward gathers the local (cast) shard one mesh axis at a time, as
`ShardingPlan.gather` does, and multiplies the local activations; autodiff transposes each
`all_gather` into a `psum_scatter` of the local partial weight gradient, a reduce-scatter per
mesh axis (the batch axes the weight is not sharded over are summed by `shard_map`'s own
transpose: a psum over them).

`defer(plan, x, axes, to, cast)` stands in for `plan.gather(...)` where the weight feeds a
matmul (`hunyuan_jax.model.qops` multiplies through `Gathered.einsum`): it returns `cast(x)`
where no gather is needed (serving: weights and activations agree), else a `Gathered`.
The activations' layout inside the `shard_map` comes from the einsum's letters: the dims shared
with the weight carry its names' activation counterparts (`ACTIVATION_OF`), the others, leading,
are (batch, length). A matmul this cannot express exactly (a sharded contracted dim, layouts
that disagree, a mesh axis on two dims) gathers first (`ShardingPlan.gather`) and multiplies
outside, as before.

Inside a `shard_map` already running (the routed experts' in `expert_parallel`), a weight's
shard is a `LocalShard` and its einsum `einsum_of_shard`: the same gather, with the weight
gradient written as a product whose scattered dim is not the minor one (XLA:TPU compiled the
gate / up projections' reduce-scatter as an all-reduce otherwise). Over a mesh axis whose
devices span two torus dimensions (`scatter_by_all_to_all`: v5p's 16-chip `expert` axis) the
gradient's reduce-scatter is an all-to-all and a local sum (`scatter_shards`): XLA:TPU compiles
a reduce-scatter over such a group as an all-reduce of the whole padded buffer. docs/tpu.md,
"Training at pod scale without waste", has the measurements.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

# A weight dim's logical name -> the logical name of the same dim in an activation.
ACTIVATION_OF = {
    "embed": "act_embed",
    "heads": "act_heads",
    "kv_heads": "act_kv_heads",
    "mlp": "act_mlp",
    "vocab": "act_vocab",
    "head_dim": None,
}
_LEADING = ("batch", "length")  # an activation's dims that the weight does not have


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["shard"],
    meta_fields=["plan", "axes", "to", "cast"],
)
@dataclasses.dataclass(frozen=True)
class Gathered:
    """A weight whose gather is left to the matmul that reads it (`einsum`)."""

    shard: jax.Array  # the parameter in its own layout (global shape)
    plan: object  # the ShardingPlan
    axes: tuple  # its logical axes
    to: tuple  # the gathers wanted: ((weight name, activation name), ...)
    cast: Callable | None  # elementwise, on the local shard before the gather

    @property
    def shape(self):
        return self.shard.shape

    @property
    def dtype(self):
        return jax.eval_shape(self._cast, jax.ShapeDtypeStruct((), self.shard.dtype)).dtype

    @property
    def ndim(self):
        return self.shard.ndim

    def __getitem__(self, key):
        if key is Ellipsis:  # how a Variable holding it is read (`module.w[...]`)
            return self
        return self.materialize()[key]

    def _cast(self, a):
        return a if self.cast is None else self.cast(a)

    def materialize(self) -> jax.Array:
        """The gathered weight as an array (`ShardingPlan.gather`)."""
        return self.plan.gather(self.shard, self.axes, dict(self.to), self.cast)

    def astype(self, dtype):
        return self if jnp.dtype(dtype) == self.dtype else self.materialize().astype(dtype)

    def einsum(self, eq: str, x: jax.Array, **kw) -> jax.Array:
        """`jnp.einsum(eq, x, weight)`: gather and matmul in one `shard_map` (module doc)."""
        specs = _specs(self.plan, eq, x, self.shard.shape, self.axes, dict(self.to))
        if specs is None:
            return jnp.einsum(eq, x, self.materialize(), **kw)
        x_spec, w_spec, out_spec, gathers = specs

        planes = scatter_by_all_to_all(self.plan.mesh)

        def body(xl, wl):
            wl = self._cast(wl)
            for dim, axes in gathers:
                wl = gather_shards(wl, axes, dim, planes)
            return jnp.einsum(eq, xl, wl, **kw)

        return jax.shard_map(
            body,
            mesh=self.plan.mesh,
            in_specs=(x_spec, w_spec),
            out_specs=out_spec,
            check_vma=False,
        )(x, self.shard)

    def matmul(self, x: jax.Array) -> jax.Array:
        """`x @ weight` (a 2-D weight; x [..., in])."""
        if self.ndim != 2 or not 2 <= x.ndim <= 3:
            return x @ self.materialize()
        lead = "bs"[: x.ndim - 1]
        return self.einsum(f"{lead}i,io->{lead}o", x)


def defer(plan, x: jax.Array, logical_axes: Sequence[str | None], to: Mapping[str, str], cast=None):
    """`plan.gather(x, logical_axes, to, cast)` left to the matmul: `cast(x)` when no dim
    needs gathering, else a `Gathered`."""
    axes = tuple(logical_axes)
    if not plan.is_sharded or not _gathers(plan, x.shape, axes, to)[1]:
        return x if cast is None else cast(x)
    return Gathered(x, plan, axes, tuple(sorted(to.items())), cast)


def gather_shards(
    a: jax.Array, axes: Sequence[str], dim: int, by_all_to_all: frozenset = frozenset()
) -> jax.Array:
    """Inside `shard_map`: `all_gather(a, axes, axis=dim, tiled=True)`, one mesh axis at a
    time, minor first (the same concatenation order; XLA:TPU turns an all-gather over a whole
    multi-axis slice into an all-reduce of a zero-padded buffer, docs/tpu.md). Its transpose
    is a reduce-scatter per axis (`scatter_shards`): a `psum_scatter`, or over the axes in
    `by_all_to_all` an all-to-all and a local sum. (Gathering whole shards stacked on a new
    leading dim instead made XLA:TPU turn every large reduce-scatter into an all-reduce of a
    padded flat buffer at the A52B's sizes: tried, more bytes.)"""
    for axis in reversed(tuple(axes)):
        if axis in by_all_to_all:
            a = _gather_axis(a, axis, dim)
        else:
            a = jax.lax.all_gather(a, axis, axis=dim, tiled=True)
    return a


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gather_axis(a, axis, dim):
    return jax.lax.all_gather(a, axis, axis=dim, tiled=True)


def _gather_axis_fwd(a, axis, dim):
    return _gather_axis(a, axis, dim), None


def _gather_axis_bwd(axis, dim, _, g):
    return (scatter_shards(g, axis, dim, by_all_to_all=True),)


_gather_axis.defvjp(_gather_axis_fwd, _gather_axis_bwd)


def scatter_shards(g: jax.Array, axis: str, dim: int, by_all_to_all: bool) -> jax.Array:
    """Inside `shard_map`: the sum over `axis` of `g`, this device's tile of dim `dim` (the
    transpose of a tiled all-gather): `psum_scatter`, or, `by_all_to_all`, an all-to-all of
    the n tiles (tile j to device j) and the sum of the n received, in float32. Both send
    (n - 1) / n of `g` per device. XLA:TPU compiles a reduce-scatter whose group spans more
    than one torus dimension (the 16 chips of the `expert` axis on v5p) as an all-reduce of
    the whole (padded) buffer, twice that and more; an all-to-all over them stays one
    (`scatter_by_all_to_all`, docs/tpu.md)."""
    if not by_all_to_all:
        return jax.lax.psum_scatter(g, axis, scatter_dimension=dim, tiled=True)
    n = jax.lax.axis_size(axis)
    t = jnp.moveaxis(g, dim, 0)
    t = t.reshape(n, t.shape[0] // n, *t.shape[1:])
    t = jax.lax.all_to_all(t, axis, 0, 0, tiled=True)  # [n, tile, ...]: peer j's tile j
    return jnp.moveaxis(jnp.sum(t, axis=0, dtype=jnp.float32).astype(g.dtype), 0, dim)


@functools.lru_cache(maxsize=16)
def scatter_by_all_to_all(mesh) -> frozenset:
    """The mesh axes whose reduce-scatters go as all-to-alls (`scatter_shards`): those whose
    device groups span more than one dimension of the physical torus (device `coords`); none
    where devices have no coords (CPU)."""
    if mesh is None:
        return frozenset()
    devices = np.asarray(mesh.devices)
    if not all(hasattr(d, "coords") for d in devices.flat):
        return frozenset()
    out = set()
    for i, axis in enumerate(mesh.axis_names):
        lines = np.moveaxis(devices, i, -1).reshape(-1, devices.shape[i])
        coords = np.array([[d.coords for d in line] for line in lines])  # [groups, n, dims]
        if (np.ptp(coords, axis=1) > 0).sum(axis=-1).max(initial=0) > 1:
            out.add(axis)
    return frozenset(out)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["shard"],
    meta_fields=["axes", "dim", "by_all_to_all"],
)
@dataclasses.dataclass(frozen=True)
class LocalShard:
    """Inside a `shard_map`: a device's shard of a weight whose dim `dim` is split over the
    mesh `axes` (major first), its gather left to the einsum that reads it (`einsum`,
    `einsum_of_shard`). The routed experts' FSDP-sharded weights inside the expert-parallel
    `shard_map` (`hunyuan_jax.model.expert_parallel`)."""

    shard: jax.Array
    axes: tuple
    dim: int
    by_all_to_all: frozenset = frozenset()  # `scatter_by_all_to_all` of the mesh

    @property
    def shape(self):
        n = 1
        for axis in self.axes:
            n *= jax.lax.axis_size(axis)
        return tuple(s * n if d == self.dim else s for d, s in enumerate(self.shard.shape))

    @property
    def dtype(self):
        return self.shard.dtype

    def einsum(self, eq: str, x: jax.Array, **kw) -> jax.Array:
        if kw or not _two_operands(eq):
            w = gather_shards(self.shard, self.axes, self.dim, self.by_all_to_all)
            return jnp.einsum(eq, x, w, **kw)
        return einsum_of_shard(eq, x, self.shard, self.axes, self.dim, self.by_all_to_all)


def _two_operands(eq: str) -> bool:
    if "..." in eq or "->" not in eq or eq.count(",") != 1:
        return False
    (lhs, rhs), out = eq.split("->")[0].split(","), eq.split("->")[1]
    if not all(len(set(t)) == len(t) for t in (lhs, rhs, out)):
        return False  # no repeated letter (a diagonal)
    # every letter in two or three of them: each cotangent is one dot of the other two
    return all(sum(c in t for t in (lhs, rhs, out)) >= 2 for c in set(lhs + rhs + out))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4, 5))
def einsum_of_shard(
    eq: str, x: jax.Array, shard: jax.Array, axes: tuple, dim: int, by_all_to_all=frozenset()
):
    """Inside `shard_map`: `jnp.einsum(eq, x, w)` with w = `gather_shards(shard, axes, dim)`.

    The weight's cotangent is the reduce-scatter (one `psum_scatter` per axis) of the local
    product, as autodiff of the gather would make it, but with that product written as one
    `dot_general` whose first operand is the one holding the scattered dim: its result then
    has that dim ahead of the other, so the default layout XLA:TPU gives the product does not
    put the scattered dim in the lanes (minor). Autodiff writes the cotangent first, which for
    a gate / up projection ([E, D, F], D scattered) gives a [E, F, D] product, D minor, and
    XLA:TPU compiles that reduce-scatter as an all-reduce of the whole product (docs/tpu.md)."""
    return jnp.einsum(eq, x, gather_shards(shard, axes, dim, by_all_to_all))


def _einsum_of_shard_fwd(eq, x, shard, axes, dim, by_all_to_all):
    w = gather_shards(shard, axes, dim, by_all_to_all)
    return jnp.einsum(eq, x, w), (x, w)


def _einsum_of_shard_bwd(eq, axes, dim, by_all_to_all, res, g):
    x, w = res
    (lhs, rhs), out = eq.split("->")[0].split(","), eq.split("->")[1]
    x_dtype, w_dtype, dtype = x.dtype, w.dtype, jnp.result_type(x, w)
    x, w, g = x.astype(dtype), w.astype(dtype), g.astype(dtype)
    gx = _dot(g, out, w, rhs, lhs)
    gw = _dot(x, lhs, g, out, rhs) if rhs[dim] in lhs else _dot(g, out, x, lhs, rhs)
    for axis in axes:  # the transpose of gather_shards: major axis first
        gw = scatter_shards(gw, axis, dim, axis in by_all_to_all)
    return gx.astype(x_dtype), gw.astype(w_dtype)


einsum_of_shard.defvjp(_einsum_of_shard_fwd, _einsum_of_shard_bwd)


def _dot(a, a_dims: str, b, b_dims: str, out: str) -> jax.Array:
    """`einsum(f"{a_dims},{b_dims}->{out}", a, b)` as one `dot_general(a, b)` in that operand
    order (`jnp.einsum` may swap them); every letter is in two or three of them (`_two_operands`)."""
    batch = [c for c in a_dims if c in b_dims and c in out]
    contract = [c for c in a_dims if c in b_dims and c not in out]
    y = jax.lax.dot_general(
        a,
        b,
        (
            ([a_dims.index(c) for c in contract], [b_dims.index(c) for c in contract]),
            ([a_dims.index(c) for c in batch], [b_dims.index(c) for c in batch]),
        ),
    )
    y_dims = batch + [c for c in a_dims if c not in b_dims] + [c for c in b_dims if c not in a_dims]
    return jnp.transpose(y, [y_dims.index(c) for c in out])


def _axes_of(part) -> tuple[str, ...]:
    return () if part is None else (part,) if isinstance(part, str) else tuple(part)


def _gathers(plan, shape, axes, to):
    """(the weight's spec, [(dim, mesh axes)] to gather, the spec after the gathers)."""
    spec = tuple(plan.spec(axes, shape)) + (None,) * len(shape)
    spec = [_axes_of(a) for a in spec[: len(shape)]]
    after, gathers = list(spec), []
    for dim, (name, part) in enumerate(zip(axes, spec)):
        if name in to and part:
            want = plan.activation_spec((to[name],), (shape[dim],))
            if tuple(want) in ((), (None,)):
                gathers.append((dim, part))
                after[dim] = ()
    return spec, gathers, after


def _specs(plan, eq, x, w_shape, axes, to):
    """(x spec, weight spec, output spec, gathers) of `eq` in one shard_map, or None where the
    local einsum would not be the global one's shard."""
    if "..." in eq or "->" not in eq:
        return None
    ins, out = eq.split("->")
    lhs, rhs = ins.split(",")
    if len(lhs) != x.ndim or len(rhs) != len(w_shape):
        return None
    spec, gathers, after = _gathers(plan, w_shape, axes, to)
    lead = [c for c in lhs if c not in rhs]
    if len(lead) > len(_LEADING) or any(lhs.index(c) > i for i, c in enumerate(lead)):
        return None  # the activation's own dims must lead
    names = dict(zip(lead, _LEADING))
    for c, name in zip(rhs, axes):
        if name not in ACTIVATION_OF:
            return None
        names[c] = ACTIVATION_OF[name]
    x_spec = tuple(plan.activation_spec([names[c] for c in lhs], x.shape))
    x_spec += (None,) * (x.ndim - len(x_spec))
    letter = {c: _axes_of(p) for c, p in zip(lhs, x_spec)}
    for c, part in zip(rhs, after):
        if letter.setdefault(c, part) != part:
            return None  # the two operands lay the dim out differently
    if any(letter[c] for c in set(lhs + rhs) - set(out)):
        return None  # a sharded contracted dim would need a psum of the output
    used = [a for c in set(lhs + rhs) for a in letter[c]]
    if len(used) != len(set(used)):
        return None
    pspec = lambda parts: P(*(None if not p else p[0] if len(p) == 1 else p for p in parts))
    return (
        pspec([letter[c] for c in lhs]),
        pspec(spec),
        pspec([letter[c] for c in out]),
        gathers,
    )
