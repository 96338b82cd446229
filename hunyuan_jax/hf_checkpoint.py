"""Reading Hugging Face checkpoints one tensor at a time (safetensors or PyTorch `.bin` shards,
via their index files), checking them against the model, and loading them into a parameter
tree in memory (fine for small models; `hunyuan_jax.convert` streams the large ones).
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np

from hunyuan_jax import hf_mapping
from hunyuan_jax.config import ModelConfig

_INDEXES = (("model.safetensors.index.json", "safetensors"),
            ("pytorch_model.bin.index.json", "bin"))
_SINGLE = (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin"))


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names the tensor, file and shapes."""


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
                    return fmt, dict(json.loads(path.read_text())["weight_map"])
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{path}: not a valid index file ({e})") from e
        for name, fmt in _SINGLE:
            if (self.dir / name).is_file():
                self._open_file = None
                keys = self._keys_of_single(name, fmt)
                return fmt, {k: name for k in keys}
        raise FileNotFoundError(
            f"{self.dir}: no checkpoint found (looked for "
            f"{', '.join(n for n, _ in _INDEXES + _SINGLE)})")

    def _keys_of_single(self, name: str, fmt: str) -> list[str]:
        return list(self._handle(name, fmt).keys())

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
                from safetensors import safe_open
                handle = safe_open(str(path), framework="numpy")
            else:
                try:
                    import torch
                except ImportError as e:  # torch is an optional extra
                    raise ImportError("reading PyTorch .bin checkpoints needs torch: "
                                      "pip install 'hunyuan-jax[torch]'") from e
                handle = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        except (OSError, RuntimeError, ValueError, EOFError) as e:
            raise CheckpointError(f"{path}: cannot read shard (truncated or corrupt?): {e}") from e
        self._open_file, self._open_handle = name, handle
        return handle

    def get(self, key: str) -> np.ndarray:
        """One tensor as a numpy array in its stored dtype (bfloat16 via ml_dtypes)."""
        if key not in self.weight_map:
            raise CheckpointError(f"{self.dir}: tensor {key!r} not in the checkpoint")
        name = self.weight_map[key]
        handle = self._handle(name)
        try:
            if self.format == "safetensors":
                if key not in handle.keys():
                    raise CheckpointError(f"{self.dir / name}: tensor {key!r} listed in the "
                                          f"index but absent from the shard")
                return _safetensors_get(self.dir / name, handle, key)
            if key not in handle:
                raise CheckpointError(f"{self.dir / name}: tensor {key!r} listed in the index "
                                      f"but absent from the shard")
            return _torch_to_numpy(handle[key])
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{self.dir / name}: cannot read {key!r}: {e}") from e

    def shape(self, key: str) -> tuple[int, ...]:
        if self.format == "safetensors":
            handle = self._handle(self.weight_map[key])
            return tuple(handle.get_slice(key).get_shape())
        return tuple(self._handle(self.weight_map[key])[key].shape)


def _safetensors_get(path, handle, key):
    try:
        return handle.get_tensor(key)
    except TypeError:  # bfloat16 is not a numpy dtype: read raw bytes
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:  # needs torch
            return _torch_to_numpy(f.get_tensor(key))


def _torch_to_numpy(t) -> np.ndarray:
    import torch
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
                problems.append(f"tensor {key!r} in {ckpt.weight_map[key]} has shape "
                                f"{tuple(got)}, expected {tuple(want)} for {entry.name}")
    for key in ckpt.keys:
        if key not in used and not hf_mapping.ignorable_hf_key(key, cfg):
            problems.append(f"unexpected tensor {key!r} in {ckpt.weight_map[key]}")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20
                                 else [])
        raise CheckpointError(f"checkpoint {ckpt.dir} does not match the model config:\n  "
                              + "\n  ".join(shown))


def load_numpy_params(cfg: ModelConfig, ckpt: HFCheckpoint, tree_shapes: dict[tuple, tuple],
                      dtype) -> dict[tuple, np.ndarray]:
    """All parameters in memory as {tree path: array}. For small checkpoints."""
    verify(cfg, ckpt, tree_shapes)
    out = {}
    for entry in hf_mapping.mapping_table(cfg):
        shape = tree_shapes[entry.path]
        arr = np.empty(shape, dtype)
        for index, key in hf_mapping.hf_slices(entry, cfg):
            arr[index] = hf_mapping.to_tree_slice(entry, ckpt.get(key), shape).astype(dtype)
        out[entry.path] = arr
    return out
