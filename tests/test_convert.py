"""Checkpoint conversion HF <-> orbax/tensorstore (hunyuan_jax.convert, checkpoint_format):
the reference logits after restoring on an 8-device mesh, bit-exact round trips, FP8
dequantisation, bounded peak RSS that does not grow with depth, bad inputs, kill + resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from conftest import DATA, HY_TINY

from hunyuan_jax import checkpoint_format as fmt
from hunyuan_jax import convert, hf_mapping
from hunyuan_jax.config import ModelConfig
from hunyuan_jax.hf_checkpoint import (
    CheckpointError,
    HFCheckpoint,
    MissingShardError,
    dequantize_fp8,
)
from sharding.mesh import build_mesh

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = DATA / "hunyuan_tokenizer"
TOKENIZER_FILES = ("hy.tiktoken", "tokenizer_config.json", "generation_config.json")
BF16 = np.dtype(ml_dtypes.bfloat16)
QUIET = dict(progress=False, log=lambda msg: None)


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.reshape(-1).view(np.uint8)


def _same_bits(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(_bits(a), _bits(b))


def _hf_tensors(directory) -> dict[str, np.ndarray]:
    ckpt = HFCheckpoint(directory)
    return {k: ckpt.get(k) for k in ckpt.keys}


def _write_hf(directory: Path, tensors: dict, config: dict, shards: int = 2) -> Path:
    """A safetensors HF checkpoint of `tensors` in `shards` files plus index and config."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    keys = list(tensors)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        group = keys[i * per : (i + 1) * per]
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        convert.write_safetensors(
            directory / name,
            [(k, tensors[k].dtype, tensors[k].shape) for k in group],
            lambda k: tensors[k],
        )
        weight_map.update({k: name for k in group})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return directory


def _logits(model, tokens):
    logits, _, _ = model(tokens)
    return np.asarray(logits)


def _mesh():
    return build_mesh({"fsdp": 2, "expert": 4})


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """hy_tiny converted from both layouts (float32, the source dtype), tokenizer carried."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for layout in ("hf_st", "hf_bin"):
        convert.hf_to_jax(HY_TINY / layout, root / layout, tokenizer_dir=TOKENIZER, **QUIET)
        out[layout] = root / layout
    return out


# ----------------------------------------------------------------------------- restore + logits
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("layout", ["hf_st", "hf_bin"])
def test_restore_on_mesh_gives_reference_logits(layout, converted, reference):
    out = converted[layout]
    man = fmt.read_manifest(out)
    assert man["complete"] and man["dtype"] == "float32"
    assert man["source"]["format"] == ("safetensors" if layout == "hf_st" else "bin")
    assert {f["name"] for f in man["source"]["files"]} >= set(HFCheckpoint(HY_TINY / layout).files)
    for name in TOKENIZER_FILES:  # infer.py finds the tokenizer beside the params
        assert (out / name).read_bytes() == (TOKENIZER / name).read_bytes()
    assert not (out / fmt.WORK_DIR).exists()

    model = fmt.restore_params(out, _mesh(), "fsdp_ep", compute_dtype="float32")
    np.testing.assert_allclose(
        _logits(model, reference["input_ids"]), reference["logits"], atol=1e-4, rtol=0
    )
    # Restored straight into the sharded layout: experts split over 'expert', dense embed dims
    # over ('fsdp', 'expert'); every device holds only its part.
    gate = model.groups.layers[0].moe.gate_proj[...]
    assert len(gate.addressable_shards) == 8
    assert gate.addressable_shards[0].data.shape[1] == gate.shape[1] // 4
    q = model.groups.layers[0].attn.q_proj[...]
    assert q.addressable_shards[0].data.shape[1] == q.shape[1] // 8


def test_restore_single_device_with_dtype_cast(converted):
    out = converted["hf_st"]
    assert fmt.is_converted(out) and not fmt.is_converted(HY_TINY / "hf_st")
    cfg, model = fmt.restore_model(out, param_dtype="bfloat16")
    assert cfg.param_dtype == "bfloat16" and fmt.load_config(out).param_dtype == "float32"
    src = HFCheckpoint(HY_TINY / "hf_st").get("model.layers.3.self_attn.q_proj.weight")
    q = np.asarray(model.groups.layers[1].attn.q_proj[...])  # layer 3 = group 1, member 1
    assert q.dtype == BF16
    entry = next(
        e
        for e in hf_mapping.mapping_table(fmt.load_config(out))
        if e.path == ("groups", "layers", 1, "attn", "q_proj")
    )
    assert _same_bits(q[1], hf_mapping.to_tree_slice(entry, src, q.shape).astype(BF16))


def test_tree_names_match_what_orbax_saves(converted, tmp_path):
    """Our hand-written _METADATA equals the one orbax writes for nnx.state(model, Param)."""
    import orbax.checkpoint as ocp
    from flax import nnx

    out = converted["hf_st"]
    model = fmt.restore_params(out)
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True)
    ckptr = ocp.Checkpointer(handler)
    ckptr.save(tmp_path / "orbax", args=ocp.args.PyTreeSave(nnx.state(model, nnx.Param)))
    theirs = json.loads((tmp_path / "orbax" / "_METADATA").read_text())
    ours = json.loads((out / fmt.PARAMS_DIR / "_METADATA").read_text())
    assert set(ours["tree_metadata"]) == set(theirs["tree_metadata"])
    for k, v in theirs["tree_metadata"].items():
        assert ours["tree_metadata"][k]["key_metadata"] == v["key_metadata"]
        assert (
            ours["tree_metadata"][k]["value_metadata"]["value_type"]
            == v["value_metadata"]["value_type"]
        )
    assert ours["use_zarr3"] and not ours["use_ocdbt"]


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("layout", ["hf_st", "hf_bin"])
def test_round_trip_bit_exact(layout, converted, tmp_path, reference):
    back = tmp_path / "back"
    index = convert.jax_to_hf(converted[layout], back, max_shard_bytes=3_000_000, **QUIET)
    src = _hf_tensors(HY_TINY / layout)
    cfg = ModelConfig.from_hf(HY_TINY / layout)
    expected = {k for k in src if not hf_mapping.ignorable_hf_key(k, cfg)}
    assert set(index["weight_map"]) == expected
    assert len(set(index["weight_map"].values())) == 3  # sharded by size
    out = _hf_tensors(back)
    for k in expected:
        assert _same_bits(out[k], src[k]), k
    # What the original PyTorch code reads: config.json, index, safetensors shards via torch.
    from safetensors.torch import load_file

    assert ModelConfig.from_hf(back) == cfg
    hf_cfg = json.loads((back / "config.json").read_text())
    assert hf_cfg["architectures"] == ["HunYuanForCausalLM"] and hf_cfg["torch_dtype"] == "float32"
    t = load_file(str(back / index["weight_map"]["model.embed_tokens.weight"]))
    assert np.array_equal(t["model.embed_tokens.weight"].numpy(), src["model.embed_tokens.weight"])
    for name in TOKENIZER_FILES:
        assert (back / name).is_file()


def test_round_trip_bfloat16_and_dtype_cast(tmp_path):
    """bf16 HF -> bf16 params -> bf16 HF is bit-exact; f32 -> --dtype bfloat16 rounds like
    ml_dtypes (round to nearest even), and back to f32 is exact for those values."""
    src = _hf_tensors(HY_TINY / "hf_st")
    config = json.loads((HY_TINY / "hf_st" / "config.json").read_text())
    bf = {k: v.astype(BF16) for k, v in src.items()}
    hf = _write_hf(tmp_path / "bf16", bf, dict(config, torch_dtype="bfloat16"), shards=3)
    convert.hf_to_jax(hf, tmp_path / "jax", **QUIET)
    assert fmt.read_manifest(tmp_path / "jax")["dtype"] == "bfloat16"
    convert.jax_to_hf(tmp_path / "jax", tmp_path / "back", **QUIET)
    back = _hf_tensors(tmp_path / "back")
    assert all(_same_bits(back[k], bf[k]) for k in back) and len(back) == len(bf)

    convert.hf_to_jax(HY_TINY / "hf_st", tmp_path / "cast", "bfloat16", **QUIET)
    convert.jax_to_hf(tmp_path / "cast", tmp_path / "cast_back", "float32", **QUIET)
    back = _hf_tensors(tmp_path / "cast_back")
    assert all(np.array_equal(back[k], src[k].astype(BF16).astype(np.float32)) for k in back)


def test_export_from_orbax_ocdbt_checkpoint(converted, tmp_path):
    """jax-to-hf also reads a plain orbax (OCDBT, zarr2) params checkpoint such as train.py
    saves, given the config."""
    import orbax.checkpoint as ocp
    from flax import nnx

    model = fmt.restore_params(converted["hf_st"])
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())  # orbax defaults: OCDBT, zarr2
    ckptr.save(tmp_path / "orbax", args=ocp.args.PyTreeSave(nnx.state(model, nnx.Param)))
    convert.jax_to_hf(tmp_path / "orbax", tmp_path / "back", config=HY_TINY / "hf_st", **QUIET)
    src, back = _hf_tensors(HY_TINY / "hf_st"), _hf_tensors(tmp_path / "back")
    assert all(_same_bits(back[k], src[k]) for k in back)


def test_fast_transforms_equal_mapping_table():
    cfg = ModelConfig.from_hf(HY_TINY / "hf_st")
    leaves = fmt.param_leaves(cfg)
    rng = np.random.default_rng(0)
    for entry in hf_mapping.mapping_table(cfg):
        shape = leaves[entry.path].shape
        t = rng.standard_normal(hf_mapping.hf_shape(entry, shape)).astype(np.float32)
        for dt in (np.float32, BF16):
            want = hf_mapping.to_tree_slice(entry, t, shape).astype(dt)
            got = convert.to_slice(entry, t, shape, dt)
            assert got.flags.c_contiguous and _same_bits(got, np.ascontiguousarray(want))
            back = convert.to_hf(entry, got, np.float32)
            assert np.array_equal(back, hf_mapping.to_hf_tensor(entry, want).astype(np.float32))
    big = rng.standard_normal((300, 517)).astype(BF16)
    assert _same_bits(convert.transpose2d(big), np.ascontiguousarray(big.T))


def test_chunk_shapes_divide_shards():
    for shape, item in [
        ((1, 6400, 80, 80), 2),
        ((1, 1, 6400, 18304), 2),
        ((129024, 6400), 2),
        ((1, 97), 4),
        ((1,), 4),
    ]:
        chunk = fmt.choose_chunk_shape(shape, item, 4 << 20)
        assert all(s % c == 0 for s, c in zip(shape, chunk))
        assert np.prod(chunk) * item <= 4 << 20 or np.prod(chunk) == 1 or max(chunk) == 97


# ----------------------------------------------------------------------------- FP8
def test_fp8_input_dequantised_to_bfloat16(tmp_path):
    src = _hf_tensors(HY_TINY / "hf_st")
    cfg = ModelConfig.from_hf(HY_TINY / "hf_st")
    config = json.loads((HY_TINY / "hf_st" / "config.json").read_text())
    config.update(
        torch_dtype="bfloat16",
        quantization_config={
            "quant_method": "fp8",
            "activation_scheme": "static",
            "ignored_layers": ["lm_head"],
        },
    )
    tensors, expected = {}, {}
    for k, v in src.items():
        linear = k.endswith("proj.weight")  # q/k/v/o, shared and expert MLPs; not the router
        if not linear:
            tensors[k] = v.astype(BF16)
            expected[k] = tensors[k]
            continue
        per_channel = "experts.1." in k  # both scale layouts of the format
        amax = np.abs(v).max(axis=1 if per_channel else None)
        scale = (amax / 448.0).astype(np.float32)
        q = (v / (scale[:, None] if per_channel else scale)).astype(ml_dtypes.float8_e4m3fn)
        tensors[k] = q
        tensors[k + "_scale"] = scale
        tensors[k[: -len("weight")] + "input_scale"] = np.float32(0.5).reshape(())
        s = scale[:, None] if per_channel else scale
        expected[k] = (q.astype(np.float32) * s).astype(BF16)
    hf = _write_hf(tmp_path / "fp8", tensors, config)
    ck = HFCheckpoint(hf)
    key = "model.layers.2.mlp.experts.1.down_proj.weight"
    assert _same_bits(ck.get(key), expected[key])  # the in-memory loader dequantises too

    man = convert.hf_to_jax(hf, tmp_path / "jax", **QUIET)
    assert man["dtype"] == "bfloat16" and man["source"]["fp8"]
    assert "quantization_config" not in json.loads((tmp_path / "jax/config.json").read_text())
    convert.jax_to_hf(tmp_path / "jax", tmp_path / "back", **QUIET)
    back = _hf_tensors(tmp_path / "back")
    assert set(back) == {k for k in src if not hf_mapping.ignorable_hf_key(k, cfg)}
    for k in back:
        assert _same_bits(back[k], expected[k]), k
    with pytest.raises(CheckpointError, match="scale"):
        dequantize_fp8(tensors[key], np.ones(3, np.float32), key=key)


# ----------------------------------------------------------------------------- bad input
@pytest.fixture()
def tiny_copy(tmp_path):
    def make(layout="hf_st"):
        d = tmp_path / f"src_{layout}"
        shutil.copytree(HY_TINY / layout, d)
        return d

    return make


def _assert_nothing_written(out: Path):
    assert not out.exists() or not (out / fmt.PARAMS_DIR).exists()


def test_missing_shard(tiny_copy, tmp_path):
    src = tiny_copy("hf_bin")
    (src / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(MissingShardError, match="pytorch_model-00002-of-00002.bin"):
        convert.hf_to_jax(src, tmp_path / "out", **QUIET)
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize(
    "layout,shard",
    [("hf_st", "model-00002-of-00002.safetensors"), ("hf_bin", "pytorch_model-00001-of-00002.bin")],
)
def test_truncated_shard(layout, shard, tiny_copy, tmp_path):
    src = tiny_copy(layout)
    path = src / shard
    os.truncate(path, path.stat().st_size * 2 // 3)
    with pytest.raises(CheckpointError, match=f"{shard}.*truncated"):
        convert.hf_to_jax(src, tmp_path / "out", **QUIET)
    _assert_nothing_written(tmp_path / "out")


def _modified(tmp_path, change):
    src = _hf_tensors(HY_TINY / "hf_st")
    config = json.loads((HY_TINY / "hf_st" / "config.json").read_text())
    change(src)
    return _write_hf(tmp_path / "modified", src, config)


def test_wrong_shape(tmp_path):
    key = "model.layers.1.self_attn.q_proj.weight"
    src = _modified(tmp_path, lambda t: t.update({key: t[key][:, :-8]}))
    with pytest.raises(
        CheckpointError,
        match=r"(?s)'model.layers.1.self_attn.q_proj.weight' in model-0000\d-of-"
        r"00002.safetensors has shape \(96, 88\), expected \(96, 96\)",
    ):
        convert.hf_to_jax(src, tmp_path / "out", **QUIET)
    _assert_nothing_written(tmp_path / "out")


def test_missing_and_unknown_keys(tmp_path):
    gone = "model.layers.4.mlp.experts.6.up_proj.weight"

    def change(t):
        del t[gone]
        t["model.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)

    src = _modified(tmp_path, change)
    with pytest.raises(CheckpointError) as e:
        convert.hf_to_jax(src, tmp_path / "out", **QUIET)
    assert f"missing tensor {gone!r}" in str(e.value)
    assert "unexpected tensor 'model.layers.0.mlp.extra.weight' in model-00002" in str(e.value)
    _assert_nothing_written(tmp_path / "out")


def test_refuses_foreign_or_different_output(tmp_path, converted):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        convert.hf_to_jax(HY_TINY / "hf_st", foreign, **QUIET)
    (foreign / "manifest.json").write_text('{"someone": "else"}')
    with pytest.raises(CheckpointError, match="not empty"):  # --overwrite never deletes it
        convert.hf_to_jax(HY_TINY / "hf_st", foreign, overwrite=True, **QUIET)
    assert (foreign / "notes.txt").is_file()
    # Same source again: a no-op; a different dtype into a complete output: refused.
    done = shutil.copytree(converted["hf_st"], tmp_path / "done")
    before = (done / fmt.MANIFEST).read_text()
    with pytest.raises(CheckpointError, match="different complete conversion"):
        convert.hf_to_jax(HY_TINY / "hf_st", done, "bfloat16", **QUIET)
    assert (done / fmt.MANIFEST).read_text() == before


# ----------------------------------------------------------------------------- kill + resume
def test_kill_midway_then_resume(tmp_path, converted, reference):
    """SIGKILL after 40 of 212 slices: no manifest, restore and export refuse; progress lists
    exactly the slices on disk; the same command resumes and gives the full checkpoint."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "hunyuan_jax.convert",
        "hf-to-jax",
        "--hf-dir",
        str(HY_TINY / "hf_bin"),
        "--out",
        str(out),
        "--no-progress",
    ]
    r = subprocess.run(
        cmd,
        env=dict(_env(), HUNYUAN_CONVERT_KILL_AFTER="40"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not (out / fmt.MANIFEST).exists()
    done = (out / fmt.WORK_DIR / "progress.jsonl").read_text().splitlines()
    assert len(done) == 40
    with pytest.raises(CheckpointError, match="interrupted"):
        fmt.restore_params(out)
    with pytest.raises(CheckpointError, match="interrupted"):
        convert.jax_to_hf(out, tmp_path / "back", **QUIET)
    with open(out / fmt.WORK_DIR / "progress.jsonl", "a") as f:
        f.write('{"k": "model.layers.5.mlp.exp')  # a torn line, as a kill mid-append leaves

    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "resuming: 40 of 212 tensors already written" in r.stderr
    man = fmt.read_manifest(out)
    assert man["stats"]["resumed"] and not (out / fmt.WORK_DIR).exists()
    # Identical to an uninterrupted conversion, leaf by leaf.
    leaves = fmt.param_leaves(fmt.load_config(out))
    for leaf in leaves.values():
        a = fmt.open_for_read(out / fmt.PARAMS_DIR, leaf.name, False, True).read().result()
        b = (
            fmt.open_for_read(converted["hf_bin"] / fmt.PARAMS_DIR, leaf.name, False, True)
            .read()
            .result()
        )
        assert _same_bits(a, b), leaf.name
    # Running it again on the complete output is a no-op.
    r = subprocess.run(
        cmd,
        env=dict(_env(), HUNYUAN_CONVERT_KILL_AFTER="5"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "nothing to do" in r.stderr  # complete: a no-op


def test_external_sigkill_during_writes_then_resume(tmp_path):
    """SIGKILL from outside while slices are being written (untied lm_head, bf16, 0.2 GB):
    the resumed conversion exports back bit-exactly to the source."""
    cfg = dict(_synthetic_config(8, 512, 1024), tie_word_embeddings=False)
    hf = tmp_path / "hf"
    convert.write_synthetic_hf(hf, cfg, "bfloat16", shard_bytes=48 << 20)
    out = tmp_path / "out"
    progress = out / fmt.WORK_DIR / "progress.jsonl"
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hunyuan_jax.convert",
            "hf-to-jax",
            "--hf-dir",
            str(hf),
            "--out",
            str(out),
            "--no-progress",
            "--max-inflight-gb",
            "0.01",
        ],
        env=_env(),
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 90
    while p.poll() is None and time.time() < deadline:
        if progress.is_file() and len(progress.read_text().splitlines()) >= 20:
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stderr.close()
    assert p.returncode == -signal.SIGKILL, "finished before it could be killed"
    assert not (out / fmt.MANIFEST).exists()
    n_done = len(progress.read_text().splitlines())
    man = convert.hf_to_jax(hf, out, **QUIET)
    assert man["stats"]["resumed"] and n_done >= 20
    convert.jax_to_hf(out, tmp_path / "back", **QUIET)
    src, back = HFCheckpoint(hf), HFCheckpoint(tmp_path / "back")
    assert set(back.keys) == set(src.keys) and "lm_head.weight" in back.keys
    for k in src.keys:
        assert _same_bits(back.read(k), src.read(k)), k
    # No temporary files of interrupted writes survive in the params tree.
    assert not [
        f
        for f in (out / fmt.PARAMS_DIR).rglob("*")
        if "tmp" in f.name.lower() or "lock" in f.name.lower()
    ]


def test_resume_refuses_changed_source(tmp_path, tiny_copy):
    src = tiny_copy("hf_st")
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hunyuan_jax.convert",
            "hf-to-jax",
            "--hf-dir",
            str(src),
            "--out",
            str(out),
            "--no-progress",
        ],
        env=dict(_env(), HUNYUAN_CONVERT_KILL_AFTER="10"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == -signal.SIGKILL
    shard = src / "model-00001-of-00002.safetensors"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    with pytest.raises(CheckpointError, match="unfinished conversion of a different source"):
        convert.hf_to_jax(src, out, **QUIET)
    convert.hf_to_jax(src, out, overwrite=True, **QUIET)
    assert fmt.read_manifest(out)["complete"]


# ----------------------------------------------------------------------------- peak memory
def _synthetic_config(layers, hidden, intermediate, experts=4, vocab=4096):
    base = json.loads((HY_TINY / "hf_st" / "config.json").read_text())
    return dict(
        base,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=max(1, hidden // 512),
        num_experts=experts,
        vocab_size=vocab,
    )


def _convert_measured(hf, out) -> int:
    """Convert in a fresh subprocess; its peak RSS in bytes: VmHWM polled from /proc while it
    runs (see convert.run_measuring_peak_rss), or as it reported itself in the manifest."""
    code, polled, _, err = convert.run_measuring_peak_rss(
        [
            sys.executable,
            "-m",
            "hunyuan_jax.convert",
            "hf-to-jax",
            "--hf-dir",
            str(hf),
            "--out",
            str(out),
            "--no-progress",
        ],
        env=_env(),
    )
    assert code == 0, err
    man = fmt.read_manifest(out)
    return max(polled, int(man["stats"]["peak_rss_mb"] * 1e6))


def _peak_for_depths(tmp_path, depths, hidden, intermediate):
    out = []
    for layers in depths:
        hf = tmp_path / f"hf_{layers}"
        size = convert.write_synthetic_hf(
            hf, _synthetic_config(layers, hidden, intermediate), "bfloat16", shard_bytes=256 << 20
        )
        peak = _convert_measured(hf, tmp_path / f"jax_{layers}")
        out.append((size, peak))
        shutil.rmtree(hf)
        shutil.rmtree(tmp_path / f"jax_{layers}")
    return out


def test_peak_rss_does_not_grow_with_layers(tmp_path):
    """0.27 GB and 0.54 GB checkpoints (16 and 32 layers, largest tensor 8 MB): same peak."""
    (s1, p1), (s2, p2) = _peak_for_depths(tmp_path, (16, 32), 512, 1024)
    assert s2 > 1.9 * s1 > 0.5e9
    assert p1 < 600e6 and p2 < 600e6, (p1, p2)  # interpreter + jax ~250 MB, then a few tensors
    assert p2 < p1 + 40e6, (p1, p2)


@pytest.mark.slow
def test_peak_rss_bounded_for_2gb_checkpoint(tmp_path):
    """2.1 GB (32 layers) and 4.2 GB (64 layers, largest tensor 8 MB) checkpoints convert with
    a peak RSS under 700 MB, far below either size, and doubling the layers adds nothing."""
    (s1, p1), (s2, p2) = _peak_for_depths(tmp_path, (32, 64), 1024, 2048)
    assert s1 > 2e9 and s2 > 4e9
    assert p1 < 700e6 and p2 < 700e6, (p1, p2)
    assert p2 < p1 + 40e6, (p1, p2)
