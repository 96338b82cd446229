"""Weight-only quantization of the matmul weights with qwix: which weights, along which axes, the
numerics, the transform of a model between forms (float <-> int8 / fp8, bf16), the abstract
quantized model, and quantized weights built from stored values + scales (a converted
checkpoint, the FP8 release) without a float copy.

Which weights: every weight a matmul reads through `hunyuan_jax.model.qops`: attention q/k/v/o and
the shared expert's and the routed experts' gate/up/down. Stay float: the router (routing is
float32), the norms, the embedding (and an untied lm_head: the logits read it as a table). The
model says which they are and what each contracts by their logical axes (`layers.MATMULS`).

Layout: qwix's PTQ layout (what `qwix.quantize_params` writes). `module.<name>` becomes

    WithAux(array=QArray(qvalue=Param(int8 | float8_e4m3fn; the weight's shape and logical axes),
                         scale=Param(float32; 1 on the contracted dims, logical axes the weight's
                                     with None there)),
            how=HowToQuantize(qtype, channelwise_axes))            (how: static)

so the sharding rules place values and scales with no new rule (nnx paths `<name>/array/qvalue`
and `<name>/array/scale`). One scale per output channel: every dimension the matmul does not
contract is channelwise, the stacked `layers` and `exp` axes included (one scale per layer
group, expert and output feature).

Numerics: qwix's absmax calibration (`quantize_numpy` reproduces it bit for bit on XLA:CPU, for
the streaming converter). s = max|w| over the contracted dims / B, B = 127.5 (int8) or 448
(e4m3); int8: q = clip(round(w / s), -128, 127), so |w - q s| <= s / 2 = max|w| / 255; fp8:
q = e4m3(w / s), relative error <= 2^-4 (3 mantissa bits; absolute <= 2^-10 s below e4m3's
normal range 2^-6). `qops` dequantizes a dense weight next to its matmul (q * s in the compute
dtype; XLA fuses it) and multiplies the grouped matmul's output rows by their expert's scales.
The measured accuracy and TPU fit: docs/quantization.md.

Forms (`RuntimePolicy.weights`): 'auto' leaves a model as built or loaded; 'bf16' stores the
matmul weights as bfloat16 arrays; 'int8' / 'fp8' as above. `convert_model` goes from any form
to any other (a quantized weight is dequantized in float32 first: fp8 -> int8 for chips
without fp8 matmuls).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import qwix
from flax import nnx

# qwix's public API (qwix 0.1.8: `qwix.QArray`, `qwix.quantize`, `qwix.dequantize`, used below)
# exports neither `HowToQuantize` (the static `how` of a quantized weight: qtype + channelwise
# axes) nor `WithAux`, the PtqProvider's box of a quantized weight that holds both (what
# `qwix.quantize_params` writes and qwix's einsum / ragged_dot read): this module builds and
# reads weights in exactly that layout, so it takes those two from qwix's modules (pinned).
from qwix._src.core.qarray import HowToQuantize
from qwix._src.providers.ptq import WithAux

from hunyuan_jax.model import layers
from hunyuan_jax.model.policy import WEIGHTS

QArray = qwix.QArray
QUANTIZED = ("int8", "fp8")
QTYPES = {"int8": np.dtype(np.int8), "fp8": np.dtype(ml_dtypes.float8_e4m3fn)}
BOUND = {"int8": 127.5, "fp8": 448.0}  # qwix's symmetric bounds (int8: 127 + 1/2)
SCALE_DTYPE = np.dtype(np.float32)


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


def how_for(name: str, axes, form: str) -> HowToQuantize:
    return HowToQuantize(qtype=QTYPES[form], channelwise_axes=_channelwise(name, axes))


def scale_axes(name: str, axes) -> tuple:
    """The scale's logical axes: the weight's, None on the contracted dims (size 1)."""
    contracted = contracted_dims(name, axes)
    return tuple(None if i in contracted else a for i, a in enumerate(axes))


def scale_shape(name: str, axes, shape) -> tuple[int, ...]:
    contracted = contracted_dims(name, axes)
    return tuple(1 if i in contracted else d for i, d in enumerate(shape))


def form_of(value) -> str:
    """'int8' | 'fp8' for a quantized weight (QArray, WithAux), 'bf16' for a bfloat16 array,
    else the float dtype's name."""
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
def to_form(value, name: str, axes, form: str):
    """One weight (float array or QArray) in `form` ('bf16' | 'int8' | 'fp8'); jax ops, so it
    runs under jit / eval_shape. Quantizing reads the weight in float32."""
    if isinstance(value, QArray):
        if form_of(value) == form:
            return value
        value = qwix.dequantize(value.astype(jnp.float32))
    if form == "bf16":
        return value.astype(jnp.bfloat16)
    channelwise = _channelwise(name, axes)
    q = qwix.quantize(value.astype(jnp.float32), QTYPES[form], channelwise_axes=channelwise)
    return QArray(q.qvalue, q.scale.astype(SCALE_DTYPE), qtype=q.qtype)


def boxed(value, name: str, axes) -> nnx.Param | WithAux:
    """The module attribute holding `value` (a float array, or a QArray in the layout above)."""
    axes = tuple(axes)
    if not isinstance(value, QArray):
        return nnx.Param(value, logical_axes=axes)
    q = QArray(
        nnx.Param(value.qvalue, logical_axes=axes),
        nnx.Param(value.scale, logical_axes=scale_axes(name, axes)),
        qtype=value.qtype,
    )
    return WithAux(q, how_for(name, axes, form_of(value)))


def _out_shardings(plan, name: str, axes, shape, form: str):
    spec = lambda a, s: jax.sharding.NamedSharding(plan.mesh, plan.spec(a, s, name))
    if form == "bf16":
        return spec(axes, shape)
    return QArray(
        spec(axes, shape),
        spec(scale_axes(name, axes), scale_shape(name, axes, shape)),
        qtype=QTYPES[form],
    )


def set_weight(module, name: str, value, form: str, plan=None) -> None:
    """`module.<name>` := `value` (float array or QArray) in `form`, boxed with the logical
    axes of the attribute it replaces. With a plan, converted by a jitted call whose outputs
    the plan lays out (each device computes its own shards)."""
    axes = weight_axes(getattr(module, name))
    if form_of(value) != form:
        fn = functools.partial(to_form, name=name, axes=axes, form=form)
        if plan is not None and plan.is_sharded:
            out = _out_shardings(plan, name, axes, value.shape, form)
            value = jax.jit(fn, out_shardings=out)(value)
        elif plan is not None:
            value = jax.jit(fn)(value)
        else:
            value = fn(value)
    setattr(module, name, boxed(value, name, axes))


def convert_model(model, weights: str, plan=None):
    """In place: every matmul weight of `model` in form `weights` ('bf16' | 'int8' | 'fp8';
    'auto' changes nothing); returns `model`. With a plan (a concrete model), one jitted call
    per weight (`set_weight`): a float weight and its converted form coexist one weight at a
    time, on device; without (e.g. under `nnx.eval_shape`), plain jax ops."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if weights == "auto":
        return model
    for _, module, name in list(matmul_weights(model)):
        value = _stored_value(getattr(module, name))
        if form_of(value) != weights:
            set_weight(module, name, value, weights, plan)
    return model


def model_form(model) -> str:
    """'int8' | 'fp8' if the matmul weights are quantized so, else 'float' (mixed: ValueError)."""
    forms = {form_of(getattr(m, n)) for _, m, n in matmul_weights(model)}
    forms = {f if f in QUANTIZED else "float" for f in forms}
    if len(forms) != 1:
        raise ValueError(f"the matmul weights are stored in several forms: {sorted(forms)}")
    return forms.pop()


def dequantize(value) -> jax.Array:
    """A float32 array of a stored weight (QArray or float array)."""
    if isinstance(value, WithAux):
        value = _stored_value(value)
    if isinstance(value, QArray):
        return qwix.dequantize(value.astype(jnp.float32))
    return jnp.asarray(value, jnp.float32)


# ----------------------------------------------------------------------------- numpy side
def quantize_numpy(w: np.ndarray, contracted: tuple[int, ...], form: str):
    """(values, float32 scales with 1 on `contracted`) of `w`: qwix's `quantize` in numpy (for
    the converter, which streams one tensor at a time without a device). Bit for bit what it
    computes on XLA:CPU, which divides by multiplying with the float32 reciprocal (so do we);
    another backend may differ by an ulp of a scale or in a round-half case."""
    one = np.float32(1)
    w = np.asarray(w, np.float32)
    amax = np.max(np.abs(w), axis=contracted, keepdims=True)
    scale = amax * (one / np.float32(BOUND[form]))
    scale = np.where(scale < np.sqrt(np.finfo(np.float32).tiny), one, scale)
    x = w * (one / scale)
    if form == "int8":
        q = np.clip(np.round(x), -128, 127).astype(np.int8)
    else:
        q = np.clip(x, -448.0, 448.0).astype(QTYPES["fp8"])
    return q, scale.astype(SCALE_DTYPE)


def dequantize_numpy(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32)
