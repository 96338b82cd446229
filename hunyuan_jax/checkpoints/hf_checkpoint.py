"""Reading Hugging Face checkpoints one tensor at a time (safetensors or PyTorch `.bin` shards,
via their index files), checking them against the model, and loading them into a parameter
tree in memory (fine for small models; `hunyuan_jax.checkpoints.convert` streams the large ones).

`HFCheckpoint.tensor_infos()` scans every shard named by the index (with `shard_files`' header
scans) and reports missing or truncated shards and absent tensors up front;
`HFCheckpoint.read(key)` reads one tensor with plain file reads, dequantising FP8 weights.

An FP8 release's weights (`fp8_scales`: float8 `*.weight` with a float32 `*.weight_scale`) are
dequantised on read, rounded to bfloat16 (`fp8_scales.dequantize`), or read as stored with
their scale (`read_with_scale`); activation / KV scales are dropped.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from hunyuan_jax.checkpoints import fp8_scales, hf_mapping
from hunyuan_jax.checkpoints.shard_files import (
    TensorInfo,
    read_tensor,
    scan_safetensors,
    scan_torch_bin,
)
from hunyuan_jax.errors import CheckpointError, MissingShardError  # noqa: F401 (re-exported)
from hunyuan_jax.model.config import ModelConfig

dequantize_fp8 = fp8_scales.dequantize  # the name tests/test_convert.py imports

_INDEXES = (
    ("model.safetensors.index.json", "safetensors"),
    ("pytorch_model.bin.index.json", "bin"),
)
_SINGLE = (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin"))


class HFCheckpoint:
    """Lazy view of a HF checkpoint directory: key -> shard file, shapes, one tensor at a time."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {self.dir}")
        self.format, self.weight_map = self._read_index()
        self._open_file: str | None = None
        self._open_handle = None

    def _read_index(self) -> tuple[str, dict[str, str]]:
        for name, fmt in _INDEXES:
            path = self.dir / name
            if path.is_file():
                try:
                    index = json.loads(path.read_text())
                    weight_map = index["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                    raise CheckpointError(f"{path}: not a valid index file ({e})") from e
                return fmt, _checked_weight_map(path, weight_map)
        for name, fmt in _SINGLE:
            if (self.dir / name).is_file():
                self._open_file = None
                keys = self._keys_of_single(name, fmt)
                return fmt, {k: name for k in keys}
        raise FileNotFoundError(
            f"{self.dir}: no checkpoint found (looked for "
            f"{', '.join(n for n, _ in _INDEXES + _SINGLE)})"
        )

    def _keys_of_single(self, name: str, fmt: str) -> list[str]:
        self.format = fmt  # file_infos reads the header by format (no torch, no pickle)
        return list(self.file_infos(name))

    @property
    def keys(self) -> list[str]:
        return list(self.weight_map)

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def _handle(self, name: str, fmt: str | None = None):
        fmt = fmt or self.format
        if self._open_file == name:
            return self._open_handle
        path = self.dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{self.dir}: shard {name} named by the index is missing")
        try:
            if fmt == "safetensors":
                handle = safe_open(str(path), framework="numpy")
            else:
                try:
                    import torch
                except ImportError as e:  # torch is an optional extra
                    raise ImportError(
                        "reading PyTorch .bin checkpoints needs torch: "
                        "pip install 'hunyuan-jax[torch]'"
                    ) from e
                scan_torch_bin(path)  # refuses unsafe pickles and truncation in one clear line
                handle = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        except (
            OSError,
            RuntimeError,
            ValueError,
            EOFError,
            pickle.UnpicklingError,
            SafetensorError,  # derives from Exception only
        ) as e:
            msg = " ".join(str(e).split())[:300]
            raise CheckpointError(
                f"{path}: cannot read shard (truncated, corrupt or unsafe): {msg}"
            ) from None
        self._open_file, self._open_handle = name, handle
        return handle

    def get(self, key: str) -> np.ndarray:
        """One tensor as a numpy array in its stored dtype (bfloat16 via ml_dtypes)."""
        if key not in self.weight_map:
            raise CheckpointError(f"{self.dir}: tensor {key!r} not in the checkpoint")
        if fp8_scales.scale_key(key) in self.weight_map:  # FP8 release: dequantise to bfloat16
            return self.read(key)
        name = self.weight_map[key]
        handle = self._handle(name)
        try:
            if self.format == "safetensors":
                if key not in handle.keys():
                    raise CheckpointError(
                        f"{self.dir / name}: tensor {key!r} listed in the "
                        f"index but absent from the shard"
                    )
                return _safetensors_get(self.dir / name, handle, key)
            if key not in handle:
                raise CheckpointError(
                    f"{self.dir / name}: tensor {key!r} listed in the index "
                    f"but absent from the shard"
                )
            return _torch_to_numpy(handle[key])
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{self.dir / name}: cannot read {key!r}: {e}") from e

    # Streaming access: headers only, then one tensor by plain reads ----------------------
    def file_infos(self, name: str) -> dict[str, TensorInfo]:
        """The tensors of one shard file (header only), cached."""
        cache = self.__dict__.setdefault("_infos", {})
        if name not in cache:
            path = self.dir / name
            if not path.is_file():
                raise MissingShardError(f"{self.dir}: shard {name} named by the index is missing")
            scan = scan_safetensors if self.format == "safetensors" else scan_torch_bin
            cache[name] = scan(path)
        return cache[name]

    def tensor_infos(self) -> dict[str, TensorInfo]:
        """Every indexed tensor's TensorInfo, reading only the shards' headers. Raises one
        CheckpointError listing missing shards, unreadable / truncated shards and tensors the
        index names but the shard lacks."""
        problems, out = [], {}
        missing = [n for n in self.files if not (self.dir / n).is_file()]
        if missing:
            raise MissingShardError(
                f"{self.dir}: {len(missing)} shard file(s) named by the index are missing: "
                + ", ".join(missing[:10])
                + (" ..." if len(missing) > 10 else "")
            )
        for name in self.files:
            try:
                infos = self.file_infos(name)
            except CheckpointError as e:
                problems.append(str(e))
                continue
            for key, file in self.weight_map.items():
                if file != name:
                    continue
                if key not in infos:
                    problems.append(
                        f"{self.dir / name}: tensor {key!r} listed in the index but "
                        f"absent from the shard"
                    )
                else:
                    out[key] = infos[key]
        if problems:
            raise CheckpointError(
                f"checkpoint {self.dir} is unreadable:\n  " + "\n  ".join(problems[:20])
            )
        return out

    def info(self, key: str) -> TensorInfo:
        if key not in self.weight_map:
            raise CheckpointError(f"{self.dir}: tensor {key!r} not in the checkpoint")
        infos = self.file_infos(self.weight_map[key])
        if key not in infos:
            raise CheckpointError(
                f"{self.dir / self.weight_map[key]}: tensor {key!r} listed in "
                f"the index but absent from the shard"
            )
        return infos[key]

    def read(self, key: str, dequantize: bool = True) -> np.ndarray:
        """One tensor by plain file reads (resident memory: this tensor only). FP8 weights
        with a `*_scale` tensor are dequantised to bfloat16 unless `dequantize=False`."""
        info = self.info(key)
        arr = read_tensor(self.dir, info)
        if dequantize and fp8_scales.is_fp8(info.dtype):
            arr = fp8_scales.dequantize(arr, self._scale_of(key, info), key=key)
        return arr

    def read_with_scale(self, key: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(one tensor as stored, its `weight_scale` when it is an FP8 release's weight)."""
        info = self.info(key)
        arr = read_tensor(self.dir, info)
        return arr, self._scale_of(key, info) if fp8_scales.is_fp8(info.dtype) else None

    def _scale_of(self, key: str, info: TensorInfo) -> np.ndarray:
        skey = fp8_scales.scale_key(key)
        if skey not in self.weight_map:
            raise CheckpointError(
                f"{self.dir / info.file}: FP8 tensor {key!r} has no scale tensor {skey!r}"
            )
        return read_tensor(self.dir, self.info(skey))

    def shape(self, key: str) -> tuple[int, ...]:
        name = self.weight_map[key]
        handle = self._handle(name)
        present = key in (handle.keys() if self.format == "safetensors" else handle)
        if not present:
            raise CheckpointError(
                f"{self.dir / name}: tensor {key!r} listed in the index but absent from the shard"
            )
        if self.format == "safetensors":
            return tuple(handle.get_slice(key).get_shape())
        return tuple(handle[key].shape)


def _checked_weight_map(path: Path, weight_map) -> dict[str, str]:
    """An index's weight_map: tensor name -> a shard file name inside the checkpoint directory
    (no absolute path, no '..', no sub-directory: a shard elsewhere would be read as this
    checkpoint's weights). CheckpointError names the index and the entry."""
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: 'weight_map' must be a non-empty object of key: file")
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{path}: weight_map[{key!r}] is {name!r}, not a file name")
        if Path(name).is_absolute() or Path(name).name != name or name in (".", ".."):
            raise CheckpointError(
                f"{path}: weight_map[{key!r}] = {name!r} points outside the checkpoint "
                f"directory (shards must be plain file names beside the index)"
            )
    return dict(weight_map)


def _safetensors_get(path, handle, key):
    try:
        return handle.get_tensor(key)
    except TypeError:  # bfloat16 is not a numpy dtype: read raw bytes
        with safe_open(str(path), framework="pt") as f:  # needs torch
            return _torch_to_numpy(f.get_tensor(key))


def _torch_to_numpy(t) -> np.ndarray:
    import torch  # an optional extra (pyproject `torch`): only PyTorch .bin shards need it

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def verify(cfg: ModelConfig, ckpt: HFCheckpoint, tree_shapes: dict[tuple, tuple]) -> None:
    """Every expected tensor present with the right shape, nothing unknown: else one clear error
    listing each problem with the tensor name, its file and both shapes."""
    problems, used = [], set()
    for entry in hf_mapping.mapping_table(cfg):
        tree_shape = tree_shapes[entry.path]
        want = hf_mapping.hf_shape(entry, tree_shape)
        for _, key in hf_mapping.hf_slices(entry, cfg):
            used.add(key)
            if key not in ckpt.weight_map:
                problems.append(f"missing tensor {key!r} (expected shape {want})")
                continue
            got = ckpt.shape(key)
            if tuple(got) != tuple(want):
                problems.append(
                    f"tensor {key!r} in {ckpt.weight_map[key]} has shape "
                    f"{tuple(got)}, expected {tuple(want)} for {entry.name}"
                )
    for key in ckpt.keys:
        if key not in used and not hf_mapping.ignorable_hf_key(key, cfg):
            problems.append(f"unexpected tensor {key!r} in {ckpt.weight_map[key]}")
    if problems:
        shown = problems[:20] + (
            [f"... and {len(problems) - 20} more"] if len(problems) > 20 else []
        )
        raise CheckpointError(
            f"checkpoint {ckpt.dir} does not match the model config:\n  " + "\n  ".join(shown)
        )


class HeaderView:
    """What `verify` reads of a checkpoint, answered from its scanned headers (`tensor_infos`):
    no tensor data, no torch, no pickle beyond plain state dicts of tensors."""

    def __init__(self, ckpt: HFCheckpoint, infos: dict[str, TensorInfo]):
        self.dir, self.weight_map, self._infos = ckpt.dir, ckpt.weight_map, infos

    @property
    def keys(self):
        return list(self.weight_map)

    def shape(self, key):
        return self._infos[key].shape
