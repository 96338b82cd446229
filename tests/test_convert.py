"""Checkpoint conversion HF <-> orbax/tensorstore (hunyuan_jax.checkpoints.convert, converted):
the reference logits after restoring on an 8-device mesh, bit-exact round trips, export from a
train.py run directory, FP8 dequantisation, bad inputs and the CLI's one-line errors, SIGKILL
from outside + resume, bounded peak RSS that does not grow with depth.

Durations on 2 shared CPU cores (loaded): most tests take < 9 s; the two SIGKILL tests start
the converter as a process (15 and 30 s); `test_peak_rss_does_not_grow_with_layers` 40-60 s;
`test_peak_rss_bounded_for_2gb_checkpoint` (marked slow) 150-240 s, 6 GB of scratch. The
whole file: ~3.5 min without the slow test, ~7 min with it."""

import json
import os
import random
import shutil
import time
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from conftest import DATA, HY_TINY

from hunyuan_jax.checkpoints import convert, hf_mapping, loading
from hunyuan_jax.checkpoints import converted as fmt
from hunyuan_jax.checkpoints.convert.common import hf_tensors
from hunyuan_jax.checkpoints.hf_checkpoint import HFCheckpoint, dequantize_fp8
from hunyuan_jax.cli.convert import main as convert_main
from hunyuan_jax.errors import CheckpointError, MissingShardError, UsageError
from hunyuan_jax.model.config import ModelConfig
from hunyuan_jax.model.policy import RuntimePolicy
from sharding.plan import ShardingPlan
from tests.helpers.process import converter_cmd, converter_env, kill_when_recorded
from tests.helpers.rss import run_measuring_peak_rss
from tests.helpers.synthetic import synthetic_config, write_hf, write_synthetic_hf

TOKENIZER = DATA / "hunyuan_tokenizer"
TOKENIZER_FILES = ("hy.tiktoken", "tokenizer_config.json", "generation_config.json")
BF16 = np.dtype(ml_dtypes.bfloat16)
QUIET = dict(progress=False, log=lambda msg: None)
PROG = "python -m hunyuan_jax.cli.convert"


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.reshape(-1).view(np.uint8)


def _same_bits(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(_bits(a), _bits(b))


def _hf_tensors(directory) -> dict[str, np.ndarray]:
    ckpt = HFCheckpoint(directory)
    return {k: ckpt.get(k) for k in ckpt.keys}


def _hy_tiny_config() -> dict:
    return json.loads((HY_TINY / "hf_st" / "config.json").read_text())


def _load(directory, plan=None, dtype="float32"):
    """The model of a checkpoint directory (its weights only: the tokenizer these tests carry
    is the real Hunyuan one, larger than hy_tiny's vocabulary, which `from_checkpoint.load` refuses)."""
    ckpt = loading.open_checkpoint(directory)
    return loading.load_params(ckpt, RuntimePolicy.inference(dtype), plan)


def _logits(model, tokens):
    logits, _, _ = model(tokens)
    return np.asarray(logits)


def _read_leaf(out: Path, name: str, index=()) -> np.ndarray:
    arr = fmt.open_for_read(out / fmt.PARAMS_DIR, name, False, True)
    return (arr[index] if index else arr).read().result()


def _cli(capsys, *argv) -> tuple[int, str]:
    """(exit status, stderr) of the converter's CLI run in this process."""
    code = convert_main([str(a) for a in argv])
    return code, capsys.readouterr().err


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

    plan = ShardingPlan.create("data=1,fsdp=2,expert=4,tensor=1", "fsdp_ep")
    model = _load(out, plan)
    # float32 throughout, the same arithmetic as the HF load: only summation order differs.
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
    ckpt = loading.open_checkpoint(out)
    assert ckpt.format == "converted" and ckpt.stored_dtype == "float32"
    model = loading.load_params(ckpt, RuntimePolicy.inference("bfloat16"))
    src = HFCheckpoint(HY_TINY / "hf_st").get("model.layers.3.self_attn.q_proj.weight")
    q = np.asarray(model.groups.layers[1].attn.q_proj[...])  # layer 3 = group 1, member 1
    assert q.dtype == BF16
    entry = next(
        e
        for e in hf_mapping.mapping_table(ckpt.cfg)
        if e.path == ("groups", "layers", 1, "attn", "q_proj")
    )
    assert _same_bits(q[1], hf_mapping.to_tree_slice(entry, src, q.shape).astype(BF16))


def test_tree_names_match_what_orbax_saves(converted, tmp_path):
    """Our hand-written _METADATA equals the one orbax writes for nnx.state(model, Param)."""
    import orbax.checkpoint as ocp
    from flax import nnx

    out = converted["hf_st"]
    model = _load(out)
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
def test_round_trip_bit_exact(layout, converted, tmp_path):
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back"]  # no temp dir left beside


def test_round_trip_bfloat16_and_dtype_cast(tmp_path):
    """bf16 HF -> bf16 params -> bf16 HF is bit-exact; f32 -> --dtype bfloat16 rounds like
    ml_dtypes (round to nearest even), and back to f32 is exact for those values."""
    src = _hf_tensors(HY_TINY / "hf_st")
    bf = {k: v.astype(BF16) for k, v in src.items()}
    hf = write_hf(tmp_path / "bf16", bf, dict(_hy_tiny_config(), torch_dtype="bfloat16"), 3)
    convert.hf_to_jax(hf, tmp_path / "jax", **QUIET)
    assert fmt.read_manifest(tmp_path / "jax")["dtype"] == "bfloat16"
    convert.jax_to_hf(tmp_path / "jax", tmp_path / "back", **QUIET)
    back = _hf_tensors(tmp_path / "back")
    assert all(_same_bits(back[k], bf[k]) for k in back) and len(back) == len(bf)

    convert.hf_to_jax(HY_TINY / "hf_st", tmp_path / "cast", "bfloat16", **QUIET)
    convert.jax_to_hf(tmp_path / "cast", tmp_path / "cast_back", "float32", **QUIET)
    back = _hf_tensors(tmp_path / "cast_back")
    assert all(np.array_equal(back[k], src[k].astype(BF16).astype(np.float32)) for k in back)


def test_round_trip_untied_lm_head(tmp_path):
    src = _hf_tensors(HY_TINY / "hf_st")
    src["lm_head.weight"] = src["model.embed_tokens.weight"] * 2
    hf = write_hf(tmp_path / "hf", src, dict(_hy_tiny_config(), tie_word_embeddings=False))
    convert.hf_to_jax(hf, tmp_path / "jax", **QUIET)
    convert.jax_to_hf(tmp_path / "jax", tmp_path / "back", **QUIET)
    back = _hf_tensors(tmp_path / "back")
    assert "lm_head.weight" in back and _same_bits(back["lm_head.weight"], src["lm_head.weight"])


def test_export_from_orbax_ocdbt_checkpoint(converted, tmp_path):
    """jax-to-hf also reads a bare orbax (OCDBT, zarr2) params checkpoint, given the config."""
    import orbax.checkpoint as ocp
    from flax import nnx

    model = _load(converted["hf_st"])
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())  # orbax defaults: OCDBT, zarr2
    ckptr.save(tmp_path / "orbax", args=ocp.args.PyTreeSave(nnx.state(model, nnx.Param)))
    with pytest.raises(CheckpointError, match="--config"):  # without it: what is missing
        convert.jax_to_hf(tmp_path / "orbax", tmp_path / "back", **QUIET)
    convert.jax_to_hf(tmp_path / "orbax", tmp_path / "back", config=HY_TINY / "hf_st", **QUIET)
    src, back = _hf_tensors(HY_TINY / "hf_st"), _hf_tensors(tmp_path / "back")
    assert all(_same_bits(back[k], src[k]) for k in back)


@pytest.fixture(scope="module")
def train_run(tmp_path_factory, converted):
    """A train.py run directory: config.yaml, tokenizer/, checkpoints of steps 3 (the hy_tiny
    weights) and 5 (every weight doubled, exact in float32)."""
    import jax.numpy as jnp
    from flax import nnx

    from hunyuan_jax.checkpoints import runs

    run = tmp_path_factory.mktemp("run")
    model = _load(converted["hf_st"])
    runs.write_run_config(run, model.cfg, RuntimePolicy())
    params = nnx.state(model, nnx.Param)
    saver = runs.Checkpointer(run, async_save=False)
    opt = {"count": jnp.zeros((), jnp.int32)}
    saver.save(3, params, opt, {"0": {}})
    saver.save(5, jax.tree.map(lambda x: x * 2, params), opt, {"0": {}})
    saver.close()
    (run / "tokenizer").mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER / name, run / "tokenizer")
    return run


def test_export_train_run_directory(train_run, tmp_path, capsys):
    """A run directory exports its latest complete step (no --config), `--step` another."""
    src = _hf_tensors(HY_TINY / "hf_st")
    convert.jax_to_hf(train_run, tmp_path / "latest", **QUIET)
    back = _hf_tensors(tmp_path / "latest")
    assert back and all(_same_bits(back[k], src[k] * 2) for k in back)  # step 5
    for name in TOKENIZER_FILES:
        assert (tmp_path / "latest" / name).read_bytes() == (TOKENIZER / name).read_bytes()
    assert ModelConfig.from_hf(tmp_path / "latest") == ModelConfig.from_hf(HY_TINY / "hf_st")

    code, err = _cli(
        capsys, "jax-to-hf", "--ckpt", train_run, "--out", tmp_path / "s3", "--step", 3
    )
    assert code == 0, err
    assert "step 3 of run" in err
    back = _hf_tensors(tmp_path / "s3")
    assert all(_same_bits(back[k], src[k]) for k in back)

    code, err = _cli(
        capsys, "jax-to-hf", "--ckpt", train_run, "--out", tmp_path / "s4", "--step", 4
    )
    assert code == 4 and "no complete checkpoint of step 4 (steps: 3, 5)" in err
    assert not (tmp_path / "s4").exists()
    code, err = _cli(
        capsys,
        "jax-to-hf",
        "--ckpt",
        train_run,
        "--out",
        tmp_path / "c",
        "--config",
        HY_TINY / "hf_st",
    )
    assert code == 2 and "--config is only for a bare orbax params directory" in err


def test_fast_transforms_equal_mapping_table():
    cfg = ModelConfig.from_hf(HY_TINY / "hf_st")
    leaves = fmt.param_leaves(cfg, "float32")
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
    config = _hy_tiny_config()
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
    hf = write_hf(tmp_path / "fp8", tensors, config)
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


def test_missing_shard(tiny_copy, tmp_path, capsys):
    src = tiny_copy("hf_bin")
    (src / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(MissingShardError, match="pytorch_model-00002-of-00002.bin"):
        convert.hf_to_jax(src, tmp_path / "out", **QUIET)
    _assert_nothing_written(tmp_path / "out")
    code, err = _cli(capsys, "hf-to-jax", "--hf-dir", src, "--out", tmp_path / "out")
    assert code == 4
    assert err.startswith(f"{PROG}: error: ") and "pytorch_model-00002-of-00002.bin" in err
    assert len(err.strip().splitlines()) == 1, err


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
    change(src)
    return write_hf(tmp_path / "modified", src, _hy_tiny_config())


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


def test_cli_errors_are_one_line_with_their_exit_status(tmp_path, converted, capsys):
    """Usage / config errors exit 2, checkpoint problems 4, each as one line naming the path;
    --debug raises instead."""
    code, err = _cli(capsys, "hf-to-jax", "--hf-dir", tmp_path / "nowhere", "--out", tmp_path / "o")
    assert (code, err) == (
        4,
        f"{PROG}: error: --hf-dir {tmp_path / 'nowhere'}: no such directory\n",
    )
    with pytest.raises(CheckpointError):
        _cli(
            capsys,
            "hf-to-jax",
            "--hf-dir",
            tmp_path / "nowhere",
            "--out",
            tmp_path / "o",
            "--debug",
        )
    bad = tmp_path / "bad_config"
    shutil.copytree(HY_TINY / "hf_st", bad)
    (bad / "config.json").write_text(json.dumps(dict(_hy_tiny_config(), hidden_act="gelu")))
    code, err = _cli(capsys, "hf-to-jax", "--hf-dir", bad, "--out", tmp_path / "o")
    assert code == 2 and "hidden_act 'gelu' unsupported" in err and len(err.splitlines()) == 1
    code, err = _cli(
        capsys, "jax-to-hf", "--ckpt", converted["hf_st"], "--out", tmp_path / "o", "--step", 1
    )
    assert code == 2 and "--step is only for a train.py run directory" in err
    code, err = _cli(capsys, "jax-to-hf", "--ckpt", HY_TINY / "hf_st", "--out", tmp_path / "o")
    assert code == 4 and "already a Hugging Face checkpoint" in err
    from hunyuan_jax.checkpoints import runs

    run = tmp_path / "run"  # a run that has not saved a checkpoint yet
    runs.write_run_config(run, ModelConfig.from_hf(HY_TINY / "hf_st"), RuntimePolicy())
    (run / "checkpoints").mkdir()
    code, err = _cli(capsys, "jax-to-hf", "--ckpt", run, "--out", tmp_path / "o")
    assert code == 4 and f"run {run} has no complete checkpoint under" in err
    with pytest.raises(SystemExit) as e:  # argparse's own usage errors: status 2 as well
        convert_main(["jax-to-hf", "--ckpt", "x", "--out", "y", "--dtype", "int8"])
    assert e.value.code == 2
    with pytest.raises(UsageError, match="--dtype"):
        convert.jax_to_hf(converted["hf_st"], tmp_path / "o", "int8", **QUIET)
    assert not (tmp_path / "o").exists()


def test_failed_export_leaves_nothing_behind(converted, tmp_path, capsys):
    """A corrupt param shard: exit 4 naming the tensor, no `out` and no temp dir; once fixed
    the same command succeeds. A temp dir left by a killed export does not block either;
    --overwrite replaces an HF export but nothing else."""
    ckpt = shutil.copytree(converted["hf_st"], tmp_path / "ckpt")
    shard = next((ckpt / fmt.PARAMS_DIR / "groups.layers.1.attn.o_proj.value").rglob("c/2/*/*/*"))
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])
    out = tmp_path / "exports" / "hf"
    argv = ("jax-to-hf", "--ckpt", ckpt, "--out", out, "--no-progress")
    code, err = _cli(capsys, *argv)
    assert code == 4 and "'model.layers.5.self_attn.o_proj.weight'" in err, err
    assert err.splitlines()[-1].startswith(f"{PROG}: error: ")
    assert list((tmp_path / "exports").iterdir()) == []

    shard.write_bytes(good)
    (tmp_path / "exports" / ".hf.jax-to-hf.tmp").mkdir()  # as a SIGKILL'd export leaves it
    (tmp_path / "exports" / ".hf.jax-to-hf.tmp" / "model-00001-of-00009.safetensors").touch()
    assert _cli(capsys, *argv)[0] == 0
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["hf"]
    assert _cli(capsys, *argv)[0] == 4  # exists: needs --overwrite
    assert _cli(capsys, *argv, "--overwrite", "--dtype", "bfloat16")[0] == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["hf"]
    code, err = _cli(capsys, "jax-to-hf", "--ckpt", ckpt, "--out", tmp_path, "--overwrite")
    assert code == 4 and "not a Hugging Face checkpoint" in err


# ----------------------------------------------------------------------------- kill + resume
def test_sigkill_midway_then_resume(tmp_path, converted, capsys):
    """SIGKILL from outside once >= 40 of 212 slices are recorded: no manifest, loading and
    export refuse; every recorded slice is on disk; the same command resumes (a torn last
    record line is ignored) and gives the uninterrupted conversion, bit for bit."""
    out = tmp_path / "out"
    cmd = converter_cmd(
        "hf-to-jax",
        "--hf-dir",
        HY_TINY / "hf_bin",
        "--out",
        out,
        "--no-progress",
        "--workers",
        1,
        "--max-inflight-gb",
        1e-6,  # one slice at a time: a wide window
    )
    k = kill_when_recorded(cmd, out, 40, env=converter_env())
    assert k.killed, f"finished before it could be killed (status {k.returncode}): {k.stderr}"
    assert not (out / fmt.MANIFEST).exists()
    progress = out / fmt.WORK_DIR / "progress.jsonl"
    recorded = [json.loads(line)["k"] for line in progress.read_text().splitlines()]
    assert 40 <= len(recorded) < 212 and len(set(recorded)) == len(recorded)
    cfg = ModelConfig.from_hf(HY_TINY / "hf_bin")
    items = hf_tensors(cfg, fmt.param_leaves(cfg, "float32"))
    for key in recorded:  # the record never lists a slice that is not on disk
        leaf, _, index, _ = items[key]
        a, b = _read_leaf(out, leaf.name, index), _read_leaf(converted["hf_bin"], leaf.name, index)
        assert _same_bits(a, b), key
    with pytest.raises(CheckpointError, match="interrupted"):
        loading.open_checkpoint(out)
    with pytest.raises(CheckpointError, match="interrupted"):
        convert.jax_to_hf(out, tmp_path / "back", **QUIET)
    with open(progress, "a") as f:
        f.write('{"k": "model.layers.5.mlp.exp')  # a torn line, as a kill mid-append leaves

    logs = []
    man = convert.hf_to_jax(HY_TINY / "hf_bin", out, progress=False, log=logs.append)
    assert f"resuming: {len(recorded)} of 212 tensors already written" in logs
    assert man["stats"]["resumed"] and not (out / fmt.WORK_DIR).exists()
    for leaf in fmt.param_leaves(cfg, "float32").values():  # = the uninterrupted conversion
        assert _same_bits(_read_leaf(out, leaf.name), _read_leaf(converted["hf_bin"], leaf.name))
    code, err = _cli(capsys, *cmd[3:])  # the same command line, in this process
    assert code == 0 and "nothing to do" in err  # complete: a no-op


def test_sigkill_at_random_points_then_resume(tmp_path):
    """bf16, 0.2 GB, slices written concurrently: SIGKILL at a random number of recorded
    slices, resume, SIGKILL again, resume to the end; the export equals the source bit for
    bit and no temporary file of an interrupted write survives."""
    seed = time.time_ns() % 2**32
    rng = random.Random(seed)
    hf = tmp_path / "hf"
    write_synthetic_hf(hf, synthetic_config(8, 512, 1024), "bfloat16", shard_bytes=48 << 20)
    total = len(HFCheckpoint(hf).keys)
    out = tmp_path / "out"
    cmd = converter_cmd(
        "hf-to-jax", "--hf-dir", hf, "--out", out, "--no-progress", "--max-inflight-gb", 0.01
    )
    first = rng.randint(1, total // 3)
    k = kill_when_recorded(cmd, out, first, env=converter_env())
    assert k.killed and k.recorded >= first, (seed, k)
    second = rng.randint(k.recorded + 1, max(k.recorded + 1, 2 * total // 3))
    k = kill_when_recorded(cmd, out, second, env=converter_env())
    assert k.killed and k.recorded >= second, (seed, k)
    assert "resuming" in k.stderr and not (out / fmt.MANIFEST).exists()
    man = convert.hf_to_jax(hf, out, **QUIET)
    assert man["stats"]["resumed"]
    convert.jax_to_hf(out, tmp_path / "back", **QUIET)
    src, back = HFCheckpoint(hf), HFCheckpoint(tmp_path / "back")
    assert set(back.keys) == set(src.keys)
    for key in src.keys:
        assert _same_bits(back.read(key), src.read(key)), (seed, key)
    assert not [
        f
        for f in (out / fmt.PARAMS_DIR).rglob("*")
        if "tmp" in f.name.lower() or "lock" in f.name.lower()
    ]


def test_resume_refuses_changed_source(tmp_path, tiny_copy):
    """An interrupted conversion (here: Ctrl-C right after the plan is recorded) is resumed
    only from the same source files: a changed shard mtime is refused; --overwrite restarts."""
    src = tiny_copy("hf_st")
    out = tmp_path / "out"

    def interrupt(msg):
        if msg.startswith("converting"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert.hf_to_jax(src, out, progress=False, log=interrupt)
    assert (out / fmt.WORK_DIR / "plan.json").is_file() and not (out / fmt.MANIFEST).exists()
    shard = src / "model-00001-of-00002.safetensors"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    with pytest.raises(CheckpointError, match="unfinished conversion of a different source"):
        convert.hf_to_jax(src, out, **QUIET)
    convert.hf_to_jax(src, out, overwrite=True, **QUIET)
    assert fmt.read_manifest(out)["complete"]


# ----------------------------------------------------------------------------- peak memory
def _convert_measured(hf, out) -> int:
    """Convert in a fresh subprocess; its peak RSS in bytes: VmHWM polled from /proc while it
    runs (tests.helpers.rss), or as it reported itself in the manifest."""
    code, polled, _, err = run_measuring_peak_rss(
        converter_cmd("hf-to-jax", "--hf-dir", hf, "--out", out, "--no-progress"),
        env=converter_env(),
    )
    assert code == 0, err
    man = fmt.read_manifest(out)
    return max(polled, int(man["stats"]["peak_rss_mb"] * 1e6))


def _peak_for_depths(tmp_path, depths, hidden, intermediate):
    out = []
    for layers in depths:
        hf = tmp_path / f"hf_{layers}"
        size = write_synthetic_hf(
            hf, synthetic_config(layers, hidden, intermediate), "bfloat16", shard_bytes=256 << 20
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
