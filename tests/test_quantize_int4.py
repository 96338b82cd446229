"""int4 matmul weights with one scale per group along the contraction (hunyuan_jax.model.quantize):
numerics against qwix and the rounding bound, the group each weight takes (`int4_group`), the
grouped matmul and the decode steps' experts on grouped scales, the model forward against the
float model of the same (dequantized) weights and against the float32 reference, the
int4-experts form, the converter's int4 checkpoint (stored, checksummed, loaded; another
group layout refused) and infer.py.

Bound (per element, s = its group's stored scale): |w - q s| <= s / 2, s = max|w| over the
group / 7.5 (qwix's int4 bound: 7 + 1/2) rounded up to bfloat16 (so s is at most 2^-7
relative above it and every |w / s| <= 7.5), q = clip(round(w / s), -8, 7).

hy_tiny (hidden 96, 12 heads x 8, expert ffn 128) under any target >= 24 (the default 128):
hidden in groups of 6 (96 / 16 shards), the experts' 128 in groups of 8, o_proj's 12 x 8 in
groups of 3 heads x 8 (12 heads split at most 4 ways).

Logits vs the float32 reference, measured on test_quantize's prompts (4 x 24 random ids, one
forward), default target group: max / mean |logits - float32| int4 3.01 / 0.368, int4-experts
2.46 / 0.162, with relative weight errors ||W - W'|| / ||W|| 7.77 % and 7.06 % (int8: 0.64 %,
1.64 / 0.0609). The mean error grows more
slowly than the weight error, so the int4 mean is held to int8's measured mean scaled by the
weight-error ratio measured in the test, and the max to 1.5 x measured (dominated by tokens
whose top-1 expert flips: random weights).
"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HY_TINY, flat_params, prefill_logits, same_bits
from flax import nnx
from qwix._src.core import qarray

from hunyuan_jax.checkpoints import convert, loading
from hunyuan_jax.checkpoints.hf_checkpoint import HFCheckpoint
from hunyuan_jax.cli import infer
from hunyuan_jax.cli.convert import main as convert_main
from hunyuan_jax.errors import CheckpointError, ConfigError, UsageError
from hunyuan_jax.model import moe, qops, quantize
from hunyuan_jax.model.policy import RuntimePolicy
from hunyuan_jax.model.state import abstract_model
from sharding.plan import ShardingPlan

HF = HY_TINY / "hf_st"
GROUP = 32
QUIET = dict(progress=False, log=lambda msg: None)
TOKENIZER = Path(loading.__file__).parents[1] / "assets" / "default_model" / "tokenizer.model"
MARGIN = 1.5
INT8 = (0.0609, 0.00638)  # test_quantize's measured int8 mean |logits error|, weight error
MEASURED_MAX = {"int4": 3.01, "int4-experts": 2.46}
# float32 rounding of q * s and of the difference (|q| <= 8): a few ulps.
SLACK = 1 + 2.0**-12
EXPERT_AXES = {
    "gate_proj": ("exp", "exp_embed", "exp_mlp"),
    "up_proj": ("exp", "exp_embed", "exp_mlp"),
    "down_proj": ("exp", "exp_mlp", "exp_embed"),
}
EXPERT_SHAPES = {"gate_proj": (4, 64, 32), "up_proj": (4, 64, 32), "down_proj": (4, 32, 64)}


def _policy(weights="auto", group=GROUP):
    return RuntimePolicy.inference("float32", weights=weights, int4_group_size=group)


def _load(path, weights="auto", group=GROUP):
    return loading.load_params(loading.open_checkpoint(path), _policy(weights, group))


def _module(model, path):
    for p in path:
        model = model[p] if isinstance(p, int) else getattr(model, p)
    return model


def _bound(w: np.ndarray, stored) -> np.ndarray:
    """s / 2 per element of `w`, s its group's scale; checks s = max|w| over the group / 7.5."""
    q, s = np.asarray(stored.qvalue), np.asarray(stored.scale)
    tiles = tuple(d // t for d, t in zip(q.shape, s.shape))
    split = [x for d, t in zip(w.shape, tiles) for x in (d // t, t)]
    amax = np.abs(w).reshape(split).max(axis=tuple(range(1, 2 * w.ndim, 2))).reshape(s.shape)
    s = s.astype(np.float32)
    ref = (amax / np.float32(7.5))[amax > 0]
    assert np.all(s[amax > 0] >= ref * (1 - 2.0**-23)) and np.all(s[amax > 0] < ref * (1 + 2.0**-7))
    assert np.all(s[amax == 0] == 1.0)
    return quantize._expand(s, w.shape) / 2


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize(
    "name,axes,shape,group",
    [
        ("q_proj", ("layers", "embed", "heads", "head_dim"), (3, 256, 5, 8), 16),
        ("o_proj", ("layers", "heads", "head_dim", "embed"), (2, 16, 8, 12), 4),  # in head_dim
        ("o_proj", ("layers", "heads", "head_dim", "embed"), (2, 32, 8, 12), 16),  # 2 heads x 8
        ("down_proj", ("exp", "exp_mlp", "exp_embed"), (4, 9, 24), 32),  # one group: per channel
    ],
)
def test_numpy_int4_is_qwix_and_within_bounds(name, axes, shape, group):
    """The converter's numpy quantizer equals `to_form` bit for bit and qwix's (XLA:CPU) with
    the same (bfloat16, rounded up) scales, in groups within the last contracted dim and across
    it; every element is within s / 2 of the stored scale."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    contracted = quantize.contracted_dims(name, axes)
    tiles = quantize.group_tiles(name, axes, shape, "int4", group)
    w[tuple(slice(0, t) if d in contracted else 0 for d, t in enumerate(tiles))] = 0.0
    w[1, 1, 1] = 3.0  # an outlier in one group
    how = quantize.how_for(name, axes, "int4", shape, group)
    q, s = quantize.quantize_numpy(w, contracted, "int4", tiles)
    ref = jax.jit(lambda a, sc: qarray.quantize_with_scale_zero_point(a, how.qtype, sc, None))(
        jnp.asarray(w), jnp.asarray(s, jnp.float32)
    )
    assert q.dtype == quantize.QTYPES["int4"] and s.dtype == quantize.scale_dtype("int4")
    assert np.prod(q.shape) // np.prod(s.shape) == min(group, np.prod(tiles))
    assert same_bits(q, np.asarray(ref.qvalue))
    jq = quantize.to_form(jnp.asarray(w), name, axes, "int4", group)
    assert same_bits(q, np.asarray(jq.qvalue)) and same_bits(s, np.asarray(jq.scale))
    assert quantize.form_of(jq) == "int4" and quantize.tiles_of(jq) == tiles
    err = np.abs(quantize.dequantize_numpy(q, s) - w)
    assert np.all(err <= _bound(w, jq) * SLACK + 1e-12)
    assert int(np.asarray(q, np.int8).min()) >= -8 and int(np.asarray(q, np.int8).max()) <= 7


@pytest.mark.parametrize(
    "shape,axes,target,group",
    [
        ((6400, 18304), ("embed", "mlp"), 128, 100),  # A52B hidden: 400 per shard of 16
        ((18304, 6400), ("mlp", "embed"), 128, 104),  # the experts' 18304 = 2^7 x 11 x 13
        ((80, 80, 6400), ("heads", "head_dim", "embed"), 128, 80),  # 100 straddles a head
        ((6400, 18304), ("embed", "mlp"), 32, 25),
        ((96, 128), ("embed", "mlp"), 128, 6),  # hy_tiny
        ((12, 8, 96), ("heads", "head_dim", "embed"), 128, 24),  # 12 heads: 4 shards, 3 x 8
        ((12, 8, 96), ("heads", "head_dim", "embed"), 12, 8),
        ((9, 24), ("exp_mlp", "exp_embed"), 128, 9),  # odd: one shard, per channel
    ],
)
def test_int4_group_per_weight(shape, axes, target, group):
    """Each weight's group: the largest <= the target that leaves whole groups on every
    shard of its leading contracted dim split up to 16 ways and that its layout holds."""
    name = "w"
    got = quantize.int4_group(name, axes, shape, target)
    assert got == group
    contracted = quantize.contracted_dims(name, axes)
    k = int(np.prod([shape[d] for d in contracted]))
    shards = [t for t in (1, 2, 4, 8, 16) if shape[contracted[0]] % t == 0]
    ok = lambda g: all((k // t) % g == 0 for t in shards) and quantize._tiles(contracted, shape, g)
    assert ok(got) and not any(ok(g) for g in range(got + 1, target + 1))
    tiles = quantize.group_tiles(name, axes, shape, "int4", target)
    assert int(np.prod([tiles[d] for d in contracted])) == group


def test_int4_group_policy_errors():
    with pytest.raises(ConfigError, match="int4_group_size"):
        RuntimePolicy(int4_group_size=0)
    with pytest.raises(ConfigError, match="weights"):
        RuntimePolicy(weights="int2")


def test_a52b_int4_default_groups():
    """The abstract A52B (no memory) under the default target 128: hidden 6400 in groups of
    100, the experts' 18304 in groups of 104, o_proj's 80 heads x 80 in whole heads; every
    scale's group count splits over 16 shards; int4 values (4 bits) + bfloat16 scales are
    26.1 % of bf16, int4-experts 27.9 %."""
    cfg = loading.read_model_config("configs/hunyuan_a52b_instruct.yaml")
    bits = lambda a: 4 if a.dtype == quantize.QTYPES["int4"] else 8 * a.dtype.itemsize
    size = lambda m: sum(
        v.get_value().size * bits(v.get_value()) / 8
        for _, v in nnx.to_flat_state(nnx.state(m, nnx.Param))
    )
    bf16 = size(abstract_model(cfg, RuntimePolicy.inference("bfloat16")))
    int4 = abstract_model(cfg, RuntimePolicy.inference("bfloat16", weights="int4"))
    flat = dict(nnx.to_flat_state(nnx.state(int4, nnx.Param)))
    scale = lambda *sub: flat[("groups", "layers", 0, *sub, "array", "scale")].get_value().shape
    assert scale("attn", "q_proj")[1:] == (64, 80, 80)
    assert scale("attn", "o_proj")[1:] == (80, 1, 6400)
    assert scale("moe", "down_proj")[1:] == (16, 176, 6400)
    assert scale("moe", "gate_proj")[1:] == (16, 64, 18304)
    for k, v in flat.items():
        if k[-1] == "scale":
            axes = flat[k[:-1] + ("qvalue",)].get_metadata("logical_axes")
            lead = quantize.contracted_dims(k[-3], axes)[0]
            assert v.get_value().dtype == quantize.scale_dtype("int4"), k
            assert v.get_value().shape[lead] % 16 == 0 or "o_proj" in k, k  # o_proj: 80 heads
    assert 0.26 < size(int4) / bf16 < 0.263
    mixed = abstract_model(cfg, RuntimePolicy.inference("bfloat16", weights="int4-experts"))
    assert 0.277 < size(mixed) / bf16 < 0.28


# ----------------------------------------------------------------------------- expert paths
def _expert_weights(rng, form="int4", group=16):
    """Expert weights as `qops.weight` hands them to a float32 computation (scales cast)."""
    return {
        n: quantize.to_form(
            jnp.asarray(rng.standard_normal(EXPERT_SHAPES[n]) * 0.05, jnp.float32),
            n,
            EXPERT_AXES[n],
            form,
            group,
        ).astype(jnp.float32)
        for n in EXPERT_SHAPES
    }


def test_grouped_matmul_on_grouped_scales():
    """qops.ragged_dot on int4 weights (scales [G, K / group, N]): the grouped matmul of the
    dequantized weights (rows past the groups stay 0)."""
    rng = np.random.default_rng(3)
    q = _expert_weights(rng)["gate_proj"]
    assert q.scale.shape == (4, 16, 32)  # 64 / 16 shards: groups of 4
    x = jnp.asarray(rng.standard_normal((11, 64)), jnp.float32)
    sizes = jnp.asarray([3, 0, 5, 1], jnp.int32)
    got = jax.jit(qops.ragged_dot)(x, q, sizes)
    want = jax.lax.ragged_dot(x, quantize.dequantize(q), sizes)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)
    assert not np.asarray(got)[9:].any()


@pytest.mark.parametrize("tokens,k", [(1, 1), (4, 1), (2, 2)])
def test_decode_and_prefill_experts_on_int4(tokens, k):
    """The decode steps' experts (each token's experts gathered from the int4 QArray, values
    and grouped scales alike), the dropless grouped matmul (prefill on accelerators) and the
    CPU's tiled experts all compute what the dropless path computes on the dequantized
    weights."""
    rng = np.random.default_rng(tokens * 10 + k)
    qs = _expert_weights(rng)
    x = jnp.asarray(rng.standard_normal((tokens, 64)), jnp.float32)
    routing = moe.route(x, jnp.asarray(rng.standard_normal((64, 4)), jnp.float32), k)
    w = moe.ExpertWeights(*qs.values())
    plain = moe.ExpertWeights(*(quantize.dequantize(q) for q in qs.values()))
    want, _ = moe.dropless_experts(x, routing, plain)
    for fn in (moe.few_token_experts, moe.dropless_experts, moe.tiled_experts):
        got, _ = jax.jit(fn)(x, routing, w)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- model
@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(3, 1024, (4, 24)).astype(np.int32)


@pytest.fixture(scope="module")
def models():
    return {w: _load(HF, w) for w in ("auto", "int4", "int4-experts")}


def _dequantized(model):
    """`model` with every quantized matmul weight replaced by its float32 dequantized value."""
    graphdef, state = nnx.split(model)
    out = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))
    for _, module, name in list(quantize.matmul_weights(out)):
        stored = getattr(module, name)[...]
        value = quantize.dequantize(getattr(stored, "array", stored))
        setattr(
            module, name, quantize.boxed(value, name, quantize.weight_axes(getattr(module, name)))
        )
    assert quantize.model_form(out) == "float"
    return out


def test_layout_of_int4_and_int4_experts():
    """int4: every matmul weight's scale has the group counts on the contracted dims (with the
    weight's logical axes there); int4-experts: the routed experts so, attention and the
    shared expert int8 per channel."""
    cfg = loading.read_model_config(HF)
    layer = ("groups", "layers", 0)
    cases = {  # sub-path: (int4 scale shape, int8 scale shape)
        ("attn", "q_proj"): ((3, 16, 12, 8), (3, 1, 12, 8)),
        ("attn", "o_proj"): ((3, 4, 1, 96), (3, 1, 1, 96)),  # 12 x 8 in groups of 3 heads x 8
        ("moe", "shared", "down_proj"): ((3, 16, 96), (3, 1, 96)),
        ("moe", "gate_proj"): ((3, 8, 16, 128), None),
        ("moe", "down_proj"): ((3, 8, 16, 96), None),
    }
    for form in ("int4", "int4-experts"):
        model = abstract_model(cfg, _policy(form))
        assert quantize.model_form(model) == form
        flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
        for sub, (int4_shape, int8_shape) in cases.items():
            q = flat[layer + sub + ("array", "qvalue")].get_value()
            s = flat[layer + sub + ("array", "scale")]
            want = "int4" if form == "int4" or int8_shape is None else "int8"
            assert q.dtype == quantize.QTYPES[want], (form, sub)
            shape = int4_shape if want == "int4" else int8_shape
            assert s.get_value().shape == shape, (form, sub, s.get_value().shape)
            axes = flat[layer + sub + ("array", "qvalue")].get_metadata("logical_axes")
            dims = q.shape
            want_axes = tuple(None if n == 1 < d else a for a, n, d in zip(axes, shape, dims))
            assert s.get_metadata("logical_axes") == want_axes, (form, sub)
        q_axes = flat[layer + ("attn", "q_proj", "array", "scale")].get_metadata("logical_axes")
        assert q_axes[1] == ("embed" if form == "int4" else None)  # groups shard with embed


def test_int4_forward_is_the_dequantized_model_and_within_bounds(models, tokens):
    """The int4 (and int4-experts) model computes what the float32 model of its dequantized
    weights computes, up to float32 rounding; every weight is within s / 2 of the float32
    reference's; the logits error vs the reference is within the bounds of the docstring."""
    ref = models["auto"]
    reference = prefill_logits(ref, tokens)
    for form in ("int4", "int4-experts"):
        model = models[form]
        logits = prefill_logits(model, tokens)
        np.testing.assert_allclose(  # float32 reduction order, as on the mesh below
            logits, prefill_logits(_dequantized(model), tokens), atol=5e-5, rtol=0
        )
        num = den = 0.0
        for path, module, name in quantize.matmul_weights(model):
            w = np.asarray(getattr(_module(ref, path), name)[...])
            stored = getattr(module, name)[...].array
            w_hat = np.asarray(quantize.dequantize(stored))
            if quantize.form_of(stored) == "int4":
                assert np.all(np.abs(w_hat - w) <= _bound(w, stored) * SLACK + 1e-12), path
            num, den = num + float(np.sum((w_hat - w) ** 2)), den + float(np.sum(w**2))
        rel = (num / den) ** 0.5
        err = np.abs(logits - reference)
        assert 5 * INT8[1] < rel < 0.12, (form, rel)  # int4's weight error, far above int8's
        assert err.max() <= MARGIN * MEASURED_MAX[form], (form, err.max())
        assert INT8[0] < err.mean() <= MARGIN * INT8[0] * rel / INT8[1], (form, err.mean(), rel)


# ----------------------------------------------------------------------------- checkpoints
def _cli(capsys, main, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_converter_int4_round_trip_checksummed(tmp_path, models, capsys):
    """hf-to-jax --quantize int4 (the default target group): the manifest records the form, the
    group size and each weight's group, the int4 values and bfloat16 grouped scales are stored
    as zarr3 leaves with crc32c on every chunk (verify passes; a flipped bit is exit 4 naming
    the array, for verify and for loading), and the restored tree is the one quantized on
    load, bit for bit; a manifest whose group size gives another layout than the stored
    arrays is one line naming the array and both groups; the same for int4-experts, whose
    jax-to-hf export dequantizes each weight within its format's bound."""
    out = tmp_path / "int4"
    code, _, err = _cli(
        capsys, convert_main, "hf-to-jax", "--hf-dir", HF, "--out", out, "--quantize", "int4",
        "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    man = json.loads((out / "manifest.json").read_text())
    record = man["weights"]
    assert record["form"] == "int4" and record["group_size"] == 24  # the largest: o_proj's
    assert record["dtype"] == "int4" and record["scale_dtype"] == "bfloat16"
    groups = record["groups"]
    assert (
        groups["groups.layers.0.attn.q_proj"] == 6 and groups["groups.layers.0.attn.o_proj"] == 24
    )
    assert groups["groups.layers.0.moe.down_proj"] == 8
    leaves = man["params"]["leaves"]
    assert leaves["groups.layers.0.moe.gate_proj.array.qvalue.value"]["dtype"] == "int4"
    scale = leaves["groups.layers.0.moe.gate_proj.array.scale.value"]
    assert scale["shape"] == [3, 8, 16, 128] and scale["dtype"] == "bfloat16"
    ckpt = loading.open_checkpoint(out)
    assert (ckpt.weights, ckpt.int4_group_size) == ("int4", 24)
    want = flat_params(models["int4"])
    got = flat_params(loading.load_params(ckpt, _policy(group=8)))  # the stored groups win
    assert set(got) == set(want) and all(same_bits(got[k], want[k]) for k in want)

    code, _, err = _cli(capsys, convert_main, "verify", "--ckpt", out)
    assert code == 0 and "crc32c matches" in err, err
    array = "groups.layers.1.moe.down_proj.array.qvalue.value"
    files = [f for f in (out / "params" / array / "c").rglob("*") if f.is_file()]
    bad = max(files, key=lambda f: f.stat().st_size)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x04
    bad.write_bytes(bytes(data))
    code, _, err = _cli(capsys, convert_main, "verify", "--ckpt", out)
    assert code == 4 and array in err and str(bad) in err and len(err.splitlines()) == 1, err
    with pytest.raises(CheckpointError, match=array):
        _load(out)
    man["weights"]["group_size"] = 8  # as if written with another group layout
    (out / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(CheckpointError) as e:
        _load(out)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "attn.o_proj.array.scale.value is stored" in msg, msg
    assert "(int4 groups of 24 values stored, 8 here)" in msg and "convert the checkpoint" in msg

    man = convert.hf_to_jax(
        HF, tmp_path / "mixed", quantize="int4-experts", group_size=GROUP, **QUIET
    )
    assert man["weights"]["form"] == "int4-experts" and man["weights"]["group_size"] == 8
    want = flat_params(models["int4-experts"])
    got = flat_params(_load(tmp_path / "mixed"))
    assert set(got) == set(want) and all(same_bits(got[k], want[k]) for k in want)
    convert.jax_to_hf(tmp_path / "mixed", tmp_path / "back", **QUIET)  # dequantizes
    back, orig = HFCheckpoint(tmp_path / "back"), HFCheckpoint(HF)
    for key, levels in (
        ("model.layers.3.mlp.experts.5.down_proj.weight", 15),  # int4: s / 2 = max|w| / 15
        ("model.layers.3.self_attn.o_proj.weight", 255),  # int8
    ):
        w = orig.get(key)
        assert np.abs(back.get(key) - w).max() <= np.abs(w).max() / levels * 1.0001, key
    with pytest.raises(UsageError, match="--int4-group-size 32 needs --quantize int4"):
        convert.hf_to_jax(HF, tmp_path / "x", quantize="int8", group_size=GROUP, **QUIET)


def test_infer_cli_int4_end_to_end(tmp_path, capsys):
    """infer.py --weights int4 on hy_tiny (quantized on load, the default target group) and
    on its int4 conversion (as stored) print the same greedy text."""
    argv = ["--prompt", "def main(", "--max-new-tokens", 6, "--greedy", "--tokenizer", TOKENIZER]
    code, on_load, err = _cli(capsys, infer.main, "--checkpoint", HF, *argv, "--weights", "int4")
    assert code == 0 and on_load.strip(), err
    convert.hf_to_jax(HF, tmp_path / "int4", quantize="int4", **QUIET)
    code, stored, err = _cli(capsys, infer.main, "--checkpoint", tmp_path / "int4", *argv)
    assert code == 0 and stored == on_load, err
    shutil.rmtree(tmp_path / "int4")


def test_server_weights_int4_serves_the_int4_model():
    """The server's --weights int4 (`cli.serve.build_state`, as its flag passes it): the engine
    holds the int4 model, bit for bit the one loading quantizes with the default target group
    (int4 values and bfloat16 group scales, not float weights), and its parsed flags reach it."""
    from hunyuan_jax.cli import serve as serve_cli

    args = serve_cli.build_parser().parse_args(["--weights", "int4", "--int4-group-size", "128"])
    assert (args.weights, args.int4_group_size) == ("int4", 128)
    state = serve_cli.build_state(
        HF, tokenizer=str(TOKENIZER), dtype="float32", weights=args.weights,
        int4_group_size=args.int4_group_size, slots=1, max_len=32, prefill_chunk=2,
        log=lambda *_: None,
    )  # fmt: skip
    ex = state.engine.ex
    served = nnx.merge(ex.graphdef, ex.params)
    assert quantize.model_form(served) == "int4"
    want = flat_params(_load(HF, "int4", 128))
    got = flat_params(served)
    assert got.keys() == want.keys()
    assert all(same_bits(got[k], want[k]) for k in want)
    int4 = [v for v in got.values() if v.dtype == quantize.QTYPES["int4"]]
    assert len(int4) == len(list(quantize.matmul_weights(served))) > 0  # every matmul weight


# ----------------------------------------------------------------------------- on a mesh
def test_expert_parallel_int4_matches_one_device(tokens):
    """int4 weights on the 8-device mesh (experts over `expert` in the shard_map, FSDP over
    `fsdp` gathering the int4 values and their grouped scales, TP over `tensor`): the
    one-device int4 logits, up to float32 reduction order. Groups shard with the contraction:
    the hidden size (96, in groups of 6 whatever the target) is sharded over fsdp x expert =
    4 here, 4 of its 16 groups per shard."""
    plan = ShardingPlan.create("fsdp=2,expert=2,tensor=2", "fsdp_ep_tp")
    want = prefill_logits(_load(HF, "int4", 8), tokens)
    policy = _policy("int4", 8)
    model = loading.load_params(loading.open_checkpoint(HF), policy, plan)
    scale = model.groups.layers[0].moe.gate_proj[...].array.scale
    assert scale.shape[1:] == (8, 16, 128)
    assert tuple(scale.sharding.spec)[1:] == ("expert", "fsdp", "tensor")
    np.testing.assert_allclose(prefill_logits(model, tokens), want, atol=5e-5, rtol=0)
