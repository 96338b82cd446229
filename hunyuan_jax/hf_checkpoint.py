"""Reading Hugging Face checkpoints one tensor at a time (safetensors or PyTorch `.bin` shards,
via their index files), checking them against the model, and loading them into a parameter
tree in memory (fine for small models; `hunyuan_jax.convert` streams the large ones).

Streaming access for the converter (no memory map, no torch needed): `scan_safetensors` /
`scan_torch_bin` read only a shard's header (safetensors JSON header; the zip directory and
`data.pkl` of a PyTorch `.bin`, unpickled without touching tensor data) into `TensorInfo`
records (dtype, shape, byte offset); `read_tensor` then reads exactly one tensor's bytes with
plain file reads, so resident memory is that tensor and nothing else (a memory map would keep
every touched page of a 10 GB shard resident). `HFCheckpoint.tensor_infos()` scans every shard
named by the index and reports missing or truncated shards and absent tensors up front;
`HFCheckpoint.read(key)` reads one tensor that way, dequantising FP8 weights.

FP8 checkpoints (AutoFP8 / vLLM "fp8": float8 e4m3 `*.weight` with a float32 `*.weight_scale`,
per tensor or per output channel, plus static activation scales `*.input_scale`) are
dequantised on read, `weight.astype(float32) * weight_scale`, rounded to bfloat16
(`dequantize_fp8`); activation / KV scales are dropped.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
import pickle
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError

from hunyuan_jax import hf_mapping
from hunyuan_jax.config import ModelConfig
from hunyuan_jax.errors import CheckpointError, MissingShardError  # noqa: F401 (re-exported)

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
                from safetensors import safe_open

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
        if fp8_scale_key(key) in self.weight_map:  # FP8 release: dequantise to bfloat16
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
        if dequantize and info.dtype in FP8_DTYPES:
            skey = fp8_scale_key(key)
            if skey not in self.weight_map:
                raise CheckpointError(
                    f"{self.dir / info.file}: FP8 tensor {key!r} has no scale tensor {skey!r}"
                )
            scale = read_tensor(self.dir, self.info(skey))
            arr = dequantize_fp8(arr, scale, key=key)
        return arr

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


# ----------------------------------------------------------------------------- streaming reads
_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
ST_DTYPE_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
FP8_DTYPES = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
# Quantisation side tensors of the AutoFP8 / vLLM "fp8" format; weight scales are consumed by
# dequantisation, activation and KV-cache scales are dropped.
QUANT_SUFFIXES = (
    ".weight_scale",
    ".input_scale",
    ".output_scale",
    ".k_scale",
    ".v_scale",
    ".kv_scale",
)


def fp8_scale_key(key: str) -> str:
    """`x.weight` -> `x.weight_scale` (the AutoFP8 naming)."""
    return key + "_scale"


def is_quant_aux_key(key: str) -> bool:
    return key.endswith(QUANT_SUFFIXES)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: shard file (relative), dtype, shape, byte offset of element
    0, and element strides when the stored view is not C-contiguous (torch views)."""

    key: str
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    strides: tuple[int, ...] | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _c_strides(shape) -> tuple[int, ...]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return tuple(reversed(out))


def scan_safetensors(path: str | Path) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file from its header; checks that the file holds them all."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > (1 << 30):
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors header (header "
                f"length {n}, file size {size})"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from e
    base, out = 8 + n, {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = np.dtype(_ST_DTYPES[meta["dtype"]])
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except KeyError as e:
            raise CheckpointError(
                f"{path}: tensor {key!r}: unsupported or malformed header entry {meta} ({e})"
            ) from e
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(
                f"{path}: tensor {key!r}: {end - begin} bytes for shape {shape} {dtype}"
            )
        if base + end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {key!r} ends at byte {base + end} "
                f"but the file has {size} bytes"
            )
        out[key] = TensorInfo(key, path.name, dtype, shape, base + begin)
    return out


_TORCH_DTYPES = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}
_TORCH_STORAGES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "UntypedStorage": "uint8",
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Storage:
    dtype: np.dtype
    key: str
    numel: int


@dataclasses.dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int  # in elements of dtype
    shape: tuple
    stride: tuple
    dtype: np.dtype


def _rebuild_v2(
    storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None
):
    return _Tensor(storage, int(storage_offset), tuple(size), tuple(stride), storage.dtype)


def _rebuild_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    return _Tensor(storage, int(storage_offset), tuple(size), tuple(stride), np.dtype(dtype))


class _MetaUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict into _Tensor records without reading any tensor data and
    without importing torch; anything but tensors in (ordered) dicts is refused."""

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_v2
        if module == "torch._utils" and name == "_rebuild_tensor_v3":
            return _rebuild_v3
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, *args: data
        if module in ("torch", "torch.storage") and name in _TORCH_STORAGES:
            return _StorageType(np.dtype(_TORCH_DTYPES[_TORCH_STORAGES[name]]))
        if module == "torch" and name in _TORCH_DTYPES:
            return np.dtype(_TORCH_DTYPES[name])
        raise pickle.UnpicklingError(f"unsupported object {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, stype, key, _, numel = pid
        key = key.decode() if isinstance(key, bytes) else str(key)
        return _Storage(stype.dtype, key, int(numel))


def scan_torch_bin(path: str | Path) -> dict[str, TensorInfo]:
    """The tensors of a PyTorch zip checkpoint (`torch.save` since 1.6) from its zip directory
    and pickle only; checks that every storage lies inside the file."""
    path = Path(path)
    size = path.stat().st_size
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"{path}: cannot read shard (truncated or corrupt, or a legacy "
            f"pre-1.6 torch.save file): {e}"
        ) from e
    with zf, open(path, "rb") as raw:
        names = zf.namelist()
        pkls = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (no single data.pkl)")
        prefix = pkls[0][: -len("data.pkl")]
        if prefix + "byteorder" in names and zf.read(prefix + "byteorder").strip() != b"little":
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
        try:
            obj = _MetaUnpickler(io.BytesIO(zf.read(pkls[0]))).load()
        except (
            pickle.UnpicklingError,
            zipfile.BadZipFile,
            EOFError,
            ValueError,
            TypeError,
            AttributeError,
            KeyError,
        ) as e:
            raise CheckpointError(
                f"{path}: cannot parse the state dict (truncated or not a "
                f"plain state dict of tensors): {e}"
            ) from e
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
        starts = {}
        out = {}
        for key, t in obj.items():
            if not isinstance(t, _Tensor):
                raise CheckpointError(f"{path}: entry {key!r} is not a tensor")
            skey = t.storage.key
            if skey not in starts:
                try:
                    zi = zf.getinfo(f"{prefix}data/{skey}")
                except KeyError as e:
                    raise CheckpointError(f"{path}: storage {skey} of {key!r} missing") from e
                if zi.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(f"{path}: storage {skey} is compressed")
                raw.seek(zi.header_offset)
                local = raw.read(30)
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    raise CheckpointError(f"{path}: corrupt zip entry for storage {skey}")
                start = (
                    zi.header_offset
                    + 30
                    + int.from_bytes(local[26:28], "little")
                    + int.from_bytes(local[28:30], "little")
                )
                nbytes = t.storage.numel * t.storage.dtype.itemsize
                if zi.file_size < nbytes or start + nbytes > size:
                    raise CheckpointError(
                        f"{path}: truncated: storage of {key!r} needs bytes "
                        f"up to {start + nbytes}, file has {size}"
                    )
                starts[skey] = (start, nbytes)
            start, nbytes = starts[skey]
            item = t.dtype.itemsize
            if t.shape and math.prod(t.shape):
                last = t.offset + sum((d - 1) * s for d, s in zip(t.shape, t.stride))
                if t.offset < 0 or (last + 1) * item > nbytes:
                    raise CheckpointError(f"{path}: tensor {key!r} lies outside its storage")
            strides = None if tuple(t.stride) == _c_strides(t.shape) else tuple(t.stride)
            out[key] = TensorInfo(
                key,
                path.name,
                t.dtype,
                tuple(int(d) for d in t.shape),
                start + t.offset * item,
                strides,
            )
    return out


def _read_exact(f, offset: int, buf: memoryview, path) -> None:
    f.seek(offset)
    done = 0
    while done < len(buf):
        n = f.readinto(buf[done:])
        if not n:
            raise CheckpointError(
                f"{path}: truncated: unexpected end of file at byte {offset + done}"
            )
        done += n


def read_tensor(directory: str | Path, info: TensorInfo) -> np.ndarray:
    """One tensor as a fresh numpy array (stored dtype), by plain reads of its bytes."""
    path = Path(directory) / info.file
    try:
        with open(path, "rb", buffering=0) as f:
            if info.strides is None:
                arr = np.empty(info.shape, info.dtype)
                if arr.size:
                    _read_exact(f, info.offset, memoryview(arr.reshape(-1).view(np.uint8)), path)
                return arr
            span = 1 + sum((d - 1) * s for d, s in zip(info.shape, info.strides))
            flat = np.empty(span, info.dtype)
            _read_exact(f, info.offset, memoryview(flat.view(np.uint8)), path)
            item = info.dtype.itemsize
            return np.lib.stride_tricks.as_strided(
                flat, info.shape, tuple(s * item for s in info.strides)
            ).copy()
    except FileNotFoundError as e:
        raise MissingShardError(f"{path}: shard file missing") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {info.key!r}: {e}") from e


def dequantize_fp8(
    weight: np.ndarray,
    scale: np.ndarray,
    dtype=ml_dtypes.bfloat16,
    key: str = "tensor",
    block_elems: int = 1 << 24,
) -> np.ndarray:
    """FP8 weight [out, ...] times its float32 scale (per tensor: one value; per output channel:
    `out` values), in float32, rounded to `dtype`; done in row blocks to bound memory."""
    scale = np.asarray(scale, np.float32)
    out = np.empty(weight.shape, dtype)
    if scale.size == 1:
        s = scale.reshape(())
        per_row = False
    elif weight.ndim >= 1 and scale.size == weight.shape[0]:
        s = scale.reshape(-1)
        per_row = True
    else:
        raise CheckpointError(
            f"{key}: scale of shape {scale.shape} does not fit weight "
            f"{weight.shape} (expected per-tensor or per-output-channel)"
        )
    if weight.ndim == 0:
        return (weight.astype(np.float32) * s).astype(dtype)
    rows = max(1, block_elems // max(1, math.prod(weight.shape[1:])))
    for r in range(0, weight.shape[0], rows):
        w = weight[r : r + rows].astype(np.float32)
        f = s[r : r + rows].reshape((-1,) + (1,) * (weight.ndim - 1)) if per_row else s
        out[r : r + rows] = (w * f).astype(dtype)
    return out


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


def load_numpy_params(
    cfg: ModelConfig, ckpt: HFCheckpoint, tree_shapes: dict[tuple, tuple], dtype
) -> dict[tuple, np.ndarray]:
    """All parameters in memory as {tree path: array}. For small checkpoints. Every shard's
    header is scanned first (missing, truncated or unsafe shards are CheckpointError naming
    the file, before any tensor is read), then each tensor is read by plain file reads."""
    verify(cfg, HeaderView(ckpt, ckpt.tensor_infos()), tree_shapes)
    out = {}
    for entry in hf_mapping.mapping_table(cfg):
        shape = tree_shapes[entry.path]
        arr = np.empty(shape, dtype)
        for index, key in hf_mapping.hf_slices(entry, cfg):
            arr[index] = hf_mapping.to_tree_slice(entry, ckpt.read(key), shape).astype(dtype)
        out[entry.path] = arr
    return out
