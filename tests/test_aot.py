"""Ahead-of-time compiles (`hunyuan_jax.aot`): topology names, the FLOP model, and real
XLA:TPU compiles of the tiny config for a v5p-8 slice in train / prefill / decode mode.

The TPU compiles need `libtpu` (pip install libtpu; no TPU needed) and are skipped without it.
Each compiles the tiny config in a few seconds."""

from __future__ import annotations

import importlib.util
import json

import pytest

from hunyuan_jax import aot
from hunyuan_jax.config import ModelConfig

A52B = "configs/hunyuan_a52b_instruct.yaml"
TINY = "configs/tiny.yaml"


def _libtpu_ok() -> bool:
    if importlib.util.find_spec("libtpu") is None:
        return False
    try:
        aot.topology_devices(aot.parse_topology("v5p-8"))
        return True
    except Exception:
        return False


needs_libtpu = pytest.mark.skipif(
    not _libtpu_ok(),
    reason="libtpu not installed: no ahead-of-time TPU compiles (pip install libtpu)",
)


# ---------------------------------------------------------------------------- no compiler
@pytest.mark.parametrize(
    "name, topology, chips, cloud",
    [
        ("v5p-8", "v5:2x2x1", 4, "v5p-8"),
        ("v5p-128", "v5:4x4x4", 64, "v5p-128"),
        ("v5p-256", "v5:4x4x8", 128, "v5p-256"),
        ("v5p-512", "v5:4x8x8", 256, "v5p-512"),
        ("v4-128", "v4:4x4x4", 64, "v4-128"),
        ("v6e-32", "v6e:4x8", 32, "v6e-32"),
        ("v6e-256", "v6e:16x16", 256, "v6e-256"),
        ("v5e-64", "v5e:8x8", 64, "v5e-64"),
        ("v5litepod-16", "v5e:4x4", 16, "v5e-16"),
        ("v5p:4x4x12", "v5:4x4x12", 192, "v5p-384"),
        ("v6e:2x4", "v6e:2x4", 8, "v6e-8"),
    ],
)
def test_topology_names(name, topology, chips, cloud):
    sl = aot.parse_topology(name)
    assert (sl.topology, sl.chips, sl.cloud_name) == (topology, chips, cloud)


@pytest.mark.parametrize("bad", ["v5p-7", "v9-8", "v5p:4x4", "tpu", "v6e-24"])
def test_bad_topology_names(bad):
    with pytest.raises(ValueError):
        aot.parse_topology(bad)


def test_default_meshes():
    cfg = ModelConfig.from_yaml(A52B)
    assert aot.default_mesh("train", cfg, 128) == "fsdp=-1,expert=16"
    assert aot.default_mesh("decode", cfg, 32) == "fsdp=1,expert=4,tensor=8"
    assert aot.default_mesh("decode", cfg, 64) == "fsdp=1,expert=8,tensor=8"


def test_analytic_flops_a52b():
    cfg = ModelConfig.from_yaml(A52B)
    n = aot.active_matmul_params(cfg)
    # SPEC 1: ~51.5B active per token with the 0.83B embedding; matmuls use the LM head once.
    assert 50.5e9 < n["total"] < 52e9
    f = aot.analytic_flops(cfg, "train", batch=128, seq=4096, context=4096, remat=True)
    assert f["hardware"] == pytest.approx(f["model"] * 4 / 3)
    # SPEC 7: 1.85e15 FLOPs per chip per step at 128 chips measured, 1.10x 8 N T.
    per_chip = f["hardware"] / 128
    assert 1.6e15 < per_chip < 2.0e15


def test_parse_oom_messages():
    text = (
        "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total "
        "memory required for HLO temporaries (240.00G) exceeds available HBM (95.73G)."
    )
    assert aot._parse_oom(text) == (240.0, 95.73)
    assert aot._parse_oom("Ran out of memory in memory space hbm. Used 187.00G of 95.74G hbm.") == (
        187.0,
        95.74,
    )
    assert aot._parse_oom("something else") == (None, None)


def test_local_devices_decode_step(capsys, tmp_path):
    """The same tool on this host's 8 CPU devices (platform from the mesh: cpu, no HBM), with a
    rule override sharding the cache's sequence over `expert`."""
    out = tmp_path / "r.json"
    rc = aot.main(
        [
            "--config",
            TINY,
            "--topology",
            "local",
            "--mode",
            "decode-step",
            "--mesh",
            "expert=2,tensor=4",
            "--batch",
            "2",
            "--cache-len",
            "64",
            "--rule",
            "cache_length=expert",
            "--json",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr()
    r = json.loads(out.read_text())
    assert r["platform"] == "cpu" and r["chips"] == 8 and r["fits"] and r["hbm_gib"] is None
    assert r["rules"] == "serve_ep_tp + cache_length=expert"
    assert "experts gather" in r["step_source"]
    assert r["memory_gib"]["arguments"] > 0


# ---------------------------------------------------------------------------- XLA:TPU
@needs_libtpu
@pytest.mark.parametrize(
    "mode, extra",
    [
        ("train", ["--seq", "64"]),
        ("prefill", ["--seq", "32", "--cache-len", "128", "--batch", "2"]),
        ("decode", ["--cache-len", "256", "--batch", "4"]),
    ],
)
def test_tiny_compiles_for_v5p(mode, extra, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = aot.main(
        ["--config", TINY, "--topology", "v5p-8", "--mode", mode, "--json", str(out), *extra]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    r = json.loads(out.read_text())
    assert r["platform"] == "tpu" and r["device_kind"].startswith("TPU v5")
    assert r["chips"] == 4 and r["hbm_gib"] == pytest.approx(95.73)
    assert r["fits"] and 0 < r["memory_gib"]["total"] < 1
    assert r["flops"]["compiled_raw_per_chip"] > 0
    assert 0 < r["mfu"]["mfu"] <= 1
    if mode == "train":
        assert r["mesh"]["expert"] == 4 and r["rules"] == "fsdp_ep"
        assert "train_step" in r["step_source"] or "fallback" in r["step_source"]
        # Parameters and optimizer state are donated: the outputs alias them.
        assert r["memory_gib"]["aliased"] > 0.5 * r["memory_gib"]["arguments"]
    else:
        assert r["rules"] == "serve_ep_tp" and r["param_dtype"] == "bfloat16"
    assert "memory per chip" in text and "MFU" in text


@needs_libtpu
def test_exit_status_when_it_does_not_fit(tmp_path, capsys):
    # The compiler's own verdict: a 2^22-slot cache for 64 rows does not fit a v5e chip.
    rc = aot.main(
        [
            "--config",
            TINY,
            "--topology",
            "v5e-4",
            "--mode",
            "decode",
            "--batch",
            "64",
            "--cache-len",
            str(2**22),
            "--mesh",
            "data=1,tensor=4",
            "--json",
            str(tmp_path / "oom.json"),
        ]
    )
    captured = capsys.readouterr()
    assert rc == 2
    assert "DOES NOT FIT" in captured.out and "does not fit" in captured.err
    r = json.loads((tmp_path / "oom.json").read_text())
    assert r["fits"] is False and r["available_gib"] == pytest.approx(15.75)
    assert r["required_gib"] > 15.75
    # A program that compiles but exceeds a given HBM budget fails the same way.
    rc = aot.main(
        [
            "--config",
            TINY,
            "--topology",
            "v5p-8",
            "--mode",
            "decode",
            "--cache-len",
            "128",
            "--hbm-gib",
            "1e-6",
        ]
    )
    assert rc == 2


@needs_libtpu
def test_unrolled_flops_close_to_analytic(tmp_path):
    out = tmp_path / "r.json"
    rc = aot.main(
        [
            "--config",
            TINY,
            "--topology",
            "v5p-8",
            "--mode",
            "prefill",
            "--seq",
            "64",
            "--cache-len",
            "64",
            "--unrolled-flops",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    f = json.loads(out.read_text())["flops"]
    # The scan undercounts by about the number of layer groups (3); unrolled does not.
    assert f["compiled_unrolled_per_chip"] > 1.5 * f["compiled_raw_per_chip"]
    assert f["compiled_unrolled_per_group"] > 0
    ratio = f["compiled_unrolled_per_chip"] / f["analytic_hardware_per_chip"]
    assert 0.8 < ratio < 2.0, ratio
