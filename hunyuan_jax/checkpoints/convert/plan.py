"""Planning an HF -> JAX conversion before anything is written: scan and verify the source,
describe the output (the plan recorded in `.convert/plan.json` and the manifest), order the
work, and decide what an existing `--out` means (fresh, resume, already done, or refused).

Verification reads only the index and the headers of every shard (no tensor data): missing
shards, truncated shards and tensors absent from their shard are reported first; then every
expected key must be present with the shape the config implies and no unknown key may remain
(errors name the tensor, its file and both shapes); FP8 weights need their `weight_scale`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hunyuan_jax.checkpoints import converted as fmt
from hunyuan_jax.checkpoints import fp8_scales
from hunyuan_jax.checkpoints.convert.common import DTYPES, FLOAT_DTYPES, hf_tensors
from hunyuan_jax.checkpoints.hf_checkpoint import HeaderView, HFCheckpoint, verify
from hunyuan_jax.errors import CheckpointError, UsageError
from hunyuan_jax.model.config import ModelConfig, hf_config_path, read_hf_config
from hunyuan_jax.model.policy import INT4_GROUP_SIZE
from hunyuan_jax.model.quantize import QUANTIZED

PLAN, PROGRESS = fmt.WORK_PLAN, fmt.WORK_PROGRESS


def _open_source(hf_dir: Path) -> tuple[HFCheckpoint, dict]:
    if not hf_dir.is_dir():
        raise CheckpointError(f"--hf-dir {hf_dir}: no such directory")
    if not hf_config_path(hf_dir).is_file():
        raise CheckpointError(f"{hf_dir}: no config.json")
    try:
        ckpt = HFCheckpoint(hf_dir)
    except FileNotFoundError as e:  # no index and no single-file checkpoint
        raise CheckpointError(str(e)) from e
    return ckpt, read_hf_config(hf_dir)


def plan_hf_to_jax(
    hf_dir: str | Path,
    dtype: str | None = None,
    quantize: str | None = None,
    group_size: int | None = None,
):
    """Scan and verify a HF checkpoint. Returns (cfg, ckpt, infos, leaves, hf_config, fp8);
    `quantize` (a form of `quantize.QUANTIZED`) makes the matmul weights' leaves values +
    scales (int4: each weight in its `quantize.int4_group` for the target `group_size`,
    default `RuntimePolicy.int4_group_size`)."""
    hf_dir = Path(hf_dir)
    ckpt, hf_config = _open_source(hf_dir)
    cfg = ModelConfig.from_hf(hf_dir)
    infos = ckpt.tensor_infos()  # missing / truncated shards, absent tensors: before any write
    fp8 = any(fp8_scales.is_fp8(i.dtype) for i in infos.values())
    if dtype is None:
        dtype = str(hf_config.get("torch_dtype") or "")
        if fp8 or dtype not in DTYPES:
            emb = infos.get("model.embed_tokens.weight")
            dtype = (
                "bfloat16" if fp8 or emb is None or emb.dtype.name not in DTYPES else emb.dtype.name
            )
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if quantize not in (None,) + QUANTIZED:
        raise UsageError(f"--quantize must be one of {', '.join(QUANTIZED)}, got {quantize!r}")
    if group_size is not None and not (quantize or "").startswith("int4"):
        raise UsageError(f"--int4-group-size {group_size} needs --quantize int4 or int4-experts")
    leaves = fmt.param_leaves(cfg, dtype, quantize or "auto", group_size or INT4_GROUP_SIZE)
    shapes = {l.entry.path: l.shape for l in leaves.values() if l.role in ("value", "qvalue")}
    verify(cfg, HeaderView(ckpt, infos), shapes)
    problems = []
    for key, info in infos.items():
        problem = fp8_scales.scale_problem(key, infos)
        if problem is not None:
            problems.append(problem)
        elif not (
            fp8_scales.is_side_tensor(key)
            or info.dtype in FLOAT_DTYPES
            or fp8_scales.is_fp8(info.dtype)
        ):
            problems.append(f"tensor {key!r} in {info.file} has non-float dtype {info.dtype}")
    if problems:
        raise CheckpointError(f"checkpoint {hf_dir}:\n  " + "\n  ".join(problems[:20]))
    return cfg, ckpt, infos, leaves, hf_config, fp8


def output_plan(
    ckpt: HFCheckpoint,
    dtype: str,
    compression: str,
    chunk_bytes: int,
    checksum: str = "crc32c",
    quantize: str | None = None,
    group_size: int | None = None,
) -> dict:
    """What the output will be, recorded before the first write and compared on resume: the
    source files (names, sizes, mtimes), the stored dtype, the quantization of the matmul
    weights (only when quantized) and the on-disk layout."""
    files = []
    index = [
        n
        for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
        if (ckpt.dir / n).is_file()
    ]
    for name in index + ckpt.files:
        st = (ckpt.dir / name).stat()
        files.append({"name": name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    plan = {
        "format": fmt.FORMAT_NAME,
        "version": fmt.FORMAT_VERSION,
        "dtype": dtype,
        "source": {"dir": str(ckpt.dir.absolute()), "format": ckpt.format, "files": files},
        "layout": {
            "dir": fmt.PARAMS_DIR,
            "use_ocdbt": False,
            "use_zarr3": True,
            "compression": compression,
            "chunk_bytes": chunk_bytes,
            "checksum": checksum,
        },
    }
    if quantize:
        plan["quantize"] = quantize
    if group_size:
        plan["int4_group_size"] = group_size
    return plan


def work_items(cfg, infos, leaves) -> list[tuple]:
    """[(leaf, entry, index, hf key)] for every HF tensor, in (file, offset) order."""
    items = [(leaf, e, i, key) for key, (leaf, e, i, _) in hf_tensors(cfg, leaves).items()]
    items.sort(key=lambda it: (infos[it[3]].file, infos[it[3]].offset))
    return items


def read_progress(out: Path) -> set[str]:
    """The HF keys whose slices the progress record lists as written."""
    path = out / fmt.WORK_DIR / PROGRESS
    done = set()
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                done.add(json.loads(line)["k"])
            except (json.JSONDecodeError, KeyError, TypeError):
                pass  # a torn last line from a kill: that slice is simply redone
    return done


def prepare_out(out: Path, plan: dict, overwrite: bool, log) -> str:
    """'fresh' | 'resume' | 'done'; refuses to clobber unrelated or different outputs."""
    work = out / fmt.WORK_DIR
    manifest = out / fmt.MANIFEST

    def format_of(path):
        try:
            return json.loads(path.read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            return None

    # Only a directory that we wrote (our manifest or plan) is ever resumed or removed.
    ours = fmt.FORMAT_NAME in (format_of(manifest), format_of(work / PLAN))
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
            old = json.loads((work / PLAN).read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old != plan:
            raise CheckpointError(
                f"--out {out} holds an unfinished conversion of a different source, dtype, "
                f"quantization or layout (or the source files changed since); use --overwrite or another --out"
            )
        return "resume"
    return "fresh"
