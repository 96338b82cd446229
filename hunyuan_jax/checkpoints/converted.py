"""The on-disk layout of a converted Hunyuan-Large checkpoint, and restoring it straight into a
sharded model.

Layout of a converted directory `O` (written by `python -m hunyuan_jax.cli.convert hf-to-jax`,
`hunyuan_jax/checkpoints/convert/hf_to_jax.py`)::

    O/
      manifest.json          written last, atomically: {"format": "hunyuan-jax-params",
                             "version": 1, "complete": true, "dtype": "bfloat16",
                             "params": {"dir": "params", "use_ocdbt": false, "use_zarr3": true,
                             "compression", "chunk_bytes", "checksum": "crc32c",
                             "leaves": {name: {"shape", "dtype", "shard_shape", "chunk_shape"}},
                             "bytes"}, "source": {"dir", "format": "safetensors"|"bin",
                             "files": [{"name", "size", "mtime_ns"}], "fp8": bool},
                             "weights": {"form": "float", "dtype"} or (`--quantize`)
                             {"form": "int8"|"fp8"|"int4"|"int4-experts", "dtype",
                             "scale_dtype", "scales", "calibration", "group_size", "groups"
                             (int4: {weight: values per scale})}: the loader's restore target,
                             whose arrays must match "leaves" (else one line: orbax would pad
                             or cast silently),
                             "plan": {...} (as .convert/plan.json), "hf_config": {...},
                             "tokenizer_files": [...], "stats": {"seconds",
                             "source_bytes_this_run", "mb_per_s", "peak_rss_mb", "resumed"}}
                             No manifest (or "complete" false) = not a usable checkpoint.
      config.json            the source's Hugging Face config.json (`torch_dtype` set to the
                             stored dtype, FP8 `quantization_config` dropped):
                             `hunyuan_jax.checkpoints.loading.open_checkpoint(O)` reads it.
      params/                an orbax PyTree checkpoint of `nnx.state(model, nnx.Param)`:
        _METADATA            orbax tree metadata (use_ocdbt=false, use_zarr3=true)
        _CHECKPOINT_METADATA
        embed.value/         one zarr3 array per parameter, named as orbax names the leaves of
        final_norm.weight.value/   an nnx.State ("." joined key path, ending in ".value")
        groups.layers.0.attn.q_proj.value/
          zarr.json          shape [groups, embed, heads, head_dim], dtype, codecs
        groups.layers.0.attn.q_proj.array.qvalue.value/   with --quantize: the int8 / e4m3
        groups.layers.0.attn.q_proj.array.scale.value/    / int4 values and their scales
                             [groups, 1, heads, head_dim] (1 on the contracted dims;
                             int4: embed / its group there) of each matmul weight, in
                             place of the float leaf (int4: tensorstore's int4, a byte
                             per value before compression; zstd makes it ~0.45)
          c/<g>/0/0/0        one file ("zarr3 shard") per stacked slice = one HF tensor: per
                             layer group (c/<g>/...), or per (group, expert) for routed
                             experts (c/<g>/<e>/...): chunks of <= 4 MiB (zstd 1 or none)
                             and an index, each with its crc32c, checked on every read: a
                             flipped byte is an error naming the file (`convert verify`)
        ...
      hy.tiktoken, ..., *.py the source's tokenizer files and remote code, if any
      .convert/              only while converting:
        plan.json            what is being written (source files with sizes and mtimes, dtype,
                             layout); a resume must find the same plan
        progress.jsonl       one {"k": "<HF key>"} line per slice written and fsync'd (the
                             resume record; a torn last line is ignored)

Why zarr3 without OCDBT: each stacked slice (one HF tensor) is one whole zarr3 shard file,
written atomically by tensorstore, so a conversion writes slice by slice, can be killed at any
point and resumes by rewriting what its progress record lacks (OCDBT's one B-tree manifest
fits a single save, not that); the <= 4 MiB inner chunks let each host read only its shards.

Restoring: `restore_param_state(O, target)` restores with orbax into `ShapeDtypeStruct`s
carrying the plan's shardings (each process reads only its shards; a different dtype is cast
on read). `hunyuan_jax.checkpoints.loading` is the one place that recognises a converted
directory and builds that target.
`python -m hunyuan_jax.cli.convert jax-to-hf` exports back to Hugging Face safetensors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx

from hunyuan_jax import atomic
from hunyuan_jax.checkpoints import hf_mapping
from hunyuan_jax.checkpoints.hf_checkpoint import CheckpointError
from hunyuan_jax.checkpoints.integrity import check_layout, orbax_metadata, read_error
from hunyuan_jax.model import quantize
from hunyuan_jax.model.config import ConfigError, ModelConfig, hf_to_fields, read_hf_config
from hunyuan_jax.model.policy import INT4_GROUP_SIZE, RuntimePolicy
from hunyuan_jax.model.state import abstract_model

FORMAT_NAME = "hunyuan-jax-params"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARAMS_DIR = "params"
CONFIG = "config.json"
WORK_DIR = ".convert"
WORK_PLAN = "plan.json"  # in WORK_DIR
WORK_PROGRESS = "progress.jsonl"  # in WORK_DIR
TOKENIZER_FILES = (
    "hy.tiktoken",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
)
DEFAULT_CHUNK_BYTES = 4 << 20


# ----------------------------------------------------------------------------- the param tree
@dataclasses.dataclass(frozen=True)
class Leaf:
    """One parameter leaf: its nnx path, orbax name and key path, shape and dtype, and the
    HF mapping entry that fills it (one zarr3 shard per HF tensor). A quantized weight is two
    leaves filled from the same HF tensor: role 'qvalue' (the weight's shape) and 'scale' (1 on
    the contracted dims); every other leaf has role 'value'."""

    path: tuple
    name: str
    keys: tuple[tuple[str, int], ...]  # (key name, orbax key type: 1 sequence, 2 dict)
    shape: tuple[int, ...]
    dtype: np.dtype
    entry: hf_mapping.TensorMap | None
    role: str = "value"  # 'value' | 'qvalue' | 'scale'

    @property
    def shard_shape(self) -> tuple[int, ...]:
        """One HF tensor's slice: stacking dims (group, expert) of size 1, the rest whole."""
        lead = 0 if self.entry is None else (self.entry.member is not None) + self.entry.per_expert
        return (1,) * lead + tuple(self.shape[lead:])

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _key_entry(k) -> tuple[str, int]:
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx), 1
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key), 2
    if isinstance(k, jax.tree_util.GetAttrKey):
        return str(k.name), 2
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key), 2
    raise ValueError(f"unsupported pytree key {k!r}")


def param_leaves(
    cfg: ModelConfig, dtype: str, weights: str = "auto", group_size: int = INT4_GROUP_SIZE
) -> dict[tuple, Leaf]:
    """{nnx path: Leaf} for every parameter stored in `dtype` (the router stays float32) with
    the matmul weights in form `weights` ('auto': `dtype`; 'bf16'; 'int8' / 'fp8' / 'int4' /
    'int4-experts': values + scales, int4 in each weight's group for the target `group_size`,
    `hunyuan_jax.model.quantize`), with the names orbax gives them when saving
    `nnx.state(model, nnx.Param)` (the same flattening orbax applies at restore)."""
    policy = RuntimePolicy(param_dtype=dtype, weights=weights, int4_group_size=group_size)
    state = nnx.state(abstract_model(cfg, policy), nnx.Param)
    entries = {e.path: e for e in hf_mapping.mapping_table(cfg)}
    out = {}
    for vpath, var in jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]:
        sub = jax.tree_util.tree_flatten_with_path(var)[0]
        if len(sub) != 1:
            raise ValueError(f"parameter {vpath} flattens to {len(sub)} leaves")
        keys = tuple(_key_entry(k) for k in tuple(vpath) + tuple(sub[0][0]))
        path = tuple(_key_entry(k)[0] for k in vpath)
        # nnx paths use ints for list indices; match the mapping table's paths.
        path = tuple(int(p) if p.isdigit() else p for p in path)
        role, weight = "value", path
        if path[-2:] in (("array", "qvalue"), ("array", "scale")):
            role, weight = path[-1], path[:-2]
        leaf = sub[0][1]
        out[path] = Leaf(
            path,
            ".".join(k for k, _ in keys),
            keys,
            tuple(leaf.shape),
            np.dtype(leaf.dtype),
            entries.get(weight),
            role,
        )
    missing = set(entries) - {l.entry.path for l in out.values() if l.entry is not None}
    if missing:
        raise ValueError(f"mapping table paths not in the model: {sorted(missing)}")
    return out


def leaves_form(leaves: dict[tuple, Leaf]) -> str:
    """The quantized form (`quantize.QUANTIZED`) of the stored matmul weights, or 'float'."""
    q = {np.dtype(l.dtype) for l in leaves.values() if l.role == "qvalue"}
    if not q:
        return "float"
    if q == {quantize.QTYPES["int4"], quantize.QTYPES["int8"]}:
        return "int4-experts"
    return next(f for f, d in quantize.QTYPES.items() if {d} == q)


def weight_leaf(leaves: dict[tuple, Leaf], entry_path: tuple) -> Leaf:
    """The leaf holding the values of the weight at `entry_path` (the weight, or its qvalue)."""
    return leaves.get(entry_path) or leaves[entry_path + ("array", "qvalue")]


def scale_leaf(leaves: dict[tuple, Leaf], entry_path: tuple) -> Leaf | None:
    return leaves.get(entry_path + ("array", "scale"))


# ----------------------------------------------------------------------------- tensorstore specs
def choose_chunk_shape(
    shard_shape, itemsize: int, target_bytes: int = DEFAULT_CHUNK_BYTES
) -> tuple[int, ...]:
    """Inner chunk shape dividing `shard_shape` (zarr3 sharding requires it), <= target bytes
    where possible: repeatedly divide the largest dim by its smallest prime factor."""
    chunk = list(shard_shape)
    while math.prod(chunk) * itemsize > target_bytes:
        order = sorted(range(len(chunk)), key=lambda i: -chunk[i])
        for i in order:
            d = chunk[i]
            p = next((p for p in range(2, int(math.isqrt(d)) + 1) if d % p == 0), d)
            if d > 1:
                chunk[i] = d // p
                break
        else:
            break
    return tuple(chunk)


def array_spec(
    params_dir: str | Path,
    name: str,
    shape,
    dtype,
    shard_shape,
    chunk_shape,
    compression: str = "zstd",
    checksum: str = "crc32c",
) -> dict[str, Any]:
    """The zarr3 spec of one leaf: one shard per `shard_shape` block, `chunk_shape` chunks,
    each chunk (after compression) followed by its crc32c, which tensorstore checks on every
    read (`checksum="none"` only for measuring what the checksums cost)."""
    codecs = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compression == "zstd":
        codecs.append({"name": "zstd", "configuration": {"level": 1}})
    elif compression != "none":
        raise ValueError(f"compression must be 'zstd' or 'none', got {compression!r}")
    if checksum == "crc32c":
        codecs.append({"name": "crc32c"})
    elif checksum != "none":
        raise ValueError(f"checksum must be 'crc32c' or 'none', got {checksum!r}")
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(Path(params_dir) / name)},
        "metadata": {
            "shape": list(shape),
            "data_type": np.dtype(dtype).name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(shard_shape)}},
            "codecs": [
                {
                    "name": "sharding_indexed",
                    "configuration": {
                        "chunk_shape": list(chunk_shape),
                        "codecs": codecs,
                        "index_codecs": [
                            {"name": "bytes", "configuration": {"endian": "little"}},
                            {"name": "crc32c"},
                        ],
                        "index_location": "end",
                    },
                }
            ],
            "fill_value": 0,
        },
        # Orbax restores with fill_missing_data_reads=False: every chunk must exist, zeros too.
        "store_data_equal_to_fill_value": True,
    }


def read_spec(
    params_dir: str | Path, name: str, use_ocdbt: bool, use_zarr3: bool
) -> dict[str, Any]:
    """Spec to read one leaf of any orbax PyTree checkpoint (ours, or an OCDBT one saved by
    orbax, e.g. the params of a train.py checkpoint after the OCDBT merge)."""
    params_dir = str(Path(params_dir).absolute())
    if use_ocdbt:
        kv = {"driver": "ocdbt", "base": {"driver": "file", "path": params_dir}, "path": name}
    else:
        kv = {"driver": "file", "path": os.path.join(params_dir, name)}
    return {
        "driver": "zarr3" if use_zarr3 else "zarr",
        "kvstore": kv,
        "fill_missing_data_reads": False,  # a missing chunk file is an error, not zeros
        "recheck_cached_data": False,
        "recheck_cached_metadata": False,
    }


def open_for_read(params_dir: str | Path, name: str, use_ocdbt: bool, use_zarr3: bool):
    try:
        return ts.open(
            read_spec(params_dir, name, use_ocdbt, use_zarr3),
            open=True,
            read=True,
            context=ts.Context({"cache_pool": {"total_bytes_limit": 0}}),
        ).result()
    except ValueError as e:
        raise CheckpointError(f"{params_dir}: cannot open parameter {name}: {e}") from e


# ----------------------------------------------------------------------------- metadata files
def write_json_atomic(path: str | Path, obj) -> None:
    """Write JSON to a temp file, fsync, rename: readers see the old file or the new one."""
    atomic.write_json(path, obj)


def orbax_tree_metadata(leaves: dict[tuple, Leaf], use_zarr3: bool = True) -> dict:
    """The `_METADATA` orbax's PyTreeCheckpointHandler writes for this tree (no OCDBT)."""
    tree = {}
    for leaf in leaves.values():
        tree[str(tuple(k for k, _ in leaf.keys))] = {
            "key_metadata": [{"key": k, "key_type": t} for k, t in leaf.keys],
            "value_metadata": {
                "value_type": "jax.Array",
                "skip_deserialize": False,
                "write_shape": list(leaf.shard_shape),
            },
        }
    return {
        "tree_metadata": tree,
        "use_ocdbt": False,
        "use_zarr3": use_zarr3,
        "store_array_data_equal_to_fill_value": True,
        "custom_metadata": None,
    }


def write_orbax_metadata(params_dir: str | Path, leaves: dict[tuple, Leaf]) -> None:
    params_dir = Path(params_dir)
    write_json_atomic(params_dir / "_METADATA", orbax_tree_metadata(leaves))
    now = time.time_ns()
    write_json_atomic(
        params_dir / "_CHECKPOINT_METADATA",
        {
            "item_handlers": "orbax.checkpoint._src.handlers.pytree_checkpoint_handler."
            "PyTreeCheckpointHandler",
            "metrics": {},
            "performance_metrics": {},
            "init_timestamp_nsecs": now,
            "commit_timestamp_nsecs": now,
            "custom_metadata": {"format": FORMAT_NAME},
        },
    )


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a converted checkpoint; CheckpointError unless it is complete."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        hint = (
            " (a conversion was interrupted: rerun the same hf-to-jax command to resume)"
            if (directory / WORK_DIR).is_dir()
            else ""
        )
        raise CheckpointError(
            f"{directory}: no {MANIFEST}: not a complete converted checkpoint{hint}"
        )
    try:
        man = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt manifest: {e}") from e
    if man.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: format {man.get('format')!r}, expected {FORMAT_NAME!r}")
    if man.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {man.get('version')} is newer than this "
            f"code understands ({FORMAT_VERSION})"
        )
    if not man.get("complete"):
        raise CheckpointError(f"{path}: checkpoint is marked incomplete")
    problem = manifest_problem(man)
    if problem:
        raise CheckpointError(f"{path}: corrupt manifest: {problem}")
    return man


def manifest_problem(man: dict) -> str | None:
    """What is wrong with the fields of a complete manifest that readers use (None: nothing):
    the params directory is `params/` (never a path elsewhere), the stored dtype is the
    embedding's, the weights form is known, tokenizer files are plain names beside it."""
    p, dtype = man.get("params"), man.get("dtype")
    if not isinstance(p, dict) or not isinstance(p.get("leaves"), dict) or not p["leaves"]:
        return "'params' must hold the 'leaves' of the checkpoint"
    if p.get("dir") != PARAMS_DIR:
        return f"params.dir must be {PARAMS_DIR!r}, got {p.get('dir')!r}"
    if not isinstance(p.get("use_ocdbt"), bool) or not isinstance(p.get("use_zarr3"), bool):
        return "params.use_ocdbt and params.use_zarr3 must be true or false"
    embed = p["leaves"].get("embed.value", {})
    if not isinstance(dtype, str) or embed.get("dtype") != dtype:
        return f"dtype {dtype!r} is not the stored embedding's ({embed.get('dtype')!r})"
    weights = man.get("weights") or {}
    form, group = weights.get("form", "float"), weights.get("group_size")
    if form not in ("float",) + quantize.QUANTIZED:
        return f"weights.form must be float, {', '.join(quantize.QUANTIZED)}, got {form!r}"
    if form.startswith("int4") and (not isinstance(group, int) or group <= 0):
        return f"weights.group_size must be a positive integer for {form}, got {group!r}"
    names = man.get("tokenizer_files", [])
    if not isinstance(names, list) or any(
        not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..") for n in names
    ):
        return f"tokenizer_files must be plain file names, got {names!r}"
    return None


def stored_config(directory: str | Path) -> tuple[ModelConfig, str]:
    """(ModelConfig, stored parameter dtype) of a complete converted checkpoint. The
    architecture is that of config.json, which must be the one the checkpoint was written with
    (the manifest's `hf_config`): an edited config.json would load the same weights into
    another model (e.g. `moe_topk` 1 -> 2) and decode something else without a word."""
    man = read_manifest(directory)
    path = Path(directory) / CONFIG
    cfg = ModelConfig.from_hf(path)
    written = man.get("hf_config")
    if written is not None:  # manifests of every version so far carry it
        check_written_config(path, cfg, written, Path(directory) / MANIFEST)
    return cfg, man["dtype"]


def check_written_config(path: Path, cfg: ModelConfig, written, manifest: Path) -> None:
    """CheckpointError naming config.json and each key whose value changes the architecture
    relative to `written` (the config the weights were converted with, in the manifest).
    Keys that are not architecture (torch_dtype, token ids, dropout) may differ."""

    def arch(hf) -> ModelConfig:
        return ModelConfig.from_dict(hf_to_fields(hf, str(manifest)), str(manifest))

    if not isinstance(written, dict):
        raise CheckpointError(f"{manifest}: 'hf_config' is not a JSON object")
    try:
        want = arch(written)
    except ConfigError as e:
        raise CheckpointError(f"{manifest}: corrupt 'hf_config': {e}") from None
    if cfg == want:
        return
    current, gone = read_hf_config(path), object()
    differ = sorted(
        k for k in set(current) | set(written) if current.get(k, gone) != written.get(k, gone)
    )
    keys = []
    for key in differ:  # the keys that, alone, change the architecture
        trial = {k: v for k, v in written.items() if k != key}
        if key in current:
            trial[key] = current[key]
        try:
            changes = arch(trial) != want
        except ConfigError:
            changes = True
        if changes:
            keys.append(key)
    show = lambda d, k: json.dumps(d[k]) if k in d else "(absent)"
    what = ", ".join(f"{k} {show(written, k)} -> {show(current, k)}" for k in keys or differ)
    raise CheckpointError(
        f"{path}: not the architecture this checkpoint was written with ({what}; "
        f"{manifest.name} records the original under 'hf_config'): restore config.json or "
        f"convert again"
    )


def stored_weights(directory: str | Path) -> str:
    """How a converted checkpoint stores its matmul weights: 'float' (in the manifest's
    dtype) or a quantized form (`quantize.QUANTIZED`: values + scales)."""
    return read_manifest(directory).get("weights", {}).get("form", "float")


def restore_param_state(directory: str | Path, target):
    """Restore the params of a converted checkpoint into `target`, an nnx.State (or any pytree
    with the same structure as `nnx.state(model, nnx.Param)`) of `jax.ShapeDtypeStruct`s with
    shardings; each process reads only its shards; dtypes are cast on read."""

    check_target(directory, target)
    params = Path(directory).absolute() / PARAMS_DIR
    orbax_metadata(params)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(params, target)
    except Exception as e:  # tensorstore: a missing / truncated chunk file, a crc32c mismatch
        raise read_error(e, params) from e


def check_target(directory: str | Path, target) -> None:
    """CheckpointError (one line) unless every array of the restore `target` has the shape
    and dtype the manifest records (`integrity.check_layout`)."""
    man = read_manifest(directory)
    check_layout(Path(directory) / MANIFEST, man["params"]["leaves"], target)


def is_converted(directory: str | Path) -> bool:
    """Whether `directory` holds a converted checkpoint (complete or not)."""
    directory = Path(directory)
    return (directory / MANIFEST).is_file() or (directory / WORK_DIR / WORK_PLAN).is_file()
