"""Checkpoint files that lie: a converted checkpoint whose config.json was edited after
conversion (`converted.stored_config`, `convert verify`), safetensors headers that the
`safetensors` library refuses (`shard_files.scan_safetensors`: overlapping / aliased byte
ranges, gaps, trailing bytes, bad metadata), and index files whose weight_map points outside
the checkpoint directory (`hf_checkpoint`). Every fault is written into real files; the
converter's and infer.py's CLIs are run in this process. ~10 s on 2 cores (one conversion of
hy_tiny)."""

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
from conftest import HY_TINY
from safetensors import safe_open

from hunyuan_jax.checkpoints import convert, loading
from hunyuan_jax.checkpoints import converted as fmt
from hunyuan_jax.checkpoints.hf_checkpoint import HFCheckpoint
from hunyuan_jax.checkpoints.shard_files import scan_safetensors
from hunyuan_jax.cli.convert import main as convert_main
from hunyuan_jax.errors import CheckpointError

PROG = "python -m hunyuan_jax.cli.convert"
SHARD = "model-00002-of-00002.safetensors"


def _cli(capsys, *argv) -> tuple[int, str]:
    code = convert_main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def _one_line(err: str) -> str:
    assert err.startswith(f"{PROG}: error: ") and len(err.splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------- config.json
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "conv"
    convert.hf_to_jax(HY_TINY / "hf_st", out, progress=False, log=lambda msg: None)
    return out


def _edited(converted, tmp_path, **changes) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(converted, copy)
    cfg = json.loads((copy / fmt.CONFIG).read_text())
    cfg.update(changes)
    (copy / fmt.CONFIG).write_text(json.dumps(cfg, indent=2))
    return copy


def test_edited_config_json_is_refused(converted, tmp_path, capsys):
    """moe_topk 1 -> 2 in config.json (the weights fit either way): loading, infer.py and
    `convert verify` refuse it (exit 4) naming config.json and the key with both values."""
    from hunyuan_jax.cli import infer

    edited = _edited(converted, tmp_path, moe_topk=2)
    with pytest.raises(
        CheckpointError, match=r"config.json: not the architecture .*moe_topk 1 -> 2"
    ):
        loading.open_checkpoint(edited)
    code, err = _cli(capsys, "verify", "--ckpt", edited)
    assert code == 4 and f"{edited / fmt.CONFIG}" in _one_line(err) and "moe_topk 1 -> 2" in err
    assert infer.main(["--checkpoint", str(edited), "--prompt", "x"]) == 4
    err = capsys.readouterr().err.strip()
    assert err.startswith("infer.py: error: ") and "moe_topk 1 -> 2" in err, err


def test_config_json_keys_that_are_not_architecture_may_change(converted, tmp_path, capsys):
    """eos_token_id and attention_dropout are not architecture: the checkpoint still verifies."""
    edited = _edited(converted, tmp_path, eos_token_id=3, attention_dropout=0.1)
    assert loading.open_checkpoint(edited).cfg == loading.open_checkpoint(converted).cfg
    assert _cli(capsys, "verify", "--ckpt", edited)[0] == 0


def test_manifest_leaves_must_fit_the_architecture(converted, tmp_path, capsys):
    """config.json and the manifest's hf_config edited alike (num_experts 8 -> 4): the
    manifest's leaves no longer fit that architecture; verify names the array (exit 4)."""
    edited = _edited(converted, tmp_path, num_experts=4)
    man = json.loads((edited / fmt.MANIFEST).read_text())
    man["hf_config"]["num_experts"] = 4
    (edited / fmt.MANIFEST).write_text(json.dumps(man))
    code, err = _cli(capsys, "verify", "--ckpt", edited)
    assert code == 4 and "manifest.json: array groups.layers.0.moe." in _one_line(err), err
    assert "[3, 8, 128, 96] in the manifest" in err and "gives float32 [3, 4, 128, 96]" in err


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("dir", "../elsewhere/params", "params.dir must be 'params'"),
        ("dtype", "bfloat16", "dtype 'bfloat16' is not the stored embedding's ('float32')"),
        ("form", "int2", "weights.form must be float, int8, fp8, int4, int4-experts, got 'int2'"),
        ("form", "int4", "weights.group_size must be a positive integer for int4, got None"),
        ("tokenizer_files", ["../../x"], "tokenizer_files must be plain file names"),
    ],
)
def test_manifest_fields_are_checked(converted, tmp_path, capsys, field, value, message):
    """A manifest whose params directory points elsewhere, whose dtype is not what is stored
    (the 'auto' policy would decode in another dtype: orbax casts on read without a word), or
    with an unknown weights form or an int4 form without its group size: loading and verify
    refuse it naming the field."""
    edited = _edited(converted, tmp_path)
    man = json.loads((edited / fmt.MANIFEST).read_text())
    if field == "dir":
        man["params"]["dir"] = value
    elif field == "form":
        man["weights"]["form"] = value
    else:
        man[field] = value
    (edited / fmt.MANIFEST).write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="corrupt manifest: " + re.escape(message)):
        loading.open_checkpoint(edited)
    code, err = _cli(capsys, "verify", "--ckpt", edited)
    assert code == 4 and message in _one_line(err)


# ----------------------------------------------------------------------------- safetensors headers
def _rewrite_header(path: Path, change) -> None:
    """Rewrite a safetensors file's JSON header with `change(header)`, keeping its data bytes."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def test_aliased_tensor_bytes_are_refused(tmp_path, capsys):
    """Expert 1's header entry given expert 0's byte range (so expert 1 would silently get
    expert 0's weights): hf-to-jax and verify exit 4 naming the shard and both tensors, as
    the safetensors library itself refuses the file."""
    src = tmp_path / "src"
    shutil.copytree(HY_TINY / "hf_st", src)
    e0, e1 = (f"model.layers.5.mlp.experts.{e}.up_proj.weight" for e in (0, 1))
    assert HFCheckpoint(src).weight_map[e0] == SHARD == HFCheckpoint(src).weight_map[e1]

    def alias(header):
        header[e1]["data_offsets"] = header[e0]["data_offsets"]

    _rewrite_header(src / SHARD, alias)
    with pytest.raises(Exception, match="invalid offset"):
        safe_open(str(src / SHARD), framework="numpy")
    for argv in (
        ("hf-to-jax", "--hf-dir", src, "--out", tmp_path / "out"),
        ("verify", "--ckpt", src),
    ):
        code, err = _cli(capsys, *argv)
        assert code == 4, err
        assert f"{src / SHARD}: tensors '{e0}' and '{e1}' overlap" in _one_line(err)
    assert not (tmp_path / "out" / fmt.MANIFEST).exists()


def _write(path: Path, header, data: bytes, raw_header: bytes | None = None) -> Path:
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


A = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
B = {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}


@pytest.mark.parametrize(
    "name,header,data,raw,message",
    [
        ("same range", {"a": A, "b": dict(A)}, 8, None, "tensors 'a' and 'b' overlap"),
        (
            "overlap",
            {"a": dict(A, shape=[3], data_offsets=[0, 12]), "b": B},
            16,
            None,
            "tensors 'a' and 'b' overlap",
        ),
        (
            "gap",
            {"a": A, "b": dict(B, data_offsets=[12, 20])},
            20,
            None,
            "4 unaccounted bytes after tensor 'a', before tensor 'b'",
        ),
        ("not from 0", {"b": B}, 16, None, "8 unaccounted bytes at the start of the data"),
        ("trailing bytes", {"a": A}, 12, None, "4 bytes after the last tensor ('a'"),
        ("truncated", {"a": A, "b": B}, 12, None, "truncated: tensor 'b' ends at byte"),
        ("size", {"a": dict(A, shape=[3])}, 8, None, "tensor 'a': 8 bytes for shape (3,)"),
        ("negative dim", {"a": dict(A, shape=[-2])}, 8, None, "non-negative ints"),
        ("reversed", {"a": dict(A, data_offsets=[8, 0])}, 8, None, "0 <= begin <= end"),
        ("metadata", {"__metadata__": {"k": 1}, "a": A}, 8, None, "map strings to strings"),
        ("dtype", {"a": dict(A, dtype="F12")}, 8, None, "unsupported dtype 'F12'"),
        ("no offsets", {"a": {"dtype": "F32", "shape": [2]}}, 8, None, "needs dtype, shape"),
        (
            "name twice",
            None,
            8,
            b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
            b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
            "header names 'a' twice",
        ),
        ("not an object", None, 0, b"[1, 2]  ", "corrupt safetensors header"),
        ("not utf-8", None, 0, b'{"\xff": 1}', "corrupt safetensors header"),
    ],
)
def test_safetensors_header_rules(tmp_path, name, header, data, raw, message):
    """Each header the `safetensors` library refuses is refused by our reader too, with the
    file and tensor named (one name given twice, which the library reads as the last one,
    is refused as well)."""
    path = _write(tmp_path / "x.safetensors", header, b"\0" * data, raw)
    with pytest.raises(CheckpointError) as info:
        scan_safetensors(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
    if name != "name twice":
        with pytest.raises(Exception):  # noqa: B017 (the library's own error type varies)
            with safe_open(str(path), framework="numpy") as f:
                [f.get_tensor(k) for k in f.keys()]


def test_valid_headers_still_read(tmp_path):
    """Zero-size tensors, padding spaces after the JSON, metadata and any entry order."""
    header = {
        "__metadata__": {"format": "pt"},
        "b": B,
        "empty": {"dtype": "BF16", "shape": [0, 4], "data_offsets": [8, 8]},
        "a": A,
    }
    text = json.dumps(header).encode() + b"    "
    path = _write(tmp_path / "ok.safetensors", None, bytes(range(16)), text)
    infos = scan_safetensors(path)
    assert [infos[k].offset - 8 - len(text) for k in ("a", "empty", "b")] == [0, 8, 8]
    with safe_open(str(path), framework="numpy") as f:
        assert sorted(f.keys()) == ["a", "b", "empty"]


# ----------------------------------------------------------------------------- index files
@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors"])
def test_weight_map_outside_the_directory_is_refused(tmp_path, capsys, target):
    src = tmp_path / "src"
    shutil.copytree(HY_TINY / "hf_st", src)
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = next(iter(data["weight_map"]))
    shutil.copy2(src / data["weight_map"][key], tmp_path / "outside.safetensors")
    data["weight_map"][key] = target
    index.write_text(json.dumps(data))
    code, err = _cli(capsys, "verify", "--ckpt", src)
    assert code == 4
    assert f"weight_map['{key}'] = '{target}' points outside" in _one_line(err)


def test_bin_storages_aliased_in_the_zip_are_refused(tmp_path):
    """A PyTorch .bin whose zip directory points two storages at the same bytes (so one
    tensor would read the other's values) is refused naming both tensors; views of one
    storage (torch's tied weights) still read."""
    import torch

    from hunyuan_jax.checkpoints.shard_files import scan_torch_bin

    path = tmp_path / "pytorch_model.bin"
    shared = torch.arange(8, dtype=torch.float32)
    torch.save({"a": torch.zeros(4), "b": torch.ones(4), "t1": shared, "t2": shared[:4]}, path)
    assert set(scan_torch_bin(path)) == {"a", "b", "t1", "t2"}
    raw = bytearray(path.read_bytes())
    entries = {}  # zip central directory: storage name -> offset of its local header field
    at = raw.find(b"PK\x01\x02")
    while at >= 0:
        n = int.from_bytes(raw[at + 28 : at + 30], "little")
        entries[bytes(raw[at + 46 : at + 46 + n]).decode()] = at + 42
        at = raw.find(b"PK\x01\x02", at + 46 + n)
    storage = {k.rsplit("/", 1)[-1]: v for k, v in entries.items() if "/data/" in k}
    first, second = sorted(storage)[:2]  # the storages of 'a' and 'b', 16 bytes each
    raw[storage[second] : storage[second] + 4] = raw[storage[first] : storage[first] + 4]
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: storages .* overlap"):
        scan_torch_bin(path)
