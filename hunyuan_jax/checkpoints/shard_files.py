"""Shard files read without torch and without a memory map: `scan_safetensors` / `scan_torch_bin`
read only a shard's header (safetensors JSON header; the zip directory and `data.pkl` of a
PyTorch `.bin`, unpickled by a restricted unpickler that never touches tensor data and refuses
anything but tensors in dicts) into `TensorInfo` records (dtype, shape, byte offset, strides);
`read_tensor` then reads exactly one tensor's bytes with plain file reads, so resident memory is
that tensor and nothing else. Also the dtype names (an FP8 release's scales: `fp8_scales`)."""

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

from hunyuan_jax.errors import CheckpointError, MissingShardError

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
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
ST_DTYPE_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


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


# The `safetensors` library's own limit on the JSON header (`MAX_HEADER_SIZE`, Rust crate).
ST_MAX_HEADER = 100_000_000


def _unique_pairs(path: Path):
    """json object_pairs_hook: a key given twice is an error (the library's serde map keeps
    one of them silently; which tensor a name means must never be a guess)."""

    def hook(pairs):
        out = {}
        for key, value in pairs:
            if key in out:
                raise CheckpointError(f"{path}: safetensors header names {key!r} twice")
            out[key] = value
        return out

    return hook


def _nonneg_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def scan_safetensors(path: str | Path) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file from its header, validated as strictly as the
    `safetensors` library validates one (`Metadata::validate` / `read_metadata` of the Rust
    crate) and a little more: header length 2..100 MB inside the file, UTF-8 JSON object,
    no name twice, `__metadata__` only string -> string, every entry exactly a known dtype,
    a shape of non-negative ints and two non-negative `data_offsets` with begin <= end and
    end - begin == prod(shape) * itemsize; taken in offset order, each tensor begins where the
    previous one ended (no overlap: two tensors never share a byte; no gap) from 0, and the
    last ends exactly at the end of the file. CheckpointError names the file and tensor(s)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > ST_MAX_HEADER or n < 2:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors header (header "
                f"length {n}, file size {size}, at most {ST_MAX_HEADER})"
            )
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
        if not text.startswith("{"):
            raise ValueError("the header does not start with '{'")
        header = json.loads(text, object_pairs_hook=_unique_pairs(path))
    except CheckpointError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        raise CheckpointError(
            f"{path}: safetensors __metadata__ must map strings to strings, got {meta!r:.200}"
        )
    base, spans = 8 + n, []
    for key, entry in header.items():
        bad = f"{path}: tensor {key!r}: malformed header entry {entry!r:.200}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise CheckpointError(f"{bad} (needs dtype, shape, data_offsets)")
        if not isinstance(entry["dtype"], str) or entry["dtype"] not in _ST_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {key!r}: unsupported dtype {entry['dtype']!r} "
                f"(known: {', '.join(_ST_DTYPES)})"
            )
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list) or not all(_nonneg_int(d) for d in shape):
            raise CheckpointError(f"{bad} (shape must be a list of non-negative ints)")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_nonneg_int(x) for x in offsets)
            or offsets[0] > offsets[1]
        ):
            raise CheckpointError(f"{bad} (data_offsets must be [begin, end], 0 <= begin <= end)")
        dtype = np.dtype(_ST_DTYPES[entry["dtype"]])
        begin, end = offsets
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(
                f"{path}: tensor {key!r}: {end - begin} bytes for shape {tuple(shape)} {dtype}"
            )
        spans.append((begin, end, key, dtype, tuple(shape)))
    spans.sort(key=lambda s: (s[0], s[1]))
    at, prev = 0, None
    for begin, end, key, _, _ in spans:
        if begin < at:
            raise CheckpointError(
                f"{path}: tensors {prev!r} and {key!r} overlap (bytes {begin}..{end} of "
                f"{key!r} start before {prev!r} ends at {at}): refusing a header that gives "
                f"two tensors the same bytes"
            )
        if begin > at:
            after = f"after tensor {prev!r}" if prev is not None else "at the start of the data"
            raise CheckpointError(
                f"{path}: {begin - at} unaccounted bytes {after}, before tensor {key!r} "
                f"(bytes {at}..{begin} of the data belong to no tensor)"
            )
        at, prev = end, key
    if base + at > size:
        raise CheckpointError(
            f"{path}: truncated: tensor {prev!r} ends at byte {base + at} "
            f"but the file has {size} bytes"
        )
    if base + at < size:
        raise CheckpointError(
            f"{path}: {size - base - at} bytes after the last tensor ({prev!r}, ending at byte "
            f"{base + at}): the header does not describe this file's data"
        )
    return {
        key: TensorInfo(key, path.name, dtype, shape, base + begin)
        for begin, _, key, dtype, shape in spans
    }


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
        starts, owners = {}, {}
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
            owners.setdefault(skey, key)
            out[key] = TensorInfo(
                key,
                path.name,
                t.dtype,
                tuple(int(d) for d in t.shape),
                start + t.offset * item,
                strides,
            )
        # Views of one storage may share bytes (torch's tied weights); two storages never do
        # (zip entries aliased by a crafted directory would give one tensor another's bytes).
        at, prev = 0, None
        for skey, (start, nbytes) in sorted(starts.items(), key=lambda kv: kv[1]):
            if prev is not None and start < at:
                raise CheckpointError(
                    f"{path}: storages {prev} and {skey} (of tensors {owners[prev]!r} and "
                    f"{owners[skey]!r}) overlap in the file: refusing aliased tensor bytes"
                )
            if nbytes:
                at, prev = max(at, start + nbytes), skey
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
