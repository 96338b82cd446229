"""Checksums of checkpoints: written with every checkpoint, verified whenever one is read.

| checkpoint | checksum | verified |
|---|---|---|
| converted (`hf-to-jax`) | zarr3 `crc32c` codec on every inner chunk (<= 4 MiB, after zstd) and on each shard's index | by tensorstore on every read: loading, export, `verify` |
| train.py step | a 64-bit digest of every array's values (params, opt_state) and a SHA-256 of the data states, in the step's `integrity` item (written with the step, atomically) | after every restore: resume (falls back to the newest step that verifies), loading (infer.py, `--init-from`), export, `verify` |
| Hugging Face | none (the format has none) | headers and file sizes (`hf_checkpoint`) |

The digest of an array is two wrapping uint32 sums over its elements, of `fmix32(b + p *
0x9E3779B1)` and of `b * (2p + 1)`, where `b` is the element's bits and `p` its C-order index
modulo 2^32 (murmur3's finaliser `fmix32` is a bijection and `2p + 1` is odd, so a change to any
single element always changes both sums; several changes go unnoticed only if both sums
collide: ~2^-64 for random damage, ~2^-32 for structured damage that cancels in the linear
second sum, e.g. two flipped sign bits).
Integer sums are exact in any order, so the same value comes out on device (one fused pass per
array, over any sharding, for the whole tree in one jit) and from numpy over slices read back
from disk (`verify`, export): nothing depends on orbax's file layout, and every process of a
pod computes (and checks) the same global values.

`read_error` turns a tensorstore / orbax failure (truncated or missing array file, checksum
mismatch, I/O error) into a one-line `CheckpointError` naming the array and the file;
`check_layout` refuses a restore target whose arrays differ in shape or dtype from what a
converted checkpoint's manifest records (e.g. int4 scales in other groups).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax

from hunyuan_jax.errors import CheckpointError

DIGEST = "fmix32-sum+odd-sum/u32-v1"
_GOLDEN, _M1, _M2 = 0x9E3779B1, 0x85EBCA6B, 0xC2B2AE35
_MASK = 0xFFFFFFFF


# ----------------------------------------------------------------------------- digests
def _fmix32(x, u32):
    x = x ^ (x >> 16)
    x = x * u32(_M1)
    x = x ^ (x >> 13)
    x = x * u32(_M2)
    return x ^ (x >> 16)


def _terms(bits, pos, u32):
    """(t1, t2) per element: bits and positions are uint32 arrays of one shape."""
    return _fmix32(bits + pos * u32(_GOLDEN), u32), bits * (pos * u32(2) + u32(1))


def _strides(shape) -> list[int]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return list(reversed(out))


def _np_bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    if a.dtype.itemsize == 4:
        return a.view(np.uint32)
    if a.dtype.itemsize == 2:
        return a.view(np.uint16).astype(np.uint32)
    if a.dtype.itemsize == 1:
        return a.view(np.uint8).astype(np.uint32)
    raise CheckpointError(f"no digest for dtype {a.dtype}")


def np_partial(block: np.ndarray, start, shape) -> tuple[int, int]:
    """The digest sums of `block`, the part of an array of `shape` starting at index `start`
    (one int per dimension); the sums of disjoint blocks add up (mod 2^32) to the array's.
    Computed in place, slab by slab along the first dimension (few temporaries)."""
    block = np.asarray(block)
    if block.size == 0:
        return 0, 0
    if block.ndim == 0:
        block, start, shape = block.reshape(1), (0,), (1,)
    strides = _strides(shape)
    # Each dimension's contribution to the position (index * stride mod 2^32), as uint32.
    parts = [
        ((np.arange(s, s + n, dtype=np.uint64) * np.uint64(st)) & np.uint64(_MASK)).astype(
            np.uint32
        )
        for s, n, st in zip(start, block.shape, strides)
    ]
    inner = max(1, math.prod(block.shape[1:]))
    rows = max(1, (1 << 20) // inner)
    h1 = h2 = 0
    with np.errstate(over="ignore"):
        for r in range(0, block.shape[0], rows):
            bits = _np_bits(block[r : r + rows])
            pos = np.zeros(bits.shape, np.uint32)
            pos += parts[0][r : r + rows].reshape((-1,) + (1,) * (block.ndim - 1))
            for k in range(1, block.ndim):
                pos += parts[k].reshape((-1,) + (1,) * (block.ndim - k - 1))
            t = pos * np.uint32(_GOLDEN)
            t += bits
            tmp = np.empty_like(t)
            for shift, mult in ((16, _M1), (13, _M2), (16, None)):
                np.right_shift(t, shift, out=tmp)
                np.bitwise_xor(t, tmp, out=t)
                if mult is not None:
                    np.multiply(t, np.uint32(mult), out=t)
            h1 += int(t.sum(dtype=np.uint32))
            np.multiply(pos, np.uint32(2), out=pos)
            pos += np.uint32(1)
            pos *= bits
            h2 += int(pos.sum(dtype=np.uint32))
    return h1 & _MASK, h2 & _MASK


def add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return (a[0] + b[0]) & _MASK, (a[1] + b[1]) & _MASK


def fmt_digest(h: tuple[int, int]) -> str:
    return f"{int(h[0]):08x}{int(h[1]):08x}"


def np_digest(a: np.ndarray) -> str:
    a = np.asarray(a)
    return fmt_digest(np_partial(a, (0,) * a.ndim, a.shape))


def _jnp_digest(x):
    u32 = jnp.uint32
    if x.dtype == jnp.bool_:
        bits = x.astype(u32)
    elif x.dtype.itemsize == 4:
        bits = lax.bitcast_convert_type(x, u32)
    elif x.dtype.itemsize == 2:
        bits = lax.bitcast_convert_type(x, jnp.uint16).astype(u32)
    elif x.dtype.itemsize == 1:
        bits = lax.bitcast_convert_type(x, jnp.uint8).astype(u32)
    else:
        raise CheckpointError(f"no digest for dtype {x.dtype}")
    pos = jnp.zeros(x.shape, u32)
    for k, stride in enumerate(_strides(x.shape)):
        pos = pos + lax.broadcasted_iota(u32, x.shape, k) * u32(stride & _MASK)
    t1, t2 = _terms(bits, pos, u32)
    return jnp.stack([jnp.sum(t1, dtype=u32), jnp.sum(t2, dtype=u32)])


_JITTED = {}


def named_leaves(tree) -> list[tuple[str, Any]]:
    """[(orbax's name of the leaf, leaf)] for the array leaves of a pytree, in tree order."""
    names = jax.tree.leaves(ocp.tree.get_param_names(tree, include_empty_nodes=False))
    leaves = jax.tree.leaves(tree)
    return [(n, x) for n, x in zip(names, leaves) if hasattr(x, "shape")]


def tree_digests(tree) -> dict[str, str]:
    """{leaf name: digest} of the (possibly sharded) arrays of a pytree, computed where they
    live in one jitted pass (every process gets the same global values)."""
    items = named_leaves(tree)
    if not items:
        return {}
    fn = _JITTED.get(len(items))
    if fn is None:
        fn = _JITTED[len(items)] = jax.jit(lambda xs: jnp.stack([_jnp_digest(x) for x in xs]))
    out = fn([x for _, x in items])
    if not out.is_fully_addressable:  # multi-host: the (replicated) result of a reduction
        out = out.addressable_shards[0].data
    sums = np.asarray(jax.device_get(out))
    return {name: fmt_digest(s) for (name, _), s in zip(items, sums)}


def json_digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def compare(expected: dict[str, str], actual: dict[str, str], where: str) -> None:
    """CheckpointError naming the first array whose digest differs (or is missing)."""
    for name, want in expected.items():
        got = actual.get(name)
        if got is None:
            raise CheckpointError(f"{where}: array {name} is missing")
        if got != want:
            raise CheckpointError(
                f"{where}: array {name} is corrupt (checksum {got}, recorded {want})"
            )
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise CheckpointError(f"{where}: array {extra[0]} has no recorded checksum")


# ----------------------------------------------------------------------------- read errors
_TS_STATUS = re.compile(r"\b([A-Z_]{5,}): (.*)", re.S)
_TS_ARRAY = (
    re.compile(r'Error reading "([^"/]+)/'),  # OCDBT key of the array's chunk
    re.compile(r"'path': '([^'/]+)/?',\n\s*\},\n\s*'metadata'"),  # kvstore path in the spec
    re.compile(r'local file "[^"]*/([^"/]+)/(?:c/|zarr\.json|\.zarray)'),  # zarr dir
    re.compile(r"subdirectory not found at path: \S*/([^/\s]+?)\.?$", re.M),  # orbax
)
_TS_FILE = re.compile(r'(?:local file|OCDBT database at local file) "([^"]+)"')


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def read_error(e: BaseException, where: str | Path, array: str | None = None) -> CheckpointError:
    """A one-line CheckpointError for a failed read of an orbax / tensorstore checkpoint at
    `where`: the array (from `array` or tensorstore's message), the file, and the reason."""
    if isinstance(e, CheckpointError):
        return e
    texts = [str(x) for x in _chain(e)]
    reason = None
    for t in texts:
        m = _TS_STATUS.search(t)
        if m and m.group(1) in (
            "DATA_LOSS",
            "OUT_OF_RANGE",
            "NOT_FOUND",
            "FAILED_PRECONDITION",
            "INVALID_ARGUMENT",
            "PERMISSION_DENIED",
            "RESOURCE_EXHAUSTED",
            "UNAVAILABLE",
            "INTERNAL",
            "UNKNOWN",
            "ABORTED",
        ):
            reason = f"{m.group(1)}: {m.group(2)}"
            break
    if reason is None:
        first = next((t for t in texts if t.strip()), type(e).__name__)
        reason = first.strip().splitlines()[0]
    if array is None:
        for t in texts:
            for pat in _TS_ARRAY:
                m = pat.search(t)
                if m:
                    array = m.group(1)
                    break
            if array:
                break
    reason = " ".join(reason.split())
    if len(reason) > 400:
        reason = reason[:400] + " ..."
    what = f"array {array}" if array else "an array"
    hint = ""
    if any(
        k in reason.lower()
        for k in (
            "data_loss",
            "out_of_range",
            "not_found",
            "digest mismatch",
            "corrupt",
            "truncated",
        )
    ):
        hint = " (the checkpoint is truncated, incomplete or corrupt)"
    return CheckpointError(f"{where}: cannot read {what}: {reason}{hint}")


def orbax_metadata(item_dir: str | Path) -> tuple[bool, bool, list[str]]:
    """(use_ocdbt, use_zarr3, array names) of an orbax PyTree checkpoint directory, from its
    `_METADATA`; CheckpointError naming the file when it is missing or unreadable."""
    meta = Path(item_dir) / "_METADATA"
    try:
        m = json.loads(meta.read_text())
        names = [
            ".".join(k["key"] for k in entry["key_metadata"])
            for entry in m["tree_metadata"].values()
            if not entry.get("value_metadata", {}).get("skip_deserialize")
        ]
    except FileNotFoundError:
        raise CheckpointError(f"{meta}: missing (not a complete orbax checkpoint)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{meta}: unreadable orbax metadata ({e})") from None
    return bool(m.get("use_ocdbt")), bool(m.get("use_zarr3")), names


def write_error(e: BaseException, what: str) -> CheckpointError:
    """A one-line CheckpointError for a failed (possibly background) checkpoint save."""
    if isinstance(e, CheckpointError):
        return e
    texts = [str(x) for x in _chain(e)]
    reason = next((t for t in texts if t.strip()), type(e).__name__)
    for t in texts:
        m = _TS_STATUS.search(t)
        if m:
            reason = f"{m.group(1)}: {m.group(2)}"
            break
    # tensorstore appends its source locations: dropped, so the OS error stays in the line
    reason = re.sub(r"\s*\[source locations='[^']*'\]", "", reason)
    reason = " ".join(reason.split())
    if len(reason) > 400:
        reason = reason[:150] + " ... " + reason[-250:]
    return CheckpointError(
        f"{what} failed: {reason} (a full disk, a file-size limit or a permission?); the "
        f"incomplete step is never used: once fixed, rerun to resume from the last complete one"
    )


# ----------------------------------------------------------------------------- reading back
def iter_blocks(arr, max_bytes: int = 64 << 20):
    """(start index, numpy block) covering a tensorstore array, each at most ~max_bytes
    (split along leading dimensions), read one at a time."""
    shape = tuple(arr.shape)
    itemsize = np.dtype(arr.dtype.numpy_dtype).itemsize
    if not shape:
        yield (), np.asarray(arr.read().result())
        return
    lead, inner = 0, math.prod(shape) * itemsize
    while lead < len(shape) - 1 and inner > max_bytes:
        inner //= shape[lead]
        lead += 1
    for idx in np.ndindex(*shape[:lead]):
        sub = arr[idx] if idx else arr
        rows = max(1, max_bytes // max(1, inner // max(1, shape[lead])))
        for r in range(0, shape[lead], rows):
            block = sub[r : min(r + rows, shape[lead])].read().result()
            yield tuple(idx) + (r,) + (0,) * (len(shape) - lead - 1), block


def stored_digest(arr, where, array: str) -> tuple[str, int, int]:
    """(digest, bytes, non-finite count) of a tensorstore array read back block by block; read
    failures (tensorstore checks chunk checksums where the format has them) become
    CheckpointError naming `where` and `array`."""
    shape = tuple(arr.shape)
    h, nbytes, bad = (0, 0), 0, 0
    try:
        for start, block in iter_blocks(arr):
            h = add(h, np_partial(block, start, shape))
            nbytes += block.nbytes
            if block.dtype.kind == "f" or block.dtype.name == "bfloat16":
                bad += int(block.size - np.count_nonzero(np.isfinite(block.astype(np.float32))))
    except CheckpointError:
        raise
    except Exception as e:  # tensorstore: missing / truncated file, checksum mismatch
        raise read_error(e, where, array) from e
    return fmt_digest(h), nbytes, bad


def check_layout(where, stored: dict, target) -> None:
    """CheckpointError (one line) unless every array of the restore `target` (abstract arrays;
    orbax PLACEHOLDERs skipped) has the shape `stored` ({name: {"shape", "dtype"}}, a
    converted checkpoint's manifest at `where`) records for it, and a quantized weight's values
    and scales (`.array.qvalue` / `.array.scale`) its dtype too: orbax would pad, truncate or
    cast a stored array into another layout without a word, e.g. int4 scales in other groups
    (`quantize.int4_group`) or dtype than the checkpoint was written with. Float leaves may
    differ in dtype (cast on read: float32 compute from a bf16 checkpoint)."""
    have = dict(named_leaves(target))
    for name, x in have.items():
        info = stored.get(name)
        want = None if info is None else (np.dtype(info["dtype"]).name, tuple(info["shape"]))
        got = (np.dtype(x.dtype).name, tuple(x.shape))
        quantized = name.endswith((".array.qvalue.value", ".array.scale.value"))
        if want is not None and (want == got or (not quantized and want[1] == got[1])):
            continue
        why = "" if want is None else _groups_differ(name, stored, have)
        raise CheckpointError(
            f"{where}: array {name} is stored as "
            f"{'absent' if want is None else f'{want[0]} {list(want[1])}'}, this version lays "
            f"it out as {np.dtype(x.dtype).name} {list(x.shape)}{why}: convert the checkpoint "
            f"again with this version (hf-to-jax)"
        )


def _groups_differ(name: str, stored: dict, have: dict) -> str:
    """' (int4 groups of A values stored, B here)' for an int4 scale leaf, else ''."""
    values = name.removesuffix("scale.value") + "qvalue.value"
    if not name.endswith(".array.scale.value") or values not in stored or values not in have:
        return ""
    n = math.prod(stored[values]["shape"])
    a = n // max(1, math.prod(stored[name]["shape"]))
    b = n // max(1, math.prod(have[name].shape))
    return f" (int4 groups of {a} values stored, {b} here)" if a != b else ""
