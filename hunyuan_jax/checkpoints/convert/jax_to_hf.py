"""Export to Hugging Face safetensors (`jax_to_hf`): from any checkpoint directory
`hunyuan_jax.checkpoints.loading.open_checkpoint` knows, or from a bare orbax params directory + a config.

Sources:
  converted   a `hf-to-jax` output: its params/ (zarr3), config.json and tokenizer files
  run         a train.py run directory: `<run>/checkpoints/<step>/params` (orbax OCDBT) of its
              latest complete step (or `step`), its config.yaml's architecture, its tokenizer/
  bare        an orbax params directory (`_METADATA`, e.g. a step's params/) with `config`
              (HF config.json, our YAML, or a checkpoint directory); `tree_prefix` names
              the params inside it

Each stacked slice is read on its own with tensorstore (only that HF tensor is in memory) and
written into sharded safetensors (`model-0000i-of-0000n`, at most `max_shard_bytes` each) with
`model.safetensors.index.json`, `config.json` (the source's, `torch_dtype` updated) and the
tokenizer / remote-code files: the layout the original PyTorch code loads. What is read is
verified: tensorstore checks a converted checkpoint's crc32c on every chunk; the slices of a
run step are summed into each array's digest and compared with the step's integrity record
before the output is renamed into place. In the same dtype,
HF -> JAX -> HF is bit-exact. Quantized matmul weights (`hf-to-jax --quantize`) are dequantized
(values x scales in float32) and written in the export dtype (default: the stored dtype of the
other parameters, bfloat16 for a bfloat16 source); no FP8 / int8 HF layout is written.
Everything is written into `.<out>.jax-to-hf.tmp` beside `out`
and renamed to `out` at the end, so a failed or killed export leaves no partial `out`; the
next try removes that temp directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np

from hunyuan_jax.checkpoints import converted as fmt
from hunyuan_jax.checkpoints import integrity, loading, runs
from hunyuan_jax.checkpoints.convert.common import (
    HF_INDEX,
    carried_files,
    default_log,
    hf_order,
    hf_tensors,
    np_dtype,
    own_peak_rss_bytes,
    progress_bar,
    write_safetensors,
)
from hunyuan_jax.checkpoints.hf_tensors import to_hf
from hunyuan_jax.errors import CheckpointError, UsageError
from hunyuan_jax.model import quantize
from hunyuan_jax.model.config import ModelConfig, hf_config_path, read_hf_config
from hunyuan_jax.model.policy import INT4_GROUP_SIZE


@dataclasses.dataclass(frozen=True)
class Source:
    """Where the parameters of an export come from."""

    params_dir: Path  # an orbax PyTree checkpoint directory (has _METADATA)
    cfg: ModelConfig
    hf_config: dict  # config.json to write (torch_dtype is set on export)
    use_ocdbt: bool
    use_zarr3: bool
    carry_from: tuple[Path, ...]  # directories whose tokenizer / remote-code files go along
    tree_prefix: str = ""
    label: str = ""  # for the log
    digests: dict[str, str] | None = None  # a run step's recorded digests, checked on export


def _orbax_flags(params_dir: Path) -> tuple[bool, bool]:
    meta = params_dir / "_METADATA"
    if not meta.is_file():
        raise CheckpointError(f"{params_dir}: not an orbax checkpoint (no _METADATA)")
    try:
        m = json.loads(meta.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta}: unreadable orbax metadata: {e}") from e
    return bool(m.get("use_ocdbt")), bool(m.get("use_zarr3"))


def _run_source(ck: loading.Checkpoint, step: int | None) -> Source:
    steps = runs.complete_steps(ck.path)
    if not steps:
        raise CheckpointError(
            f"run {ck.path} has no complete checkpoint under {runs.checkpoint_dir(ck.path)}"
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(
            f"run {ck.path} has no complete checkpoint of step {step} (steps: "
            f"{', '.join(map(str, steps))})"
        )
    step_dir = runs.checkpoint_dir(ck.path) / str(step)
    params_dir = step_dir / runs.PARAMS
    record = runs.read_record(step_dir)
    return Source(
        params_dir,
        ck.cfg,
        ck.cfg.to_hf(),
        *_orbax_flags(params_dir),
        carry_from=tuple(ck.search_dirs),
        label=f"step {step} of run {ck.path}",
        digests=None
        if record is None
        else {n: r["digest"] for n, r in record[runs.PARAMS].items()},
    )


def _bare_source(path: Path, config: str | Path, tree_prefix: str) -> Source:
    config = Path(config)
    cfg = loading.read_model_config(config)
    if config.is_file():
        hf_json = config.suffix == ".json"  # else our YAML
    else:
        hf_json = hf_config_path(config).is_file()  # a checkpoint directory with a config.json
    if hf_json:
        hf_config = read_hf_config(config)
    else:
        hf_config = cfg.to_hf()
    carry = (config, config / "tokenizer") if config.is_dir() else ()
    return Source(path, cfg, hf_config, *_orbax_flags(path), carry, tree_prefix, str(path))


def open_source(
    ckpt: str | Path, config: str | Path | None = None, step: int | None = None, tree_prefix=""
) -> Source:
    """Recognise what `ckpt` is (via `loading.open_checkpoint`) and where its params are."""
    path = Path(ckpt)
    if config is not None:
        if path.is_dir() and loading.detect_format(path) is not None:
            raise UsageError(
                f"--config is only for a bare orbax params directory; {path} is a "
                f"{loading.detect_format(path)} checkpoint that names its own config"
            )
        if step is not None:
            raise UsageError("--step is only for a train.py run directory")
        return _bare_source(path, config, tree_prefix)
    try:
        ck = loading.open_checkpoint(path)
    except CheckpointError as e:
        if path.is_dir() and loading.detect_format(path) is None:
            raise CheckpointError(
                f"{e}; jax-to-hf also takes a bare orbax params directory with --config"
            ) from e
        raise
    if ck.format == "hf":
        raise CheckpointError(f"{path} is already a Hugging Face checkpoint")
    if tree_prefix:
        raise UsageError("--tree-prefix is only for a bare orbax params directory (--config)")
    if ck.format == "run":
        return _run_source(ck, step)
    if step is not None:
        raise UsageError(f"--step is only for a train.py run directory; {path} is {ck.format}")
    man = fmt.read_manifest(path)
    params_dir = path / man["params"]["dir"]
    hf_config = read_hf_config(path)
    p = man["params"]
    return Source(
        params_dir, ck.cfg, hf_config, p["use_ocdbt"], p["use_zarr3"], (path,), label=str(path)
    )


def _stored_form(src: Source) -> tuple[str, int | None]:
    """('float', None), or the quantized form of the matmul weights (`quantize.QUANTIZED`: the
    dtypes of the values leaves of `hunyuan_jax.model.quantize`'s layout in the orbax tree) and
    the int4 group size (the most values per scale of an int4 leaf: o_proj's may be smaller,
    `quantize.group_tiles`; None without int4)."""
    try:
        tree = json.loads((src.params_dir / "_METADATA").read_text())["tree_metadata"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{src.params_dir}: unreadable orbax metadata: {e}") from e
    dtypes, group = set(), None
    for entry in tree.values():
        name = ".".join(k["key"] for k in entry.get("key_metadata", ()))
        if name.startswith(src.tree_prefix) and name.endswith(".array.qvalue.value"):
            arr = fmt.open_for_read(src.params_dir, name, src.use_ocdbt, src.use_zarr3)
            dt = np.dtype(arr.dtype.numpy_dtype)
            dtypes.add(dt)
            if dt == quantize.QTYPES["int4"]:
                scale_name = name[: -len("qvalue.value")] + "scale.value"
                scale = fmt.open_for_read(src.params_dir, scale_name, src.use_ocdbt, src.use_zarr3)
                size = math.prod(arr.shape) // math.prod(scale.shape)
                group = max(group or 0, size)
    if not dtypes:
        return "float", None
    if dtypes == {quantize.QTYPES["int4"], quantize.QTYPES["int8"]}:
        return "int4-experts", group
    return next(f for f, q in quantize.QTYPES.items() if {q} == dtypes), group


def _temp_out(out: Path, overwrite: bool) -> Path:
    """The temp directory to write into; refuses an `out` it must not replace."""
    if out.exists():
        if not out.is_dir():
            raise CheckpointError(f"--out {out} exists and is not a directory")
        if any(out.iterdir()):
            if not overwrite:
                raise CheckpointError(f"--out {out} exists and is not empty (use --overwrite)")
            if loading.detect_format(out) != "hf":
                raise CheckpointError(
                    f"--out {out} is not a Hugging Face checkpoint: --overwrite only replaces one"
                )
    tmp = out.parent / f".{out.name}.jax-to-hf.tmp"
    if tmp.exists():  # left by an export that was killed
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _replace_dir(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.jax-to-hf.old"
    if old.exists():
        shutil.rmtree(old)
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old)


def _check_digests(src: Source, leaves, arrays, sums) -> None:
    """The digests of what was exported (a run step) against the step's record; a leaf the
    slices did not cover exactly once is read again whole."""
    actual = {}
    for leaf in leaves.values():
        h, n = sums.get(leaf.name, ((0, 0), 0))
        if n != math.prod(leaf.shape):
            label = src.tree_prefix + leaf.name
            actual[label] = integrity.stored_digest(arrays[leaf.path], src.params_dir, label)[0]
        else:
            actual[src.tree_prefix + leaf.name] = integrity.fmt_digest(h)
    integrity.compare(src.digests, actual, str(src.params_dir))


def _shards(keys, sizes, max_shard_bytes) -> list[list[str]]:
    shards, cur, cur_bytes = [], [], 0
    for key in keys:
        if cur and cur_bytes + sizes[key] > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(key)
        cur_bytes += sizes[key]
    return shards + [cur] if cur else shards


def jax_to_hf(
    ckpt: str | Path,
    out: str | Path,
    dtype: str | None = None,
    *,
    step: int | None = None,
    max_shard_bytes: int = 5 * 10**9,
    config: str | Path | None = None,
    tree_prefix: str = "",
    overwrite: bool = False,
    progress: bool = True,
    log=None,
) -> dict:
    """Export `ckpt` (a converted checkpoint, a train.py run directory, or a bare orbax params
    directory + `config`) to `out` as sharded safetensors + index + config.json. `dtype`
    None keeps the stored dtype. Returns the index dict."""
    log = log or default_log
    t0 = time.time()
    src, out = open_source(ckpt, config, step, tree_prefix), Path(out).resolve()
    out_dtype = None if dtype is None else np_dtype(dtype)
    form, group = _stored_form(src)
    leaves = fmt.param_leaves(
        src.cfg, "float32", "auto" if form == "float" else form, group or INT4_GROUP_SIZE
    )
    arrays = {}
    for leaf in leaves.values():
        name = src.tree_prefix + leaf.name
        arr = fmt.open_for_read(src.params_dir, name, src.use_ocdbt, src.use_zarr3)
        if tuple(arr.shape) != leaf.shape:
            raise CheckpointError(
                f"{src.params_dir}: parameter {name} has shape {tuple(arr.shape)}"
                f", the config implies {leaf.shape}"
            )
        arrays[leaf.path] = arr
    stored = np.dtype(next(iter(arrays.values())).dtype.numpy_dtype)
    if out_dtype is None:
        if stored.name not in ("float32", "bfloat16", "float16"):
            raise CheckpointError(f"stored dtype {stored} cannot be exported; pass --dtype")
        out_dtype = stored

    # Every HF tensor, in the usual order: embed, layers 0..L-1, norm (lm_head when untied).
    items = hf_tensors(src.cfg, leaves)
    keys = sorted(items, key=hf_order)
    sizes = {k: math.prod(items[k][3]) * out_dtype.itemsize for k in keys}
    shards = _shards(keys, sizes, max_shard_bytes)
    total = sum(sizes.values())

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_out(out, overwrite)
    bar = progress_bar(total, "jax-to-hf", progress)

    sums = {}  # leaf name -> (digest sums, elements) of the slices read so far

    def read(leaf, index, key):
        arr = arrays[leaf.path][index] if index else arrays[leaf.path]
        try:
            piece = arr.read().result()
        except Exception as e:  # tensorstore: a truncated / corrupt shard file, an I/O error
            label = f"{src.tree_prefix + leaf.name} (the slice of {key!r})"
            raise integrity.read_error(e, src.params_dir, label) from e
        if src.digests is not None:
            start = tuple(index) + (0,) * (len(leaf.shape) - len(index))
            h, n = sums.get(leaf.name, ((0, 0), 0))
            block = piece.reshape((1,) * len(index) + piece.shape)  # indexing dropped dims
            part = integrity.np_partial(block, start, leaf.shape)
            sums[leaf.name] = (integrity.add(h, part), n + piece.size)
        return piece

    def produce(key):
        leaf, entry, index, _ = items[key]
        piece = read(leaf, index, key)
        scale = fmt.scale_leaf(leaves, entry.path)
        if scale is not None:  # a quantized weight: dequantized in float32
            piece = quantize.dequantize_numpy(piece, read(scale, index, key))
        hf = to_hf(entry, piece, out_dtype)
        bar.update(hf.nbytes)
        return hf

    try:
        weight_map, n = {}, len(shards)
        for i, group in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            write_safetensors(tmp / name, [(k, out_dtype, items[k][3]) for k in group], produce)
            weight_map.update({k: name for k in group})
        bar.close()
        if src.digests is not None:
            _check_digests(src, leaves, arrays, sums)
        config_out = dict(src.hf_config)
        config_out.pop("quantization_config", None)
        config_out["torch_dtype"] = out_dtype.name
        fmt.write_json_atomic(tmp / "config.json", config_out)
        for name, path in carried_files(*src.carry_from).items():
            if name != "config.json":
                shutil.copyfile(path, tmp / name)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        fmt.write_json_atomic(tmp / HF_INDEX, index)
        _replace_dir(tmp, out)
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.time() - t0
    log(
        f"done: {src.label} -> {out} ({n} shards, {total / 1e9:.2f} GB, {seconds:.1f} s, "
        f"{total / 1e6 / max(seconds, 1e-9):.0f} MB/s, "
        f"peak RSS {own_peak_rss_bytes() / 1e6:.0f} MB)"
    )
    return index
