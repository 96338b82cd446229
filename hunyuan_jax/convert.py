"""Checkpoint conversion, Hugging Face (PyTorch `.bin` or safetensors, bf16/fp32/FP8) <-> our
orbax/tensorstore layout, streaming one tensor at a time. Usage::

    python -m hunyuan_jax.convert hf-to-jax --hf-dir D --out O [--dtype bfloat16]
        [--tokenizer-dir T] [--compression zstd|none] [--chunk-mb 4] [--workers 2]
        [--max-inflight-gb 1] [--overwrite] [--no-progress]
    python -m hunyuan_jax.convert jax-to-hf --ckpt O --out D [--dtype bfloat16]
        [--max-shard-gb 5] [--config C [--tree-prefix P]] [--overwrite] [--no-progress]

The output layout and the restore API (`checkpoint_format.restore_param_state(O, target)`)
are documented in `hunyuan_jax/checkpoint_format.py`. Errors exit with status 2 and one
message naming the file and tensor.

hf-to-jax
  1. Reads the index and only the headers of every shard (no tensor data): missing shards,
     truncated shards and tensors absent from their shard are reported before anything is
     written; then every expected key must be present with the shape the config implies and
     no unknown key may remain (errors name the tensor, its file and both shapes); FP8
     weights need their `weight_scale`; the free disk space must hold the output.
  2. Creates every parameter as an empty zarr3 array (see `checkpoint_format` for the layout)
     and records the plan (source files with sizes and mtimes, dtype, layout) in
     `O/.convert/plan.json`.
  3. Streams the HF tensors in file order: read one tensor with plain file reads (no memory
     map), dequantise FP8, transpose / cast it into its slice of the stacked leaf (on
     `--workers` threads), write that slice (one zarr3 shard file) while the next ones are
     read; each completed (fsync'd) slice is appended to `O/.convert/progress.jsonl`, so
     the record never lists data that is not on disk. Peak RAM is the
     start-up footprint (~250 MB: Python, jax, tensorstore) plus about 3 x max(1 GB budget of
     tensors in flight, largest single tensor), independent of the number of layers.
  4. Writes orbax's `_METADATA`, `config.json`, the tokenizer files and finally
     `manifest.json` with "complete": true (atomic rename); then removes `.convert/`.
  Rerunning the same command after an interruption (even SIGKILL) resumes: slices listed in
  the progress record are skipped, the others rewritten. A different source or dtype in a
  directory holding an unfinished conversion is refused (use --overwrite or a new --out).

jax-to-hf
  Reads a converted checkpoint (or any orbax params checkpoint plus --config) one stacked
  slice at a time with tensorstore and writes sharded safetensors (`model-0000i-of-0000n`)
  with `model.safetensors.index.json`, `config.json` (the source's, torch_dtype updated) and
  the tokenizer / remote-code files: the layout the original PyTorch code loads. In the same
  dtype, HF -> JAX -> HF is bit-exact.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from hunyuan_jax import checkpoint_format as fmt
from hunyuan_jax import hf_mapping
from hunyuan_jax.config import ModelConfig
from hunyuan_jax.hf_checkpoint import (
    FP8_DTYPES,
    ST_DTYPE_NAMES,
    CheckpointError,
    HFCheckpoint,
    fp8_scale_key,
    is_quant_aux_key,
    verify,
)

_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_FLOAT_DTYPES = {np.dtype(d) for d in (np.float64, np.float32, np.float16, ml_dtypes.bfloat16)}
_KILL_ENV = "HUNYUAN_CONVERT_KILL_AFTER"  # test hook: SIGKILL self after N recorded slices


# ----------------------------------------------------------------------------- small helpers
def _vmhwm_bytes(pid: int | str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM), in bytes."""
    peak = _vmhwm_bytes("self")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_measuring_peak_rss(cmd: list[str], env=None) -> tuple[int, int, float, str]:
    """Run `cmd`; (return code, its peak RSS in bytes, seconds, stderr). The peak is the child's
    VmHWM polled from /proc while it runs, not wait4's ru_maxrss: Linux carries the parent's
    high-water mark into a child across fork + exec, so a child of a 700 MB pytest process
    would report >= 700 MB."""
    import subprocess
    import threading

    t0 = time.time()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()))
    reader.start()
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _vmhwm_bytes(proc.pid) or 0)
        time.sleep(0.05)
    reader.join()
    return proc.returncode, peak, time.time() - t0, err[0] if err else ""


def transpose2d(a: np.ndarray, block: int = 128) -> np.ndarray:
    """Contiguous `a.T` of a 2-D array, copied in cache-sized tiles (numpy's plain transposing
    copy of 2-byte elements runs at a fraction of memory bandwidth)."""
    rows, cols = a.shape
    out = np.empty((cols, rows), a.dtype)
    if rows * cols <= block * block:
        out[...] = a.T
        return out
    for r in range(0, rows, block):
        src = a[r : r + block]
        for c in range(0, cols, block):
            out[c : c + block, r : r + block] = src[:, c : c + block].T
    return out


def to_slice(entry: hf_mapping.TensorMap, tensor: np.ndarray, tree_shape, dtype) -> np.ndarray:
    """`hf_mapping.to_tree_slice(entry, tensor, tree_shape).astype(dtype)`, contiguous, with a
    tiled transpose, casting on the side of the smaller itemsize."""
    shape = hf_mapping.slice_shape(entry, tree_shape)
    dtype = np.dtype(dtype)
    if not entry.transpose:
        return np.ascontiguousarray(tensor.astype(dtype, copy=False)).reshape(shape)
    t = tensor.reshape(tensor.shape[0], -1)
    if dtype.itemsize < t.dtype.itemsize:
        return transpose2d(t.astype(dtype)).reshape(shape)
    return transpose2d(t).astype(dtype, copy=False).reshape(shape)


def to_hf(entry: hf_mapping.TensorMap, tree_slice: np.ndarray, dtype) -> np.ndarray:
    """`hf_mapping.to_hf_tensor(entry, tree_slice).astype(dtype)` with a tiled transpose."""
    dtype = np.dtype(dtype)
    if not entry.transpose:
        return np.ascontiguousarray(tree_slice.astype(dtype, copy=False))
    s = tree_slice.shape
    t = tree_slice.reshape(math.prod(s[: entry.in_ndim]), math.prod(s[entry.in_ndim :]))
    if dtype.itemsize < t.dtype.itemsize:
        return transpose2d(t.astype(dtype))
    return transpose2d(t).astype(dtype, copy=False)


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        disable=not enabled,
        dynamic_ncols=True,
        smoothing=0.1,
        file=sys.stderr,
    )


def _dtype_name(dtype) -> str:
    return np.dtype(dtype).name


class _InfoView:
    """What `hf_checkpoint.verify` reads of a checkpoint, answered from scanned headers."""

    def __init__(self, ckpt: HFCheckpoint, infos):
        self.dir, self.weight_map, self._infos = ckpt.dir, ckpt.weight_map, infos

    @property
    def keys(self):
        return list(self.weight_map)

    def shape(self, key):
        return self._infos[key].shape


def _source_record(ckpt: HFCheckpoint) -> dict:
    files = []
    index = [
        n
        for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
        if (ckpt.dir / n).is_file()
    ]
    for name in index + ckpt.files:
        st = (ckpt.dir / name).stat()
        files.append({"name": name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"dir": str(ckpt.dir.absolute()), "format": ckpt.format, "files": files}


def _carried_files(*dirs) -> dict[str, Path]:
    """Tokenizer and remote-code files to carry along: {name: source path}."""
    out = {}
    for d in dirs:
        if d is None:
            continue
        d = Path(d)
        for name in fmt.TOKENIZER_FILES:
            if (d / name).is_file() and name not in out:
                out[name] = d / name
        for p in sorted(d.glob("*.py")):
            out.setdefault(p.name, p)
    return out


def _natural_key(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


# ----------------------------------------------------------------------------- hf -> jax
def plan_hf_to_jax(hf_dir: str | Path, dtype: str | None = None):
    """Scan and verify a HF checkpoint. Returns (cfg, ckpt, infos, leaves, hf_config, fp8)."""
    hf_dir = Path(hf_dir)
    ckpt = HFCheckpoint(hf_dir)
    hf_config = (
        json.loads((hf_dir / "config.json").read_text())
        if (hf_dir / "config.json").is_file()
        else None
    )
    if hf_config is None:
        raise CheckpointError(f"{hf_dir}: no config.json")
    cfg = ModelConfig.from_hf(hf_dir)
    infos = ckpt.tensor_infos()  # missing / truncated shards, absent tensors: before any write
    fp8 = any(i.dtype in FP8_DTYPES for i in infos.values())
    if dtype is None:
        src = str(hf_config.get("torch_dtype") or "")
        if fp8 or src not in _DTYPES:
            emb = infos.get("model.embed_tokens.weight")
            src = (
                "bfloat16"
                if fp8 or emb is None or emb.dtype.name not in _DTYPES
                else (emb.dtype.name)
            )
        dtype = src
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    leaves = fmt.param_leaves(cfg, dtype)
    verify(cfg, _InfoView(ckpt, infos), {p: l.shape for p, l in leaves.items()})
    problems = []
    for key, info in infos.items():
        if is_quant_aux_key(key):
            if key.endswith(".weight_scale"):
                w = key[: -len("_scale")]
                if w not in infos or infos[w].dtype not in FP8_DTYPES:
                    problems.append(
                        f"{key!r} in {info.file}: a weight scale without an FP8 weight {w!r}"
                    )
            continue
        if info.dtype in FP8_DTYPES and fp8_scale_key(key) not in infos:
            problems.append(f"FP8 tensor {key!r} in {info.file} has no {fp8_scale_key(key)!r}")
        elif info.dtype not in _FLOAT_DTYPES and info.dtype not in FP8_DTYPES:
            problems.append(f"tensor {key!r} in {info.file} has non-float dtype {info.dtype}")
    if problems:
        raise CheckpointError(f"checkpoint {hf_dir}:\n  " + "\n  ".join(problems[:20]))
    return cfg, ckpt, infos, leaves, hf_config, fp8


def _work_items(cfg, ckpt, infos, leaves):
    """[(leaf, entry, index, hf key)] for every HF tensor, in (file, offset) order."""
    by_path = {l.path: l for l in leaves.values()}
    items = []
    for entry in hf_mapping.mapping_table(cfg):
        for index, key in hf_mapping.hf_slices(entry, cfg):
            items.append((by_path[entry.path], entry, index, key))
    items.sort(key=lambda it: (infos[it[3]].file, infos[it[3]].offset))
    return items


def _read_progress(path: Path) -> set[str]:
    done = set()
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                done.add(json.loads(line)["k"])
            except (json.JSONDecodeError, KeyError, TypeError):
                pass  # a torn last line from a kill: that slice is simply redone
    return done


def _prepare_out(out: Path, plan: dict, overwrite: bool, log) -> str:
    """'fresh' | 'resume' | 'done'; refuses to clobber unrelated or different outputs."""
    work = out / fmt.WORK_DIR
    manifest = out / fmt.MANIFEST

    def format_of(path):
        try:
            return json.loads(path.read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            return None

    # Only a directory that we wrote (our manifest or plan) is ever resumed or removed.
    ours = fmt.FORMAT_NAME in (format_of(manifest), format_of(work / "plan.json"))
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not ours:
        raise CheckpointError(
            f"--out {out} exists, is not empty and holds no conversion: refusing to write into it"
        )
    if ours and overwrite:
        log(f"--overwrite: removing the previous conversion in {out}")
        shutil.rmtree(out)
        return "fresh"
    if manifest.is_file():
        try:
            man = fmt.read_manifest(out)
        except CheckpointError:
            man = None
        if man and man.get("plan") == plan:
            return "done"
        raise CheckpointError(
            f"--out {out} holds a different complete conversion; use --overwrite or another --out"
        )
    if work.is_dir():
        try:
            old = json.loads((work / "plan.json").read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old != plan:
            raise CheckpointError(
                f"--out {out} holds an unfinished conversion of a different source, dtype or "
                f"layout (or the source files changed since); use --overwrite or another --out"
            )
        return "resume"
    return "fresh"


class _ProgressRecord:
    """Append-only record of written slices (`{"k": hf key}` lines). A key is appended only
    after tensorstore's write of that slice completed, and tensorstore fsyncs each file it
    writes (its default `file_io_sync`), so a recorded slice is durable. Lines are flushed at
    once (a killed process loses nothing recorded) and fsync'd every `sync_seconds` and at the
    end (a power loss can only forget slices, which are then redone)."""

    def __init__(self, path: Path, sync_seconds: float, kill_after: int = 0):
        self.path, self.sync_seconds, self.kill_after = path, sync_seconds, kill_after
        self.count, self.last = 0, time.monotonic()

    def __enter__(self):
        self.f = open(self.path, "a")
        return self

    def add(self, key: str) -> None:
        self.f.write(json.dumps({"k": key}) + "\n")
        self.f.flush()
        self.count += 1
        if time.monotonic() - self.last >= self.sync_seconds:
            self.sync()
        if self.kill_after and self.count >= self.kill_after:  # test hook
            os.kill(os.getpid(), signal.SIGKILL)

    def sync(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.last = time.monotonic()

    def __exit__(self, *exc):
        try:
            self.sync()
        finally:
            self.f.close()


def _finish_write(pending, record: _ProgressRecord, bar) -> None:
    fut, key, nbytes = pending
    try:
        fut.result()
    except Exception as e:
        raise CheckpointError(f"writing the slice of {key!r} failed: {e}") from e
    record.add(key)
    bar.update(nbytes)


def hf_to_jax(
    hf_dir: str | Path,
    out: str | Path,
    dtype: str | None = None,
    *,
    tokenizer_dir: str | Path | None = None,
    compression: str = "zstd",
    chunk_mb: float = 4.0,
    overwrite: bool = False,
    progress: bool = True,
    workers: int = 2,
    max_inflight_bytes: int = 1 << 30,
    sync_seconds: float = 10.0,
    log=None,
) -> dict:
    """Convert a HF checkpoint directory into `out` (see the module docstring); returns the
    manifest. `dtype` None keeps the source dtype (bfloat16 for FP8 sources)."""
    log = log or (lambda msg: print(f"[convert] {msg}", file=sys.stderr, flush=True))
    t0 = time.time()
    hf_dir, out = Path(hf_dir), Path(out)
    cfg, ckpt, infos, leaves, hf_config, fp8 = plan_hf_to_jax(hf_dir, dtype)
    dtype = _dtype_name(next(l.dtype for l in leaves.values() if l.path[0] == "embed"))
    chunk_bytes = int(chunk_mb * (1 << 20))
    layout = {
        "dir": fmt.PARAMS_DIR,
        "use_ocdbt": False,
        "use_zarr3": True,
        "compression": compression,
        "chunk_bytes": chunk_bytes,
    }
    plan = {
        "format": fmt.FORMAT_NAME,
        "version": fmt.FORMAT_VERSION,
        "dtype": dtype,
        "source": _source_record(ckpt),
        "layout": layout,
    }
    state = _prepare_out(out, plan, overwrite, log)
    if state == "done":
        log(f"{out} already holds this conversion, complete; nothing to do")
        return fmt.read_manifest(out)

    items = _work_items(cfg, ckpt, infos, leaves)
    work = out / fmt.WORK_DIR
    progress_path = work / "progress.jsonl"
    done = _read_progress(progress_path) if state == "resume" else set()
    todo = [it for it in items if it[3] not in done]
    out_bytes = sum(l.nbytes for l in leaves.values())
    need = sum(math.prod(l.shard_shape) * l.dtype.itemsize for l, _, _, _ in todo)
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
        fmt.write_json_atomic(work / "plan.json", plan)
        log(
            f"converting {len(items)} tensors ({sum(infos[k].nbytes for *_, k in items) / 1e9:.2f}"
            f" GB, {ckpt.format}{', FP8' if fp8 else ''}) from {hf_dir} to {out} as {dtype}"
        )
    else:
        log(f"resuming: {len(items) - len(todo)} of {len(items)} tensors already written")

    import tensorstore as ts

    params_dir = out / fmt.PARAMS_DIR
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
        )
        try:
            arrays[leaf.path] = ts.open(spec, create=True, open=True, context=ctx).result()
        except ValueError as e:
            raise CheckpointError(
                f"{params_dir / leaf.name}: existing array does not match "
                f"the plan ({e}); use --overwrite"
            ) from e

    kill_after = int(os.environ.get(_KILL_ENV, "0") or 0)
    np_dtype = np.dtype(_DTYPES[dtype])
    bar = _progress_bar(sum(infos[k].nbytes for *_, k in todo), "hf-to-jax", progress)
    record = _ProgressRecord(progress_path, sync_seconds, kill_after)

    def prepare(item):
        """Read one HF tensor (dequantised if FP8) and make its slice of the stacked leaf."""
        leaf, entry, index, key = item
        tensor = ckpt.read(key)
        want = hf_mapping.hf_shape(entry, leaf.shape)
        if tuple(tensor.shape) != tuple(want):
            raise CheckpointError(
                f"{hf_dir / infos[key].file}: tensor {key!r} has shape "
                f"{tuple(tensor.shape)}, expected {want}"
            )
        return to_slice(entry, tensor, leaf.shape, np_dtype)

    # Pipeline: `workers` threads read + transpose upcoming tensors while tensorstore encodes
    # and writes up to `workers` slices. A new tensor starts only while the tensors in flight
    # (being prepared or written) total at most `max_inflight_bytes`, or when nothing else is
    # in flight (a tensor larger than the budget goes alone): peak RAM is about the start-up
    # footprint plus 3 x max(budget, largest tensor), whatever the number of layers.
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    workers = max(1, workers)
    reads, writes = deque(), deque()
    inflight = 0

    def cost(item):
        key, leaf = item[3], item[0]
        return max(infos[key].nbytes, math.prod(leaf.shard_shape) * np_dtype.itemsize)

    def promote():  # oldest prepared tensor -> tensorstore write
        item, fut, n = reads.popleft()
        piece = fut.result()
        leaf, _, index, key = item
        target = arrays[leaf.path][index] if index else arrays[leaf.path]
        writes.append((target.write(piece), key, infos[key].nbytes, n))

    def retire():  # oldest write done -> recorded; its memory is free
        nonlocal inflight
        fut, key, nbytes, n = writes.popleft()
        _finish_write((fut, key, nbytes), record, bar)
        inflight -= n

    def step():
        if reads and len(writes) < workers:
            promote()
        else:
            retire()

    with record, ThreadPoolExecutor(workers, thread_name_prefix="convert") as pool:
        try:
            for item in todo:
                n = cost(item)
                while (reads or writes) and (
                    inflight + n > max_inflight_bytes or len(reads) >= workers
                ):
                    step()
                reads.append((item, pool.submit(prepare, item), n))
                inflight += n
                while writes and writes[0][0].done():
                    retire()
                while reads and reads[0][1].done() and len(writes) < workers:
                    promote()
            while reads or writes:
                step()
        except BaseException:
            for _, f, _ in reads:
                f.cancel()
            raise
    bar.close()

    # Finalise: orbax metadata, config, tokenizer / remote-code files, then the manifest.
    fmt.write_orbax_metadata(params_dir, leaves)
    out_config = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    out_config["torch_dtype"] = dtype
    fmt.write_json_atomic(out / fmt.CONFIG, out_config)
    carried = _carried_files(hf_dir, tokenizer_dir)
    for name, src in carried.items():
        shutil.copyfile(src, out / name)
    seconds = time.time() - t0
    src_bytes = sum(infos[k].nbytes for *_, k in todo)
    manifest = {
        "format": fmt.FORMAT_NAME,
        "version": fmt.FORMAT_VERSION,
        "complete": True,
        "dtype": dtype,
        "plan": plan,
        "source": dict(plan["source"], fp8=fp8),
        "params": dict(
            layout,
            bytes=out_bytes,
            leaves={
                l.name: {
                    "shape": list(l.shape),
                    "dtype": _dtype_name(l.dtype),
                    "shard_shape": list(l.shard_shape),
                    "chunk_shape": list(
                        fmt.choose_chunk_shape(l.shard_shape, l.dtype.itemsize, chunk_bytes)
                    ),
                }
                for l in leaves.values()
            },
        ),
        "hf_config": hf_config,
        "tokenizer_files": sorted(carried),
        "stats": {
            "seconds": round(seconds, 3),
            "source_bytes_this_run": src_bytes,
            "mb_per_s": round(src_bytes / 1e6 / max(seconds, 1e-9), 1),
            "peak_rss_mb": round(peak_rss_bytes() / 1e6, 1),
            "resumed": state == "resume",
        },
        "created_unix": int(time.time()),
    }
    fmt.write_json_atomic(out / fmt.MANIFEST, manifest)
    shutil.rmtree(work, ignore_errors=True)
    log(
        f"done: {out} ({out_bytes / 1e9:.2f} GB params, {seconds:.1f} s, "
        f"{manifest['stats']['mb_per_s']} MB/s, peak RSS {manifest['stats']['peak_rss_mb']} MB)"
    )
    return manifest


# ----------------------------------------------------------------------------- safetensors out
def safetensors_header(tensors: list[tuple[str, np.dtype, tuple]]) -> tuple[bytes, int]:
    """(8-byte length + JSON header padded to 8 bytes, data bytes) for tensors in order."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for key, dtype, shape in tensors:
        n = math.prod(shape) * np.dtype(dtype).itemsize
        header[key] = {
            "dtype": ST_DTYPE_NAMES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [off, off + n],
        }
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, off


def write_safetensors(path: str | Path, tensors, produce) -> int:
    """Stream a safetensors file: `tensors` [(key, dtype, shape)], `produce(key)` -> array
    called one tensor at a time in that order. Returns the data size."""
    head, size = safetensors_header(tensors)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(head)
        for key, dtype, shape in tensors:
            arr = produce(key)
            if arr.dtype != np.dtype(dtype) or tuple(arr.shape) != tuple(shape):
                raise CheckpointError(
                    f"{key}: produced {arr.dtype} {arr.shape}, header says "
                    f"{np.dtype(dtype)} {tuple(shape)}"
                )
            f.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return size


def _hf_order(key: str):
    m = re.match(r"model\.layers\.(\d+)\.(.*)", key)
    if m:
        return (1, int(m.group(1)), _natural_key(m.group(2)))
    return ({"model.embed_tokens.weight": 0, "model.norm.weight": 2}.get(key, 3), 0, [key])


# ----------------------------------------------------------------------------- jax -> hf
def jax_to_hf(
    ckpt: str | Path,
    out: str | Path,
    dtype: str | None = None,
    *,
    max_shard_bytes: int = 5 * 10**9,
    config: str | Path | None = None,
    tree_prefix: str = "",
    overwrite: bool = False,
    progress: bool = True,
    log=None,
) -> dict:
    """Export a converted checkpoint (or an orbax params checkpoint + `config`) as sharded
    safetensors + index + config.json. Returns the index dict."""
    log = log or (lambda msg: print(f"[convert] {msg}", file=sys.stderr, flush=True))
    t0 = time.time()
    ckpt, out = Path(ckpt), Path(out)
    if (ckpt / fmt.MANIFEST).is_file() or (ckpt / fmt.WORK_DIR).is_dir():
        man = fmt.read_manifest(ckpt)  # refuses incomplete conversions
        params_dir = ckpt / man["params"]["dir"]
        hf_config = json.loads((ckpt / fmt.CONFIG).read_text())
        cfg, _ = fmt.stored_config(ckpt)
        use_ocdbt, use_zarr3 = man["params"]["use_ocdbt"], man["params"]["use_zarr3"]
        extra_dir = ckpt
    else:
        if config is None:
            raise CheckpointError(
                f"{ckpt}: no {fmt.MANIFEST}; a bare orbax params checkpoint "
                f"needs --config (HF config.json or our YAML)"
            )
        params_dir = ckpt
        meta_path = params_dir / "_METADATA"
        if not meta_path.is_file():
            raise CheckpointError(
                f"{ckpt}: neither a converted checkpoint ({fmt.MANIFEST}) nor "
                f"an orbax checkpoint (_METADATA)"
            )
        meta = json.loads(meta_path.read_text())
        use_ocdbt = bool(meta.get("use_ocdbt"))
        use_zarr3 = bool(meta.get("use_zarr3"))
        from hunyuan_jax.loading import read_model_config

        cfg = read_model_config(config)
        hf_config = (
            json.loads(Path(config).read_text())
            if str(config).endswith(".json")
            else json.loads((Path(config) / "config.json").read_text())
            if Path(config).is_dir()
            else cfg.to_hf()
        )
        extra_dir = Path(config) if Path(config).is_dir() else None
    leaves = fmt.param_leaves(cfg, "float32")  # names and shapes only
    arrays = {}
    for leaf in leaves.values():
        name = tree_prefix + leaf.name
        arr = fmt.open_for_read(params_dir, name, use_ocdbt, use_zarr3)
        if tuple(arr.shape) != leaf.shape:
            raise CheckpointError(
                f"{params_dir}: parameter {name} has shape {tuple(arr.shape)}"
                f", the config implies {leaf.shape}"
            )
        arrays[leaf.path] = arr
    stored = np.dtype(next(iter(arrays.values())).dtype.numpy_dtype)
    out_dtype = np.dtype(_DTYPES[dtype]) if dtype else stored
    if dtype is None and stored.name not in _DTYPES:
        raise CheckpointError(f"stored dtype {stored} cannot be exported; pass --dtype")

    # Every HF tensor, in the usual order: embed, layers 0..L-1, norm (lm_head when untied).
    by_path = {l.path: l for l in leaves.values()}
    items = {}
    for entry in hf_mapping.mapping_table(cfg):
        leaf = by_path[entry.path]
        for index, key in hf_mapping.hf_slices(entry, cfg):
            items[key] = (leaf, entry, index, hf_mapping.hf_shape(entry, leaf.shape))
    keys = sorted(items, key=_hf_order)
    shards, cur, cur_bytes = [], [], 0
    for key in keys:
        n = math.prod(items[key][3]) * out_dtype.itemsize
        if cur and cur_bytes + n > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(key)
        cur_bytes += n
    if cur:
        shards.append(cur)

    index_name = "model.safetensors.index.json"
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"--out {out} exists and is not empty (use --overwrite)")
        for p in out.glob("model-*-of-*.safetensors"):
            p.unlink()
        (out / index_name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    total = sum(math.prod(items[k][3]) for k in keys) * out_dtype.itemsize
    bar = _progress_bar(total, "jax-to-hf", progress)

    def produce(key):
        leaf, entry, index, shape = items[key]
        src = arrays[leaf.path][index] if index else arrays[leaf.path]
        piece = src.read().result()
        arr = to_hf(entry, piece, out_dtype)
        bar.update(arr.nbytes)
        return arr

    weight_map, n = {}, len(shards)
    for i, group in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        write_safetensors(out / name, [(k, out_dtype, items[k][3]) for k in group], produce)
        weight_map.update({k: name for k in group})
    bar.close()
    config_out = dict(hf_config)
    config_out.pop("quantization_config", None)
    config_out["torch_dtype"] = out_dtype.name
    fmt.write_json_atomic(out / "config.json", config_out)
    for name, src in _carried_files(extra_dir).items():
        if name != "config.json":
            shutil.copyfile(src, out / name)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    fmt.write_json_atomic(out / index_name, index)  # last: the export is usable from here on
    seconds = time.time() - t0
    log(
        f"done: {out} ({n} shards, {total / 1e9:.2f} GB, {seconds:.1f} s, "
        f"{total / 1e6 / max(seconds, 1e-9):.0f} MB/s, peak RSS {peak_rss_bytes() / 1e6:.0f} MB)"
    )
    return index


# ----------------------------------------------------------------------------- synthetic input
def write_synthetic_hf(
    directory: str | Path,
    hf_config: dict,
    dtype: str = "bfloat16",
    shard_bytes: int = 1 << 30,
    seed: int = 0,
) -> int:
    """A random HF safetensors checkpoint for `hf_config` (tests and bench/convert.py), written
    one tensor at a time from a pool of random bytes. Returns its size in bytes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(dict(hf_config, torch_dtype=dtype)))
    cfg = ModelConfig.from_hf(directory)
    leaves = fmt.param_leaves(cfg, dtype)
    np_dtype = np.dtype(_DTYPES[dtype])
    tensors = []
    for entry in hf_mapping.mapping_table(cfg):
        leaf = next(l for l in leaves.values() if l.path == entry.path)
        for _, key in hf_mapping.hf_slices(entry, cfg):
            tensors.append((key, np_dtype, hf_mapping.hf_shape(entry, leaf.shape)))
    tensors.sort(key=lambda t: _hf_order(t[0]))
    rng = np.random.default_rng(seed)
    largest = max(math.prod(s) for _, _, s in tensors)
    # Finite values (random normal) so that casts behave; a pool reused at random offsets.
    pool = (rng.standard_normal(largest + 4096, np.float32) * 0.02).astype(np_dtype)
    shards, cur, size = [], [], 0
    for t in tensors:
        n = math.prod(t[2]) * np_dtype.itemsize
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += n
    shards.append(cur)
    weight_map, total = {}, 0

    def produce(key):
        shape = next(s for k, _, s in group if k == key)
        o = int(rng.integers(0, 4096))
        return pool[o : o + math.prod(shape)].reshape(shape)

    for i, group in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(directory / name, group, produce)
        weight_map.update({k: name for k, _, _ in group})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total


# ----------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m hunyuan_jax.convert", description=__doc__.split("\n\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-jax", help="HF checkpoint -> orbax/tensorstore params")
    a.add_argument("--hf-dir", required=True, help="HF checkpoint directory (index + shards)")
    a.add_argument("--out", required=True, help="output directory")
    a.add_argument(
        "--dtype",
        choices=sorted(_DTYPES),
        default=None,
        help="stored param dtype (default: the source's; bfloat16 for FP8)",
    )
    a.add_argument(
        "--tokenizer-dir",
        default=None,
        help="also carry the tokenizer files from here (hy.tiktoken, ...)",
    )
    a.add_argument("--compression", choices=("zstd", "none"), default="zstd")
    a.add_argument(
        "--chunk-mb",
        type=float,
        default=4.0,
        help="inner chunk size, the unit of partial reads at restore",
    )
    a.add_argument(
        "--workers",
        type=int,
        default=2,
        help="threads reading + transposing tensors, and tensorstore writes in flight",
    )
    a.add_argument(
        "--max-inflight-gb",
        type=float,
        default=1.0,
        help="tensors in flight at once, in GB (a larger single tensor goes alone); "
        "peak RAM ~ start-up + 3 x max(this, largest tensor)",
    )
    a.add_argument("--overwrite", action="store_true")
    a.add_argument("--no-progress", action="store_true")
    b = sub.add_parser("jax-to-hf", help="converted (orbax) params -> HF safetensors")
    b.add_argument(
        "--ckpt", required=True, help="converted checkpoint dir (or orbax params dir with --config)"
    )
    b.add_argument("--out", required=True)
    b.add_argument(
        "--dtype",
        choices=sorted(_DTYPES),
        default=None,
        help="exported dtype (default: the stored one)",
    )
    b.add_argument("--max-shard-gb", type=float, default=5.0)
    b.add_argument("--config", default=None, help="config for a bare orbax checkpoint")
    b.add_argument(
        "--tree-prefix",
        default="",
        help="name prefix of the params inside a bare orbax checkpoint, e.g. 'params.'",
    )
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "hf-to-jax":
            hf_to_jax(
                args.hf_dir,
                args.out,
                args.dtype,
                tokenizer_dir=args.tokenizer_dir,
                compression=args.compression,
                chunk_mb=args.chunk_mb,
                overwrite=args.overwrite,
                progress=not args.no_progress,
                workers=args.workers,
                max_inflight_bytes=int(args.max_inflight_gb * 2**30),
            )
        else:
            jax_to_hf(
                args.ckpt,
                args.out,
                args.dtype,
                max_shard_bytes=int(args.max_shard_gb * 1e9),
                config=args.config,
                tree_prefix=args.tree_prefix,
                overwrite=args.overwrite,
                progress=not args.no_progress,
            )
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
