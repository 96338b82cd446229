"""The streaming, resumable HF -> JAX writer (`hf_to_jax`).

1. `plan.plan_hf_to_jax` scans and verifies the source (no tensor data read); the free disk
   space must hold what is left to write.
2. Every parameter is created as an empty zarr3 array (layout: `converted`) and the
   plan (source files with sizes and mtimes, dtype, layout) recorded in `O/.convert/plan.json`.
3. The HF tensors stream in file order: read one tensor with plain file reads (no memory map),
   dequantise FP8, transpose / cast it into its slice of the stacked leaf (on `workers`
   threads), write that slice (one zarr3 shard file) while the next ones are read; each
   completed (fsync'd) slice is then appended to `O/.convert/progress.jsonl`, so the record
   never lists data that is not on disk. Peak RAM is the start-up footprint (~250 MB: Python,
   jax, tensorstore) plus about 3 x max(1 GB budget of tensors in flight, largest tensor),
   independent of the number of layers.
4. orbax's `_METADATA`, `config.json`, the tokenizer files and finally `manifest.json` with
   "complete": true (atomic rename) are written; then `.convert/` is removed.

Rerunning the same conversion after an interruption (even SIGKILL) resumes: slices listed in
the progress record are skipped, the others rewritten. A different source or dtype in a
directory holding an unfinished conversion is refused (`overwrite` or a new `out`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorstore as ts

from hunyuan_jax.checkpoints import converted as fmt
from hunyuan_jax.checkpoints import hf_mapping
from hunyuan_jax.checkpoints.convert import plan as planning
from hunyuan_jax.checkpoints.convert.common import (
    carried_files,
    default_log,
    np_dtype,
    own_peak_rss_bytes,
    progress_bar,
)
from hunyuan_jax.checkpoints.hf_tensors import hf_slice, to_slice
from hunyuan_jax.errors import CheckpointError
from hunyuan_jax.model.quantize import QTYPES


class _ProgressRecord:
    """Append-only record of written slices (`{"k": hf key}` lines). A key is appended only
    after tensorstore's write of that slice completed, and tensorstore fsyncs each file it
    writes (`file_io_sync`), so a recorded slice is durable. Lines are flushed at once (a
    killed process loses nothing recorded) and fsync'd every `sync_seconds` and at the end (a
    power loss can only forget slices, which are then redone)."""

    def __init__(self, path: Path, sync_seconds: float):
        self.path, self.sync_seconds = path, sync_seconds
        self.last = time.monotonic()

    def __enter__(self):
        self.f = open(self.path, "a")
        return self

    def add(self, key: str) -> None:
        self.f.write(json.dumps({"k": key}) + "\n")
        self.f.flush()
        if time.monotonic() - self.last >= self.sync_seconds:
            self.sync()

    def sync(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.last = time.monotonic()

    def __exit__(self, *exc):
        try:
            self.sync()
        finally:
            self.f.close()


def _create_arrays(
    params_dir: Path, leaves, chunk_bytes: int, compression: str, checksum: str
) -> dict:
    """{leaf path: tensorstore array}, created empty (or reopened when resuming)."""
    params_dir.mkdir(parents=True, exist_ok=True)
    # file_io_sync (tensorstore's default): each shard file is fsync'd before its write
    # completes; no chunk cache (every byte is written once and never read back).
    ctx = ts.Context({"cache_pool": {"total_bytes_limit": 0}, "file_io_sync": True})
    arrays = {}
    for leaf in leaves.values():
        spec = fmt.array_spec(
            params_dir,
            leaf.name,
            leaf.shape,
            leaf.dtype,
            leaf.shard_shape,
            fmt.choose_chunk_shape(leaf.shard_shape, leaf.dtype.itemsize, chunk_bytes),
            compression,
            checksum,
        )
        try:
            arrays[leaf.path] = ts.open(spec, create=True, open=True, context=ctx).result()
        except ValueError as e:
            raise CheckpointError(
                f"{params_dir / leaf.name}: existing array does not match "
                f"the plan ({e}); use --overwrite"
            ) from e
    return arrays


def _stream(todo, prepare, arrays, infos, record, bar, workers, max_inflight_bytes, itemsize):
    """Pipeline: `workers` threads read + transpose upcoming tensors while tensorstore encodes
    and writes up to `workers` slices. A new tensor starts only while the tensors in flight
    (being prepared or written) total at most `max_inflight_bytes`, or when nothing else is in
    flight (a tensor larger than the budget goes alone): peak RAM is about the start-up
    footprint plus 3 x max(budget, largest tensor), whatever the number of layers."""
    workers = max(1, workers)
    reads, writes = deque(), deque()
    inflight = 0

    def cost(item):
        leaf, key = item[0], item[3]
        return max(infos[key].nbytes, math.prod(leaf.shard_shape) * itemsize)

    def promote():  # oldest prepared tensor -> tensorstore writes (values, and scales)
        item, fut, n = reads.popleft()
        pieces = fut.result()
        _, _, index, key = item
        futs = []
        for path, piece in pieces.items():
            target = arrays[path][index] if index else arrays[path]
            futs.append(target.write(piece))
        writes.append((futs, key, infos[key].nbytes, n))

    def retire():  # oldest writes done -> recorded; their memory is free
        nonlocal inflight
        futs, key, nbytes, n = writes.popleft()
        try:
            for fut in futs:
                fut.result()
        except Exception as e:
            raise CheckpointError(f"writing the slice of {key!r} failed: {e}") from e
        record.add(key)
        bar.update(nbytes)
        inflight -= n

    def step():
        if reads and len(writes) < workers:
            promote()
        else:
            retire()

    with ThreadPoolExecutor(workers, thread_name_prefix="convert") as pool:
        try:
            for item in todo:
                n = cost(item)
                while (reads or writes) and (
                    inflight + n > max_inflight_bytes or len(reads) >= workers
                ):
                    step()
                reads.append((item, pool.submit(prepare, item), n))
                inflight += n
                while writes and all(f.done() for f in writes[0][0]):
                    retire()
                while reads and reads[0][1].done() and len(writes) < workers:
                    promote()
            while reads or writes:
                step()
        except BaseException:
            for _, f, _ in reads:
                f.cancel()
            raise


def hf_to_jax(
    hf_dir: str | Path,
    out: str | Path,
    dtype: str | None = None,
    *,
    tokenizer_dir: str | Path | None = None,
    compression: str = "zstd",
    checksum: str = "crc32c",
    chunk_mb: float = 4.0,
    overwrite: bool = False,
    progress: bool = True,
    workers: int = 2,
    max_inflight_bytes: int = 1 << 30,
    sync_seconds: float = 10.0,
    quantize: str | None = None,
    group_size: int | None = None,
    log=None,
) -> dict:
    """Convert a HF checkpoint directory into `out` (see the module docstring); returns the
    manifest. `dtype` None keeps the source dtype (bfloat16 for FP8 sources). `checksum`
    "crc32c" (every chunk checked on every read) or "none" (only to measure their cost).
    `quantize` 'int8' | 'fp8' | 'int4' | 'int4-experts' stores the matmul weights quantized
    (`hunyuan_jax.model.quantize`): values and scales, quantized slice by slice as they
    stream (int4: bfloat16 scales, one per group along the contraction, each weight's group
    `quantize.int4_group` of the target `group_size`, default `RuntimePolicy.int4_group_size`;
    int8 / fp8: float32 scales per channel); an FP8 source's e4m3 weights and scales are stored as
    they are with 'fp8' (and dequantized in float32, then quantized, otherwise); `dtype` is
    then the dtype of the other parameters."""
    log = log or default_log
    t0 = time.time()
    hf_dir, out = Path(hf_dir), Path(out)
    cfg, ckpt, infos, leaves, hf_config, fp8 = planning.plan_hf_to_jax(
        hf_dir, dtype, quantize, group_size
    )
    dtype = np.dtype(leaves[("embed",)].dtype).name
    chunk_bytes = int(chunk_mb * (1 << 20))
    group_size = _group_size(leaves)
    plan = planning.output_plan(
        ckpt, dtype, compression, chunk_bytes, checksum, quantize, group_size
    )
    state = planning.prepare_out(out, plan, overwrite, log)
    if state == "done":
        log(f"{out} already holds this conversion, complete; nothing to do")
        return fmt.read_manifest(out)

    items = planning.work_items(cfg, infos, leaves)
    work = out / fmt.WORK_DIR
    done = planning.read_progress(out) if state == "resume" else set()
    todo = [it for it in items if it[3] not in done]
    need = sum(
        math.prod(l.shard_shape) * l.dtype.itemsize
        + (
            0
            if (sl := fmt.scale_leaf(leaves, e.path)) is None
            else math.prod(sl.shard_shape) * sl.dtype.itemsize
        )
        for l, e, _, _ in todo
    )
    probe = out if out.exists() else out.parent
    probe.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(probe).free
    if need > free:
        raise CheckpointError(
            f"not enough disk space in {probe}: the conversion needs up to "
            f"{need / 1e9:.1f} GB more, {free / 1e9:.1f} GB free"
        )
    if state == "fresh":
        work.mkdir(parents=True, exist_ok=True)
        fmt.write_json_atomic(work / planning.PLAN, plan)
        log(
            f"converting {len(items)} tensors ({sum(infos[k].nbytes for *_, k in items) / 1e9:.2f}"
            f" GB, {ckpt.format}{', FP8' if fp8 else ''}) from {hf_dir} to {out} as {dtype}"
            + (f", matmul weights {quantize}" if quantize else "")
            + (f" (int4 groups of {group_size})" if group_size else "")
        )
        if fp8 and not quantize:
            log("the source stores FP8 weights: --quantize fp8 keeps them (and their scales)")
    else:
        log(f"resuming: {len(items) - len(todo)} of {len(items)} tensors already written")

    params_dir = out / fmt.PARAMS_DIR
    arrays = _create_arrays(params_dir, leaves, chunk_bytes, compression, checksum)
    out_dtype = np_dtype(dtype)

    def prepare(item):
        """Read one HF tensor and make its slice(s) of the stacked leaf: {leaf path: piece}.
        FP8 tensors are dequantised unless they are stored quantized (then read as stored,
        with their scale)."""
        leaf, entry, index, key = item
        scale_leaf = fmt.scale_leaf(leaves, entry.path)
        quantized = scale_leaf is not None
        tensor, scale = ckpt.read_with_scale(key) if quantized else (ckpt.read(key), None)
        want = hf_mapping.hf_shape(entry, leaf.shape)
        if tuple(tensor.shape) != tuple(want):
            raise CheckpointError(
                f"{hf_dir / infos[key].file}: tensor {key!r} has shape "
                f"{tuple(tensor.shape)}, expected {want}"
            )
        if not quantized:
            return {leaf.path: to_slice(entry, tensor, leaf.shape, out_dtype)}
        form = fmt.leaves_form(leaves)
        pieces = hf_slice(
            entry, tensor, leaf.shape, form, scale, key=key, scale_shape=scale_leaf.shape
        )
        return {leaf.path: pieces["qvalue"], scale_leaf.path: pieces["scale"]}

    bar = progress_bar(sum(infos[k].nbytes for *_, k in todo), "hf-to-jax", progress)
    with _ProgressRecord(work / planning.PROGRESS, sync_seconds) as record:
        _stream(
            todo,
            prepare,
            arrays,
            infos,
            record,
            bar,
            workers,
            max_inflight_bytes,
            4 if quantize else out_dtype.itemsize,  # quantizing works on a float32 slice
        )
    bar.close()

    # Finalise: orbax metadata, config, tokenizer / remote-code files, then the manifest.
    fmt.write_orbax_metadata(params_dir, leaves)
    out_config = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    out_config["torch_dtype"] = dtype
    fmt.write_json_atomic(out / fmt.CONFIG, out_config)
    carried = carried_files(hf_dir, tokenizer_dir)
    for name, src in carried.items():
        shutil.copyfile(src, out / name)
    manifest = _manifest(plan, fp8, leaves, hf_config, sorted(carried), chunk_bytes)
    manifest["weights"] = stored_weights(leaves, fp8_source=fp8)
    seconds = time.time() - t0
    src_bytes = sum(infos[k].nbytes for *_, k in todo)
    manifest["stats"] = {
        "seconds": round(seconds, 3),
        "source_bytes_this_run": src_bytes,
        "mb_per_s": round(src_bytes / 1e6 / max(seconds, 1e-9), 1),
        "peak_rss_mb": round(own_peak_rss_bytes() / 1e6, 1),
        "resumed": state == "resume",
    }
    fmt.write_json_atomic(out / fmt.MANIFEST, manifest)
    shutil.rmtree(work, ignore_errors=True)
    log(
        f"done: {out} ({manifest['params']['bytes'] / 1e9:.2f} GB params, {seconds:.1f} s, "
        f"{manifest['stats']['mb_per_s']} MB/s, peak RSS {manifest['stats']['peak_rss_mb']} MB)"
    )
    return manifest


def _manifest(plan, fp8, leaves, hf_config, tokenizer_files, chunk_bytes) -> dict:
    """The manifest of a complete conversion (stats are added by the caller)."""
    return {
        "format": fmt.FORMAT_NAME,
        "version": fmt.FORMAT_VERSION,
        "complete": True,
        "dtype": plan["dtype"],
        "plan": plan,
        "source": dict(plan["source"], fp8=fp8),
        "params": dict(
            plan["layout"],
            bytes=sum(l.nbytes for l in leaves.values()),
            leaves={
                l.name: {
                    "shape": list(l.shape),
                    "dtype": np.dtype(l.dtype).name,
                    "shard_shape": list(l.shard_shape),
                    "chunk_shape": list(
                        fmt.choose_chunk_shape(l.shard_shape, l.dtype.itemsize, chunk_bytes)
                    ),
                }
                for l in leaves.values()
            },
        ),
        "hf_config": hf_config,
        "tokenizer_files": tokenizer_files,
        "created_unix": int(time.time()),
    }


def _groups(leaves) -> dict[str, int]:
    """{weight leaf name: int4 group} of the stored int4 weights (values per scale:
    `quantize.int4_group` chose each from the target group size)."""
    return {
        leaf.name.removesuffix(".array.qvalue.value"): math.prod(leaf.shape)
        // math.prod(leaves[leaf.path[:-1] + ("scale",)].shape)
        for leaf in leaves.values()
        if leaf.role == "qvalue" and leaf.dtype == QTYPES["int4"]
    }


def _group_size(leaves) -> int | None:
    """The int4 group size of stored int4 leaves, None without int4: the largest group of an
    int4 weight, the target that gives every weight its stored group again (`int4_group`
    takes the largest qualifying group <= the target, so a target between a weight's group
    and the next qualifying one gives the same)."""
    return max(_groups(leaves).values(), default=None)


def stored_weights(leaves, fp8_source: bool = False) -> dict:
    """The manifest's "weights" record: how the matmul weights are stored. Orbax casts to the
    restore target's dtype without a word, so the loader builds its target from this."""
    # the module (`hf_to_jax`'s argument `quantize` is the form asked for)
    from hunyuan_jax.model import quantize

    form = fmt.leaves_form(leaves)
    if form == "float":
        return {"form": "float", "dtype": np.dtype(leaves[("embed",)].dtype).name}
    channel = "per output channel (1 on the contracted dims; layers and exp channelwise)"
    if form not in quantize.QTYPES:  # int4-experts
        return {
            "form": form,
            "dtype": "int4 (routed experts) + int8 (attention, shared expert)",
            "scale_dtype": "bfloat16 (int4), float32 (int8)",
            "scales": f"int4: per output channel and group (at most {_group_size(leaves)} "
            f"values, 'groups') along the contraction; int8: {channel}",
            "calibration": "absmax",
            "group_size": _group_size(leaves),
            "groups": _groups(leaves),
        }
    record = {
        "form": form,
        "dtype": quantize.QTYPES[form].name,
        "scale_dtype": quantize.scale_dtype(form).name,
        "scales": channel,
        "calibration": "the source's FP8 scales" if fp8_source and form == "fp8" else "absmax",
    }
    if form == "int4":
        group = _group_size(leaves)
        record["scales"] = (
            f"per output channel and group (at most {group} values, 'groups') along the contraction"
        )
        record["group_size"] = group
        record["groups"] = _groups(leaves)
    return record
