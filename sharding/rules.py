"""Logical-axis rules: the one table mapping the model's logical axis names to mesh axes.

This module owns the presets (`PRESETS`) and the logical -> `PartitionSpec` translation
(`logical_to_spec`). Parameters name their dimensions with the `logical_axes` metadata of
`nnx.Param` (one name or None per dimension). Programs never use the rules alone: they take a
`sharding.plan.ShardingPlan` (mesh + rules), which answers every sharding question.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from jax.sharding import PartitionSpec as P

from sharding.mesh import MESH_AXES

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Logical names used by the model (every preset maps each of them).
PARAM_AXES = (
    "vocab",
    "embed",
    "heads",
    "kv_heads",
    "head_dim",
    "mlp",
    "exp",
    "exp_embed",
    "exp_mlp",
    "layers",
    "norm",
    "router",
)
ACTIVATION_AXES = (
    "batch",
    "length",
    "act_embed",
    "act_heads",
    "act_kv_heads",
    "act_mlp",
    "act_vocab",
    "act_exp",
    "table_embed",
    "cache_batch",
    "cache_length",
    "cache_kv_heads",
    "cache_layers",
    "cache_pages",
)
LOGICAL_AXES = PARAM_AXES + ACTIVATION_AXES

_DP = ("data", "fsdp")
_DP_EP = ("data", "fsdp", "expert")
_FSDP_EP = ("fsdp", "expert")

# Pure FSDP (mesh expert = tensor = 1): weights sharded on their hidden (embed) dim over 'fsdp',
# activations on batch over (data, fsdp).
FSDP: Rules = (
    ("vocab", None),
    ("embed", "fsdp"),
    ("heads", None),
    ("kv_heads", None),
    ("head_dim", None),
    ("mlp", None),
    ("exp", None),
    ("exp_embed", "fsdp"),
    ("exp_mlp", None),
    ("layers", None),
    ("norm", None),
    ("router", None),
    ("batch", _DP),
    ("length", None),
    ("act_embed", None),
    ("act_heads", None),
    ("act_kv_heads", None),
    ("act_mlp", None),
    ("act_vocab", None),
    ("act_exp", None),
    # The embedding table's hidden dim as the lookup and the tied LM head use it: gathered
    # (None) in training, FSDP style; kept sharded where weights must stay put (serving).
    ("table_embed", None),
    ("cache_batch", _DP),
    ("cache_length", None),
    ("cache_kv_heads", None),
    ("cache_layers", None),
    # The serving engine's page pool: every device holds every page (of its kv heads).
    ("cache_pages", None),
)


def _override(rules: Rules, changes: Mapping[str, MeshAxes]) -> Rules:
    """`rules` with some logical names mapped anew (a preset as a difference from another)."""
    return tuple((k, changes.get(k, v)) for k, v in rules)


# FSDP + expert parallelism: experts over 'expert'; dense weights' embed over ('fsdp', 'expert')
# (SPEC 7: over 'fsdp' alone leaves one copy per expert shard); expert weights' embed over
# 'fsdp'; the batch over every axis (data, fsdp, expert).
FSDP_EP: Rules = _override(
    FSDP,
    {
        "embed": _FSDP_EP,
        "exp": "expert",
        "batch": _DP_EP,
        "act_exp": "expert",
        "cache_batch": _DP_EP,
    },
)

# FSDP_EP + tensor parallelism over 'tensor' (heads, kv heads, FFN hidden, vocab); 'tensor' does
# not shard the batch.
_TP_OVERRIDES = {
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "exp_mlp": "tensor",
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "cache_kv_heads": "tensor",
}
FSDP_EP_TP: Rules = _override(FSDP_EP, _TP_OVERRIDES)

# Decode / serving, weight-stationary: parameters as FSDP_EP_TP, but activations are sharded on
# their hidden dim over ('fsdp', 'expert') like the weights' embed dim (only activations move,
# never weights); batch and cache batch over 'data' only (decode batches are small).
_SERVE_OVERRIDES = {
    "batch": "data",
    "cache_batch": "data",
    "act_embed": _FSDP_EP,
    "table_embed": _FSDP_EP,
    # The 32K-token cache of a batch of 8 does not fit v5e-64 unless its length is split too
    # (the AOT tool's figures: docs/performance.md).
    "cache_length": "expert",
}
SERVE_EP_TP: Rules = _override(FSDP_EP_TP, _SERVE_OVERRIDES)

# FSDP_EP + context parallelism: the sequence (`length`) over the 'tensor' mesh axis (no tensor
# parallelism: heads and FFN stay whole); every activation is split along the sequence, and
# attention gathers K/V (each device attends its own query chunk over all keys,
# `kernels.mask.shard_map_attention`). The weights' hidden dims are FSDP-sharded over that axis
# too (else each context shard would hold a full FSDP copy). For sequences too long for one
# chip's activations.
FSDP_EP_CP: Rules = _override(
    FSDP_EP,
    {"length": "tensor", "embed": ("fsdp", "expert", "tensor"), "exp_embed": ("fsdp", "tensor")},
)

PRESETS: dict[str, Rules] = {
    "fsdp": FSDP,
    "fsdp_ep": FSDP_EP,
    "fsdp_ep_tp": FSDP_EP_TP,
    "fsdp_ep_cp": FSDP_EP_CP,
    "serve_ep_tp": SERVE_EP_TP,
}


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    if isinstance(axes, str):
        return (axes,)
    return tuple(axes)


def rules_dict(rules: Rules) -> dict[str, tuple[str, ...]]:
    """Validates `rules` and returns {logical name: tuple of mesh axes}."""
    out: dict[str, tuple[str, ...]] = {}
    for entry in rules:
        try:
            name, axes = entry
        except (TypeError, ValueError):
            raise ValueError(
                f"sharding rule {entry!r} is not a (logical_name, mesh_axes) pair"
            ) from None
        if name in out:
            raise ValueError(f"sharding rules: logical axis {name!r} appears more than once")
        axes_t = _as_tuple(axes)
        bad = [a for a in axes_t if a not in MESH_AXES]
        if bad:
            raise ValueError(
                f"sharding rule for {name!r}: unknown mesh axis name(s) {bad}; "
                f"known axes are {list(MESH_AXES)}"
            )
        if len(set(axes_t)) != len(axes_t):
            raise ValueError(f"sharding rule for {name!r}: mesh axis repeated in {axes_t}")
        out[name] = axes_t
    return out


def get_rules(rules: Rules | str, overrides: Mapping[str, MeshAxes] | None = None) -> Rules:
    """A rules tuple from a preset name or a rules tuple, with optional {logical: mesh axes}
    overrides (e.g. from a YAML config); an override of an unknown logical name is an error."""
    if isinstance(rules, str):
        if rules not in PRESETS:
            raise ValueError(f"unknown sharding preset {rules!r}; presets are {list(PRESETS)}")
        rules = PRESETS[rules]
    rules = tuple((k, v) for k, v in rules)
    if overrides:
        known = [k for k, _ in rules]
        unknown = [k for k in overrides if k not in known]
        if unknown:
            raise ValueError(
                f"sharding rule overrides: unknown logical axis name(s) {unknown}; known: {known}"
            )
        rules = tuple((k, overrides.get(k, v)) for k, v in rules)
        rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in rules)
    rules_dict(rules)
    return rules


def _mesh_sizes(mesh) -> dict[str, int] | None:
    if mesh is None:
        return None
    return dict(mesh.shape)  # Mesh and AbstractMesh: {axis name: size}


def logical_to_spec(
    logical_axes: Sequence[str | None] | None,
    rules: Rules | str,
    mesh=None,
    shape: Sequence[int] | None = None,
    name: str = "",
) -> P:
    """PartitionSpec for an array whose dims carry `logical_axes` (one name or None per dim).

    A mesh axis already used by an earlier dim is skipped (a spec never names an axis twice). With
    `mesh` (Mesh or AbstractMesh) given, mesh axes of size 1 are dropped; with `shape` too, every
    sharded dim must be divisible by the product of its mesh axes (ValueError naming `name`).
    """
    where = f" of {name!r}" if name else ""
    if logical_axes is None:
        logical_axes = ()
    if isinstance(logical_axes, str):
        raise ValueError(
            f"logical_axes{where} must be a tuple of names, got the string {logical_axes!r}"
        )
    logical_axes = tuple(logical_axes)
    table = rules_dict(get_rules(rules) if isinstance(rules, str) else rules)
    sizes = _mesh_sizes(mesh)
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(
            f"logical_axes{where} {logical_axes} has {len(logical_axes)} names but the "
            f"array has shape {tuple(shape)} ({len(shape)} dims)"
        )
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for dim, lname in enumerate(logical_axes):
        if lname is None:
            spec.append(None)
            continue
        if lname not in table:
            raise ValueError(
                f"unknown logical axis name {lname!r} (dim {dim}{where}); the rules map "
                f"{sorted(table)}"
            )
        axes = []
        for a in table[lname]:
            if a in used:
                continue
            if sizes is not None:
                if a not in sizes:
                    raise ValueError(
                        f"mesh axis {a!r} (rule for {lname!r}) is not in the mesh, whose axes "
                        f"are {list(sizes)}"
                    )
                if sizes[a] == 1:
                    continue
            axes.append(a)
        used.update(axes)
        if sizes is not None and shape is not None and axes:
            n = math.prod(sizes[a] for a in axes)
            if shape[dim] % n:
                raise ValueError(
                    f"cannot shard {name or 'array'}: dim {dim} (logical {lname!r}) has size "
                    f"{shape[dim]}, not divisible by the product of mesh axes {tuple(axes)} = {n} "
                    f"(shape {tuple(shape)}, logical_axes {logical_axes})"
                )
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*spec)
