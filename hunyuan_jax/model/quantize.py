"""Weight-only quantization of the matmul weights with qwix: which weights, along which axes, the
numerics, the transform of a model between forms (float <-> int8 / fp8 / int4, bf16), the
abstract quantized model, and quantized weights built from stored values + scales (a converted
checkpoint, the FP8 release) without a float copy.

Which weights: every weight a matmul reads through `hunyuan_jax.model.qops`: attention q/k/v/o and
the shared expert's and the routed experts' gate/up/down. Stay float: the router (routing is
float32), the norms, the embedding (and an untied lm_head: the logits read it as a table). The
model says which they are and what each contracts by their logical axes (`layers.MATMULS`).

Layout: qwix's PTQ layout (what `qwix.quantize_params` writes). `module.<name>` becomes

    WithAux(array=QArray(qvalue=Param(int8 | float8_e4m3fn | int4; the weight's shape and logical
                                      axes),
                         scale=Param(float32; 1 on the contracted dims, logical axes the weight's
                                     with None there)),
            how=HowToQuantize(qtype, channelwise_axes, tiled_axes))   (how: static)

so the sharding rules place values and scales with no new rule (nnx paths `<name>/array/qvalue`
and `<name>/array/scale`). int8 / fp8: one scale per output channel: every dimension the
matmul does not contract is channelwise, the stacked `layers` and `exp` axes included (one
scale per layer group, expert and output feature). int4: one scale per output channel and
group of `group` consecutive values of the (flattened) contraction (`group_tiles`: qwix's
subchannel `tiled_axes`), `group` chosen per weight by `int4_group` from the target
`runtime.int4_group_size` (default 128): the largest group <= the target that leaves whole
groups on every shard of the contraction split up to 16 ways and that the stored layout holds
(o_proj's heads x head_dim); the scale's contracted dims then have the group counts and keep
the weight's logical axes, so a mesh axis that shards a contraction shards its groups with it
(`ShardingPlan.check_state` names a scale a mesh axis does not divide). int4 scales are
bfloat16 (`scale_dtype`), int8 / fp8 scales float32.

Numerics: qwix's absmax calibration (`quantize_numpy` reproduces it bit for bit on XLA:CPU, for
the streaming converter). s = max|w| over the contracted dims / B, B = 127.5 (int8) or 448
(e4m3); int8: q = clip(round(w / s), -128, 127), so |w - q s| <= s / 2 = max|w| / 255; fp8:
q = e4m3(w / s), relative error <= 2^-4 (3 mantissa bits; absolute <= 2^-10 s below e4m3's
normal range 2^-6); int4: s = max|w| over the group / 7.5 rounded up to bfloat16 (< 2^-7
relative), q = clip(round(w / s), -8, 7), so |w - q s| <= s / 2 with the stored s. `qops` dequantizes a dense weight next to its matmul (q * s in the compute
dtype; XLA fuses it) and multiplies the grouped matmul's output rows by their expert's scales
(per-channel scales; int4's grouped scales dequantize the local experts first). The measured
accuracy and TPU fit: docs/quantization.md.

Forms (`RuntimePolicy.weights`): 'auto' leaves a model as built or loaded; 'bf16' stores the
matmul weights as bfloat16 arrays; 'int8' / 'fp8' / 'int4' as above; 'int4-experts' the routed
experts int4 and attention + the shared expert int8 (`weight_form`). `convert_model` goes from
any form to any other (a quantized weight is dequantized in float32 first: fp8 -> int8 for
chips without fp8 matmuls); a weight already stored int4 keeps its stored groups.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import qwix
from flax import nnx

# qwix's public API (qwix 0.1.8: `qwix.QArray`, `qwix.quantize`, `qwix.dequantize`, used below)
# exports neither `HowToQuantize` (the static `how` of a quantized weight: qtype, channelwise and
# tiled axes) nor `WithAux`, the PtqProvider's box of a quantized weight that holds both (what
# `qwix.quantize_params` writes and qwix's einsum / ragged_dot read): this module builds and
# reads weights in exactly that layout, so it takes those two from qwix's modules (pinned).
from qwix._src.core import qarray as qwix_qarray
from qwix._src.core.qarray import HowToQuantize
from qwix._src.providers.ptq import WithAux

from hunyuan_jax.model import layers
from hunyuan_jax.model.policy import INT4_GROUP_SIZE, WEIGHTS

QArray = qwix.QArray
QUANTIZED = ("int8", "fp8", "int4", "int4-experts")  # the forms holding values + scales
QTYPES = {
    "int8": np.dtype(np.int8),
    "fp8": np.dtype(ml_dtypes.float8_e4m3fn),
    "int4": np.dtype(ml_dtypes.int4),
}
BOUND = {"int8": 127.5, "fp8": 448.0, "int4": 7.5}  # qwix's symmetric bounds (ints: max + 1/2)
QRANGE = {"int8": (-128, 127), "int4": (-8, 7)}
MAX_SHARDS = 16  # int4 groups stay whole on every shard of a contraction split this many ways


def scale_dtype(form: str) -> np.dtype:
    """The stored scales' dtype: bfloat16 for int4 (a scale per group costs 2 bytes, not 4;
    its rounding up, < 2^-7 relative, is far below an int4 step of 1/7.5 of the
    group's range), float32 for the per-channel int8 / fp8 scales (a negligible share)."""
    return np.dtype(ml_dtypes.bfloat16) if form == "int4" else np.dtype(np.float32)


def weight_form(weights: str, axes=None, *, routed: bool | None = None) -> str:
    """The form of one matmul weight under the model-wide form `weights`: 'int4-experts' is
    int4 for the routed experts (logical axis `exp`, or `routed`) and int8 for the others."""
    if weights != "int4-experts":
        return weights
    routed = ("exp" in tuple(axes)) if routed is None else routed
    return "int4" if routed else "int8"


# ----------------------------------------------------------------------------- which, how
def contracted_dims(name: str, axes) -> tuple[int, ...]:
    """Positions of the dims weight `name` with logical `axes` contracts (`layers.MATMULS`)."""
    dims = layers.contracted_dims(axes)
    if dims is None:
        raise ValueError(f"weight {name!r} with logical axes {tuple(axes)} is no matmul weight")
    return dims


def _channelwise(name: str, axes) -> list[int]:
    contracted = contracted_dims(name, axes)
    return [i for i in range(len(axes)) if i not in contracted]


def int4_group(name: str, axes, shape, target: int | None = None) -> int:
    """The int4 group of weight `name` (values per scale along its contraction): the largest
    group <= `target` (`runtime.int4_group_size`) that (1) divides the contraction per shard
    into whole groups for any split of the weight's leading contracted dim (the one a mesh
    axis shards) up to MAX_SHARDS ways (the largest power of two <= MAX_SHARDS dividing it),
    and (2) the stored layout holds (`_tiles`: a group within one index of the earlier
    contracted dims, or whole last dims). A52B with 128: hidden 6400 -> 100 (6400 / 16 = 400),
    the experts' 18304 -> 104 (1144 per shard of 16), o_proj's 80 heads x 80 -> 80 (100
    straddles a head). Group 1 always qualifies, so every weight takes int4. The one place
    the group of a weight is decided: quantizing, the abstract model, the converter and the
    checkpoint's check of its stored groups all call it."""
    contracted = contracted_dims(name, axes)
    lead = shape[contracted[0]]
    shards = math.gcd(lead, MAX_SHARDS)
    per_shard = math.prod(shape[d] for d in contracted) // shards
    target = target or INT4_GROUP_SIZE
    return next(
        g
        for g in range(min(target, per_shard), 0, -1)
        if per_shard % g == 0 and _tiles(contracted, shape, g)
    )


def group_tiles(name: str, axes, shape, form: str, group: int | None = None) -> tuple[int, ...]:
    """Per dim of weight `name`, how many consecutive values share a scale: 1 on the dims the
    matmul does not contract; on the contracted dims the whole dim (int8 / fp8: per channel),
    or for int4 groups of `int4_group(name, axes, shape, group)` consecutive values of the
    flattened contraction (from its last dim)."""
    contracted = contracted_dims(name, axes)
    if form != "int4":
        return _tiles(contracted, shape, math.prod(shape[d] for d in contracted))
    return _tiles(contracted, shape, int4_group(name, axes, shape, group))


def _tiles(contracted, shape, group: int) -> tuple[int, ...] | None:
    """The tiles of groups of `group` values laid along `contracted` from the last dim, None
    when the layout cannot hold such groups."""
    tiles, left = [1] * len(shape), group
    for d in reversed(contracted):
        size = shape[d]
        if left >= size and left % size == 0:
            tiles[d], left = size, left // size
        elif left < size and size % left == 0:
            tiles[d], left = left, 1
        else:
            break
    return tuple(tiles) if left == 1 else None


def tiles_of(value) -> tuple[int, ...]:
    """The tiles (`group_tiles`) of a stored QArray, from its values' and scales' shapes."""
    return tuple(d // s for d, s in zip(value.qvalue.shape, value.scale.shape))


def _how(name: str, axes, shape, tiles, form: str) -> HowToQuantize:
    """qwix's HowToQuantize of `tiles`: dims not contracted and contracted dims with a scale
    per index are channelwise, contracted dims split into groups tiled, whole ones reduced."""
    contracted = contracted_dims(name, axes)
    channelwise = [
        i for i in range(len(shape)) if i not in contracted or (tiles[i] == 1 and shape[i] > 1)
    ]
    tiled = {i: tiles[i] for i in contracted if 1 < tiles[i] < shape[i]}
    return HowToQuantize(qtype=QTYPES[form], channelwise_axes=channelwise, tiled_axes=tiled)


def how_for(name: str, axes, form: str, shape=None, group: int | None = None) -> HowToQuantize:
    """How weight `name` is quantized to `form` (int4 needs its `shape` and `group`)."""
    if form != "int4":
        return HowToQuantize(qtype=QTYPES[form], channelwise_axes=_channelwise(name, axes))
    return _how(name, axes, shape, group_tiles(name, axes, shape, form, group), form)


def scale_axes(name: str, axes, scale_shape=None) -> tuple:
    """The scale's logical axes: the weight's, None on the contracted dims of size 1 (every
    contracted dim but int4's grouped ones)."""
    contracted = contracted_dims(name, axes)
    one = lambda i: scale_shape is None or scale_shape[i] == 1
    return tuple(None if i in contracted and one(i) else a for i, a in enumerate(axes))


def scale_shape(name: str, axes, shape, form: str = "int8", group=None) -> tuple[int, ...]:
    tiles = group_tiles(name, axes, shape, form, group)
    return tuple(d // t for d, t in zip(shape, tiles))


def form_of(value) -> str:
    """'int8' | 'fp8' | 'int4' for a quantized weight (QArray, WithAux), 'bf16' for a bfloat16
    array, else the float dtype's name."""
    if isinstance(value, WithAux):
        value = value.array
    if isinstance(value, QArray):
        dt = np.dtype(value.qtype)
        return next(f for f, q in QTYPES.items() if q == dt)
    name = np.dtype(value.dtype).name
    return "bf16" if name == "bfloat16" else name


def _stored_value(var):
    """A module attribute as arrays: a float array, or a QArray of arrays."""
    v = var[...]  # WithAux(QArray of Params)[...] is WithAux(QArray of arrays)
    return v.array if isinstance(v, WithAux) else v


def matmul_weights(model) -> Iterator[tuple[tuple, nnx.Module, str]]:
    """(module path, module, name) of every matmul weight of `model`: each parameter whose
    logical axes the model lists as a matmul's (`layers.MATMULS`), float or quantized. Within a
    module in the order of that list, ties by name (q, k, v, o; gate, up, down): the order
    `lora.add_adapters` draws the adapters' initial values in."""
    for path, module in nnx.iter_modules(model):
        found = [(_matmul_of(var), name) for name, var in vars(module).items()]
        for _, name in sorted((m[0], name) for m, name in found if m is not None):
            yield tuple(path), module, name


def _matmul_of(var) -> tuple[int, tuple[int, ...]] | None:
    """`layers.matmul_of` of a module attribute; None unless it is a matmul weight (float
    Param or WithAux(QArray))."""
    if not isinstance(var, (nnx.Param, WithAux)) or isinstance(var, nnx.LoRAParam):
        return None
    axes = _param_of(var).get_metadata("logical_axes", None)
    return None if axes is None else layers.matmul_of(axes)


def weight_axes(var) -> tuple:
    """The logical axes of a matmul weight attribute (float Param or WithAux(QArray))."""
    return tuple(_param_of(var).get_metadata("logical_axes"))


def _param_of(var) -> nnx.Param:
    return var.array.qvalue if isinstance(var, WithAux) else var


# ----------------------------------------------------------------------------- transforms
def to_form(value, name: str, axes, form: str, group: int | None = None):
    """One weight (float array or QArray) in `form` ('bf16' | 'int8' | 'fp8' | 'int4', int4
    in groups of `group`); jax ops, so it runs under jit / eval_shape. Quantizing reads the
    weight in float32."""
    if isinstance(value, QArray):
        if form_of(value) == form:
            return value
        value = qwix.dequantize(value.astype(jnp.float32))
    if form == "bf16":
        return value.astype(jnp.bfloat16)
    how = how_for(name, axes, form, value.shape, group)
    value = value.astype(jnp.float32)
    scale, _ = qwix_qarray.compute_scale_zero_point(qwix_qarray.calibrate(value, how), how.qtype)
    if form == "int4":  # the stored bfloat16 scale, rounded up: every |w / s| stays <= 7.5
        scale = _round_up_bf16(scale)
    q = qwix_qarray.quantize_with_scale_zero_point(value, how.qtype, scale, None)
    return QArray(q.qvalue, scale.astype(scale_dtype(form)), qtype=q.qtype)


def _round_up_bf16(scale):
    """Positive float32 scales rounded up to the next bfloat16 value (exact in float32; jax
    or numpy alike): the low 16 bits of the float32 pattern carried into the high ones."""
    if isinstance(scale, np.ndarray):
        bits = scale.astype(np.float32).view(np.uint32)
        return ((bits + np.uint32(0xFFFF)) & np.uint32(0xFFFF0000)).view(np.float32)
    bits = jax.lax.bitcast_convert_type(scale.astype(jnp.float32), jnp.uint32)
    up = (bits + jnp.uint32(0xFFFF)) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(up, jnp.float32)


def boxed(value, name: str, axes) -> nnx.Param | WithAux:
    """The module attribute holding `value` (a float array, or a QArray in the layout above)."""
    axes = tuple(axes)
    if not isinstance(value, QArray):
        return nnx.Param(value, logical_axes=axes)
    q = QArray(
        nnx.Param(value.qvalue, logical_axes=axes),
        nnx.Param(value.scale, logical_axes=scale_axes(name, axes, value.scale.shape)),
        qtype=value.qtype,
    )
    return WithAux(q, _how(name, axes, value.shape, tiles_of(value), form_of(value)))


def _out_shardings(plan, name: str, axes, shape, form: str, group=None):
    spec = lambda a, s: jax.sharding.NamedSharding(plan.mesh, plan.spec(a, s, name))
    if form == "bf16":
        return spec(axes, shape)
    sshape = scale_shape(name, axes, shape, form, group)
    return QArray(
        spec(axes, shape), spec(scale_axes(name, axes, sshape), sshape), qtype=QTYPES[form]
    )


def set_weight(module, name: str, value, form: str, plan=None, group=None) -> None:
    """`module.<name>` := `value` (float array or QArray) in `form` (int4: in groups of
    `group`), boxed with the logical axes of the attribute it replaces. With a plan,
    converted by a jitted call whose outputs the plan lays out (each device computes its own
    shards)."""
    axes = weight_axes(getattr(module, name))
    if form_of(value) != form:
        fn = functools.partial(to_form, name=name, axes=axes, form=form, group=group)
        if plan is not None and plan.is_sharded:
            out = _out_shardings(plan, name, axes, value.shape, form, group)
            value = jax.jit(fn, out_shardings=out)(value)
        elif plan is not None:
            value = jax.jit(fn)(value)
        else:
            value = fn(value)
    setattr(module, name, boxed(value, name, axes))


def convert_model(model, weights: str, plan=None, group: int | None = None):
    """In place: every matmul weight of `model` in form `weights` ('bf16' | 'int8' | 'fp8' |
    'int4' | 'int4-experts'; 'auto' changes nothing); returns `model`. int4 groups: each
    weight's `int4_group` for the target `group`, default the model's
    `policy.int4_group_size`. With a plan (a concrete model), one jitted call per weight
    (`set_weight`): a float weight and its converted form coexist one weight at a time, on
    device; without (e.g. under `nnx.eval_shape`), plain jax ops."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if weights == "auto":
        return model
    if group is None:
        group = getattr(getattr(model, "policy", None), "int4_group_size", INT4_GROUP_SIZE)
    todo = []
    for path, module, name in list(matmul_weights(model)):
        value = _stored_value(getattr(module, name))
        form = weight_form(weights, weight_axes(getattr(module, name)))
        if form_of(value) != form:
            todo.append((path, module, name, value, form))
    for _, module, name, value, form in todo:
        set_weight(module, name, value, form, plan, group)
    return model


def model_form(model) -> str:
    """'int8' | 'fp8' | 'int4' if the matmul weights are quantized so, 'int4-experts' for int4
    routed experts beside int8 others, else 'float' (any other mix: ValueError)."""
    forms = {}
    for _, m, n in matmul_weights(model):
        f = form_of(getattr(m, n))
        forms.setdefault(f if f in QUANTIZED else "float", set()).add(
            "exp" in weight_axes(getattr(m, n))
        )
    if set(forms) == {"int4", "int8"} and forms["int4"] == {True} and forms["int8"] == {False}:
        return "int4-experts"
    if len(forms) != 1:
        raise ValueError(f"the matmul weights are stored in several forms: {sorted(forms)}")
    return forms.popitem()[0]


def dequantize(value) -> jax.Array:
    """A float32 array of a stored weight (QArray or float array)."""
    if isinstance(value, WithAux):
        value = _stored_value(value)
    if isinstance(value, QArray):
        return qwix.dequantize(value.astype(jnp.float32))
    return jnp.asarray(value, jnp.float32)


# ----------------------------------------------------------------------------- numpy side
def quantize_numpy(w: np.ndarray, contracted: tuple[int, ...], form: str, tiles=None):
    """(values, float32 scales) of `w`: qwix's `quantize` in numpy (for the converter, which
    streams one tensor at a time without a device). Scales are per `tiles` (`group_tiles`;
    default: 1 on `contracted`, per channel). Bit for bit what qwix computes on XLA:CPU, which
    divides by multiplying with the float32 reciprocal (so do we); another backend may differ
    by an ulp of a scale or in a round-half case."""
    one = np.float32(1)
    w = np.asarray(w, np.float32)
    if tiles is None:
        tiles = tuple(d if i in contracted else 1 for i, d in enumerate(w.shape))
    split, reduce = [], []
    for d, t in zip(w.shape, tiles):
        split += [d // t, t]
        reduce.append(len(split) - 1)
    sshape = tuple(d // t for d, t in zip(w.shape, tiles))
    amax = np.max(np.abs(w.reshape(split)), axis=tuple(reduce)).reshape(sshape)
    scale = amax * (one / np.float32(BOUND[form]))
    scale = np.where(scale < np.sqrt(np.finfo(np.float32).tiny), one, scale)
    if form == "int4":
        scale = _round_up_bf16(scale)
    x = w * _expand(one / scale, w.shape)
    if form in QRANGE:
        lo, hi = QRANGE[form]
        q = np.clip(np.round(x), lo, hi).astype(QTYPES[form])
    else:
        q = np.clip(x, -448.0, 448.0).astype(QTYPES["fp8"])
    return q, scale.astype(scale_dtype(form))


def _expand(scale: np.ndarray, shape) -> np.ndarray:
    """`scale` repeated along each dim to `shape` (qwix's generic broadcast of tiled scales)."""
    for i, (d, s) in enumerate(zip(shape, scale.shape)):
        if s not in (1, d):
            scale = np.repeat(scale, d // s, axis=i)
    return scale


def dequantize_numpy(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * _expand(scale.astype(np.float32), q.shape)
