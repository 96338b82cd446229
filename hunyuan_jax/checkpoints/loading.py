"""The one loader of checkpoints: what a directory holds, its architecture, its weights under a
runtime policy and a sharding plan, and its tokenizer. (For decoding, `hunyuan_jax.decode.
from_checkpoint.load` adds the tokenizer, sampling defaults, EOS ids and a LoRA run's adapters.)

Formats (checked in this order):

| format | recognised by | weights |
|---|---|---|
| `hf` | config.json + safetensors / PyTorch .bin shards (or their index) | read tensor by tensor (`hf_checkpoint`), placed by the plan |
| `converted` | manifest.json (+ params/) from `python -m hunyuan_jax.cli.convert hf-to-jax` | orbax restore straight into the plan's shardings |
| `run` | config.yaml + checkpoints/ (a train.py run directory) | its latest complete step, restored into the plan's shardings |

    ckpt = open_checkpoint(path)                  # cheap: format, architecture, stored dtype
    model = load_params(ckpt, policy, plan)       # the weights, created sharded

Quantized weights (`hunyuan_jax.model.quantize`): `policy.weights` ('auto' | 'bf16' | 'int8' | 'fp8'
| 'int4' | 'int4-experts') says how the matmul weights are held; 'auto' keeps what the
checkpoint stores (`Checkpoint.weights`: 'float', or a quantized form for `hf-to-jax --quantize`
output and 'fp8' for an FP8 release; int4 in the group size it was written with). A quantized converted checkpoint restores straight into the abstract quantized
tree (no float copy; on a mesh straight into its shardings). A float checkpoint served quantized
is quantized on load, one weight at a time on device (restored alone, then quantized by a jitted
call with the plan's output shardings), so neither a host nor the devices ever hold the float
model whole. An FP8 release is read as stored (e4m3 values + scales) into fp8 weights, or
dequantized in float32 and quantized for 'int8'.

infer.py, the server, `train.py --init-from`, the converter's export and the AOT tool all go
through here; nothing else recognises checkpoint directories.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental.layout import Format, Layout

from hunyuan_jax.checkpoints import converted, fp8_scales, hf_mapping, integrity, runs
from hunyuan_jax.checkpoints.converted import restore_param_state
from hunyuan_jax.checkpoints.hf_checkpoint import HFCheckpoint, verify
from hunyuan_jax.checkpoints.hf_tensors import hf_slice
from hunyuan_jax.checkpoints.runs import (
    TOKENIZER_SUMS,
    read_run_config,
    restore_run_params,
    tokenizer_problem,
)
from hunyuan_jax.data.tokenizer import load_tokenizer
from hunyuan_jax.errors import CheckpointError, ConfigError
from hunyuan_jax.model import quantize
from hunyuan_jax.model.config import ModelConfig, read_hf_config, read_yaml
from hunyuan_jax.model.policy import RuntimePolicy
from hunyuan_jax.model.state import abstract_model, flat_shapes, model_from_arrays
from sharding.plan import ShardingPlan

FORMATS = {
    "hf": "Hugging Face layout: config.json + safetensors or PyTorch .bin shards",
    "converted": "python -m hunyuan_jax.cli.convert hf-to-jax output: manifest.json + params/",
    "run": "train.py run directory: config.yaml + checkpoints/<step>/",
}
_HF_WEIGHTS = (
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "model.safetensors",
    "pytorch_model.bin",
)
_SERVE_DTYPES = ("auto", "float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A recognised checkpoint directory (nothing loaded but its config)."""

    path: Path
    format: str  # a key of FORMATS
    cfg: ModelConfig
    stored_dtype: str  # dtype of the stored parameters
    runtime: RuntimePolicy | None = None  # a run directory's own policy
    weights: str = "float"  # how the matmul weights are stored: 'float' or quantize.QUANTIZED
    int4_group_size: int | None = None  # of stored int4 weights

    def inference_policy(self, dtype: str = "auto") -> RuntimePolicy:
        """The policy decoding uses. 'auto': HF / converted keep their stored dtype for
        parameters and compute (float32 stays float32, anything else bfloat16); a run keeps
        its own (float32 master weights, its compute dtype). 'float32' / 'bfloat16': that
        compute dtype (and, for HF / converted, that parameter dtype)."""
        if dtype not in _SERVE_DTYPES:
            raise ConfigError(f"dtype must be one of {_SERVE_DTYPES}, got {dtype!r}")
        if self.runtime is not None:
            return self.runtime.for_inference(None if dtype == "auto" else dtype)
        if dtype == "auto":
            dtype = "float32" if self.stored_dtype == "float32" else "bfloat16"
        return RuntimePolicy.inference(dtype)

    @property
    def search_dirs(self) -> list[Path]:
        """Where its tokenizer and generation_config.json may be."""
        return [self.path, self.path / "tokenizer"]


# ----------------------------------------------------------------------------- detection
def detect_format(path: Path) -> str | None:
    if (path / "config.json").is_file() and any((path / w).is_file() for w in _HF_WEIGHTS):
        return "hf"

    if converted.is_converted(path):
        return "converted"
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        return "run"
    return None


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Recognise a checkpoint directory and read its architecture (no weights)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"a checkpoint is a directory, got the file {path}")
    fmt = detect_format(path)
    if fmt == "hf":
        hf = read_hf_config(path)
        weights = "fp8" if fp8_scales.is_fp8_release(hf) else "float"
        return Checkpoint(
            path,
            fmt,
            ModelConfig.from_hf(path),
            str(hf.get("torch_dtype") or "bfloat16"),
            weights=weights,
        )
    if fmt == "converted":
        cfg, dtype = converted.stored_config(path)
        weights = converted.read_manifest(path).get("weights", {})
        return Checkpoint(
            path,
            fmt,
            cfg,
            dtype,
            weights=weights.get("form", "float"),
            int4_group_size=weights.get("group_size"),
        )
    if fmt == "run":
        cfg, runtime, train = read_run_config(path)
        if train.get("lora"):
            raise CheckpointError(
                f"{path} is a LoRA run (its checkpoints hold only adapters): load it beside "
                f"its base (infer.py --adapter {path}) or merge it first "
                f"(python -m hunyuan_jax.cli.convert merge-lora --run {path} --out DIR)"
            )
        weights = runtime.weights if runtime.weights in quantize.QUANTIZED else "float"
        group = runtime.int4_group_size if weights.startswith("int4") else None
        return Checkpoint(path, fmt, cfg, runtime.param_dtype, runtime, weights, group)
    if _is_orbax_step(path):
        raise CheckpointError(
            f"{path} is an orbax checkpoint directory without its model config: pass the "
            f"train.py run directory (the one holding config.yaml and checkpoints/) or a "
            f"directory written by `python -m hunyuan_jax.cli.convert hf-to-jax`"
        )
    known = "; ".join(f"{k}: {v}" for k, v in FORMATS.items())
    raise CheckpointError(f"{path} is not a checkpoint directory this program knows ({known})")


def _is_orbax_step(d: Path) -> bool:
    """orbax writes `_CHECKPOINT_METADATA` into each step directory (`DIR` or `DIR/<step>`)."""
    if (d / "_CHECKPOINT_METADATA").is_file() or (d / "_METADATA").is_file():
        return True
    return any(
        (s / "_CHECKPOINT_METADATA").is_file()
        for s in d.iterdir()
        if s.is_dir() and s.name.isdigit()
    )


def read_model_config(path: str | Path) -> ModelConfig:
    """The architecture named by a path: one of our YAML files (its `model:` section), a
    Hugging Face config.json, or any checkpoint directory `open_checkpoint` knows."""
    path = Path(path)
    if path.is_dir():
        return open_checkpoint(path).cfg
    if path.suffix == ".json":
        return ModelConfig.from_hf(path)
    data = read_yaml(path)
    return ModelConfig.from_dict(data.get("model", data), str(path))


# ----------------------------------------------------------------------------- weights
def load_params(ckpt: Checkpoint | str | Path, policy: RuntimePolicy, plan=None):
    """The model of `ckpt` with `policy`, every parameter created in the plan's layout
    (restored shard by shard for orbax formats; read tensor by tensor for HF), its matmul
    weights in the form `policy.weights` asks for ('auto': as stored)."""
    if not isinstance(ckpt, Checkpoint):
        ckpt = open_checkpoint(ckpt)
    return _int4_in_program_layout(_load_params(ckpt, policy, ShardingPlan.or_single(plan)))


def _int4_in_program_layout(model):
    """`model` with each int4 value array in the layout a program compiled ahead of time takes.
    XLA:CPU (jax 0.10) holds int4 buffers a byte per value (`Layout` with
    sub_byte_element_size_in_bits 0) while the programs `lower().compile()` builds (the engine's,
    Generator's) take them packed (4) and refuse a committed argument in the other layout (a
    restored or mesh-placed one); a copy whose output layout the compiler picks (`Layout.AUTO`)
    is packed. Arrays already in the program's layout (e.g. on TPU) are left alone."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    changed = False
    for _, var in flat:
        q = var.get_value()
        if q.dtype != quantize.QTYPES["int4"] or not q._committed:
            continue
        spec = jax.ShapeDtypeStruct(q.shape, q.dtype, sharding=q.sharding)
        want = jax.jit(lambda a: a).lower(spec).compile().input_formats[0][0].layout
        if q.format.layout == want:
            continue
        out = Format(Layout.AUTO, q.sharding)
        packed = jax.jit(lambda a: a + jnp.zeros((), a.dtype), out_shardings=out)(q)
        if packed.format.layout == want:
            var.set_value(packed)
            changed = True
    if changed:
        nnx.update(model, nnx.from_flat_state(flat))
    return model


def _load_params(ckpt: Checkpoint, policy: RuntimePolicy, plan: ShardingPlan):
    form = ckpt.weights if policy.weights == "auto" else policy.weights
    form = ckpt.weights if policy.weights == "auto" else policy.weights
    if ckpt.format == "hf":
        return _load_hf(ckpt, policy, plan, form)

    # The restore target is what is stored (orbax would cast to any other dtype silently).
    stored = "auto" if ckpt.weights == "float" else ckpt.weights
    group = policy.int4_group_size
    if ckpt.int4_group_size is not None:  # the stored groups
        policy = policy.replace(int4_group_size=ckpt.int4_group_size)
    model = abstract_model(ckpt.cfg, policy, plan, weights=stored)
    graphdef, abstract, rest = nnx.split(model, nnx.Param, ...)
    target = plan.abstract(abstract)
    if ckpt.weights != "float" or form == "float":
        model = nnx.merge(graphdef, _restore(ckpt, target), rest)
        return quantize.convert_model(model, "auto" if form == "float" else form, plan, group)
    # A float checkpoint served quantized / as bf16: first everything but the matmul weights,
    # then each matmul weight alone, in its stored dtype, converted on device before the next
    # one is read (peak: the converted model plus one float weight). The converted model's
    # layout is checked first (int4 groups, the mesh), before anything is read.
    plan.abstract(nnx.state(abstract_model(ckpt.cfg, policy, plan, weights=form), nnx.Param))
    weights = {path + (name,) for path, _, name in quantize.matmul_weights(model)}
    skip = lambda path, var: _PLACEHOLDER if path in weights else var
    model = nnx.merge(graphdef, _restore_some(ckpt, _map_vars(target, skip)), rest)
    for path, module, name in list(quantize.matmul_weights(model)):
        want = path + (name,)

        def only(p, var, want=want):
            if p != want:
                return _PLACEHOLDER
            return jax.ShapeDtypeStruct(var.shape, ckpt.stored_dtype, sharding=var.sharding)

        value = dict(nnx.to_flat_state(_restore_some(ckpt, _map_vars(target, only))))[want]
        each = quantize.weight_form(form, quantize.weight_axes(getattr(module, name)))
        quantize.set_weight(module, name, value.get_value(), each, plan, group)
    return model


try:
    from orbax.checkpoint import PLACEHOLDER as _PLACEHOLDER
except ImportError:  # pragma: no cover
    _PLACEHOLDER = ...


def _map_vars(state, fn):
    """`state` (an nnx.State of ShapeDtypeStructs) with each Variable's value fn(path, value)."""
    flat = [(p, v.replace(fn(tuple(p), v.get_value()))) for p, v in nnx.to_flat_state(state)]
    return nnx.from_flat_state(flat)


def _restore(ckpt: Checkpoint, target):
    """Restore the params of a converted checkpoint / run directory into `target` (an
    abstract nnx.State with shardings)."""
    if ckpt.format == "converted":
        return restore_param_state(ckpt.path, target)

    return restore_run_params(ckpt.path, target)[1]


def _restore_some(ckpt: Checkpoint, target):
    """As `_restore`, reading only the leaves of `target` that are not orbax PLACEHOLDERs.
    A converted checkpoint's chunks carry crc32c (tensorstore checks them on read); a run
    step's leaves are restored in their recorded dtypes, checked against its integrity record,
    then cast to the target's."""

    record = None
    if ckpt.format == "converted":
        converted.check_target(ckpt.path, target)
        params = ckpt.path / converted.PARAMS_DIR
    else:
        step = runs.latest_step(ckpt.path)
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {ckpt.path}")
        step_dir = runs.checkpoint_dir(ckpt.path) / str(step)
        params = step_dir / runs.PARAMS
        record = runs.read_record(step_dir)
    stored = target
    if record is not None:
        dtypes = {n: r["dtype"] for n, r in record.get(runs.PARAMS, {}).items()}
        names = iter(n for n, _ in integrity.named_leaves(target))
        stored = _tree_map(
            lambda a: (
                a
                if a is _PLACEHOLDER
                else jax.ShapeDtypeStruct(
                    a.shape, dtypes.get(next(names), a.dtype), sharding=a.sharding
                )
            ),
            target,
        )
    args = _tree_map(
        lambda a: a if a is _PLACEHOLDER else ocp.checkpoint_utils.construct_restore_args(a),
        stored,
    )
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(
            params.absolute(), args=ocp.args.PyTreeRestore(item=stored, restore_args=args)
        )
    if record is not None:
        got = integrity.tree_digests(out)
        want = {n: r["digest"] for n, r in record.get(runs.PARAMS, {}).items() if n in got}
        integrity.compare(want, got, str(params))
    return _tree_map2(
        lambda x, t: x if t is _PLACEHOLDER or x.dtype == t.dtype else x.astype(t.dtype),
        out,
        target,
    )


def _tree_map(fn, tree):
    return jax.tree.map(fn, tree, is_leaf=lambda a: a is _PLACEHOLDER)


def _tree_map2(fn, tree, other):
    return jax.tree.map(fn, tree, other, is_leaf=lambda a: a is _PLACEHOLDER)


def _load_hf(ckpt: Checkpoint, policy: RuntimePolicy, plan, form: str):
    """A HF checkpoint read one leaf at a time (never the whole model in host memory), each
    HF tensor turned into its slice in `form` (`hf_tensors.hf_slice`: FP8 release values
    kept for 'fp8')."""
    policy = policy.replace(weights="auto" if form == "float" else form)
    hf = HFCheckpoint(ckpt.path)
    verify(ckpt.cfg, hf, _weight_shapes(flat_shapes(abstract_model(ckpt.cfg, policy))))
    return model_from_arrays(ckpt.cfg, _HFLeaves(ckpt.cfg, hf, policy, form), policy, plan)


def _weight_shapes(shapes: dict) -> dict:
    """{weight path: shape} from leaf shapes (a quantized weight's values have its shape)."""
    out = {}
    for path, shape in shapes.items():
        if path[-2:] == ("array", "qvalue"):
            out[path[:-2]] = shape
        elif path[-2:] != ("array", "scale"):
            out[path] = shape
    return out


class _HFLeaves(Mapping):
    """{leaf path: numpy array} of a HF checkpoint, built on access, one leaf at a time (a
    quantized weight's values and scales come from one read of its tensors)."""

    def __init__(self, cfg: ModelConfig, hf, policy: RuntimePolicy, form: str):
        self.cfg, self.hf, self.form = cfg, hf, form
        model = abstract_model(cfg, policy)
        self.leaves = {
            tuple(p): (tuple(v.shape), np.dtype(v.dtype))
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
        }
        self.entries = {e.path: e for e in hf_mapping.mapping_table(cfg)}
        self.ready: dict[tuple, object] = {}

    def __len__(self):
        return len(self.leaves)

    def __iter__(self):
        return iter(self.leaves)

    def __contains__(self, path):
        return path in self.leaves

    def __getitem__(self, path):
        if path in self.ready:
            return self.ready.pop(path)
        quantized = path[-2:] in (("array", "qvalue"), ("array", "scale"))
        weight = path[:-2] if quantized else path
        entry = self.entries[weight]
        shape, dtype = self.leaves[weight + ("array", "qvalue") if quantized else weight]
        # A matmul weight held as bf16 has a bf16 leaf already: every unquantized leaf is read
        # as a float in its leaf's dtype (FP8 release values dequantized).
        form = self.form if quantized else "float"
        parts: dict[str, np.ndarray] = {}
        scale_shape = self.leaves[weight + ("array", "scale")][0] if quantized else None
        for index, key in hf_mapping.hf_slices(entry, self.cfg):
            tensor, scale = self.hf.read_with_scale(key)
            pieces = hf_slice(
                entry, tensor, shape, form, scale, dtype, key=key, scale_shape=scale_shape
            )
            for role, piece in pieces.items():
                if role not in parts:
                    parts[role] = np.empty(shape if role != "scale" else scale_shape, piece.dtype)
                if parts[role][index].shape != piece.shape:  # never broadcast a piece
                    raise ValueError(
                        f"{key}: {role} {piece.shape}, leaf slice {parts[role][index].shape}"
                    )
                parts[role][index] = piece
        if not quantized:
            return parts["value"]
        self.ready[weight + ("array", "scale")] = parts["scale"]
        self.ready[weight + ("array", "qvalue")] = parts["qvalue"]
        return self.ready.pop(path)


# ----------------------------------------------------------------------------- tokenizer
def find_tokenizer(*dirs: Path):
    """The first tokenizer found in `dirs` (each dir itself, then its `tokenizer/`), or None.
    A directory with the checksums a training run records (`checksums.json`) is checked
    first: CheckpointError names a damaged file."""
    for d in dirs:
        d = Path(d)
        for cand in (d, d / "tokenizer"):
            if (cand / TOKENIZER_SUMS).is_file():
                problem = tokenizer_problem(cand)
                if problem is not None:
                    raise CheckpointError(problem)
            if cand.is_dir() and ((cand / "hy.tiktoken").is_file() or any(cand.glob("*.model"))):
                return load_tokenizer(cand)
    return None


def check_tokenizer(tokenizer, cfg: ModelConfig) -> None:
    """A tokenizer whose ids do not all fit the model's embedding is the wrong one."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(
            f"tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary is only "
            f"{cfg.vocab_size}: this tokenizer does not belong to this checkpoint"
        )
