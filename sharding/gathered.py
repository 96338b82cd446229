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
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
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

        def body(xl, wl):
            wl = self._cast(wl)
            for dim, axes in gathers:
                wl = gather_shards(wl, axes, dim)
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


def gather_shards(a: jax.Array, axes: Sequence[str], dim: int) -> jax.Array:
    """Inside `shard_map`: `all_gather(a, axes, axis=dim, tiled=True)`, one mesh axis at a
    time, minor first (the same concatenation order; XLA:TPU turns an all-gather over a whole
    multi-axis slice into an all-reduce of a zero-padded buffer, docs/tpu.md). Its transpose
    is a reduce-scatter per axis. (Gathering whole shards stacked on a new leading dim instead
    made XLA:TPU turn every large reduce-scatter into an all-reduce of a padded flat buffer at
    the A52B's sizes: tried, more bytes.)"""
    for axis in reversed(tuple(axes)):
        a = jax.lax.all_gather(a, axis, axis=dim, tiled=True)
    return a


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
